"""Property tests of the HTTP API against a live tiny-model server: whatever a client sends, the
server never answers 5xx (except a well-formed 503 admission refusal), and every 4xx is a JSON
body with string `error` and `message`. Sessions the fuzzer manages to create are ended at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rollcast.server.background import BackgroundServer
from rollcast.server.sessions import SessionDefaults
from tests.server_helpers import fixed_cost_model, tiny_serve_config

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

SESSION_KEYS = ["mode", "prompt", "seed", "steps", "fps", "resolution", "slo", "max_duration_s"]
PARAM_KEYS = ["prompt", "transition_blocks", "steps", "paused"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=20,
)
# Plausible values for the real fields, so the fuzzer gets past "unknown field" and into validation.
near_values = st.one_of(
    json_values,
    st.sampled_from(["t2v", "v2v", "64x64", "65x64", "0x0", "64x64 ", "", "a cat"]),
    st.integers(min_value=-3, max_value=12),
    st.floats(min_value=-1, max_value=200),
    st.text(min_size=1990, max_size=2010, alphabet="ab"),
    st.lists(st.fixed_dictionaries({"text": st.text(max_size=20), "weight": json_values}), max_size=10),
    st.fixed_dictionaries({}, optional={"ttff_ms": json_values | st.floats(0, 1e6),
                                        "min_steps": json_values | st.integers(-1, 10),
                                        "min_fps": json_values | st.floats(-1, 200)}),
)


# Values the server accepts, per field, mixed in so that some bodies get all the way through.
VALID = {
    "mode": st.sampled_from(["t2v", "v2v"]), "prompt": st.text(max_size=30),
    "seed": st.integers(0, 2**63 - 1), "steps": st.integers(1, 4), "fps": st.floats(1, 16),
    "resolution": st.just("64x64"), "slo": st.just({}), "max_duration_s": st.floats(1, 60),
    "transition_blocks": st.integers(0, 64), "paused": st.booleans(),
}


def keyed(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    extra = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    known = st.fixed_dictionaries({}, optional={k: near_values | VALID[k] for k in keys})
    return st.one_of(known, st.tuples(known, extra).map(lambda kv: {**kv[1], **kv[0]}))


session_bodies = keyed(SESSION_KEYS)
param_bodies = keyed(PARAM_KEYS)
sdp_lines = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "m=video 9 UDP/TLS/RTP/SAVPF 96",
             "m=audio 9 UDP/TLS/RTP/SAVPF 111", "a=recvonly", "a=sendrecv", "a=mid:0",
             "a=rtpmap:96 VP8/90000",
             "a=setup:actpass", "a=ice-ufrag:abcd", "a=ice-pwd:aaaaaaaaaaaaaaaaaaaaaaaa", "c=IN IP4 0.0.0.0",
             "a=rtcp-mux", "a=fingerprint:sha-256 00:11", "m=video x", "a=group:BUNDLE 0", "m=video"]
sdps = st.one_of(
    st.text(max_size=200),
    st.text(max_size=120).map(lambda s: f"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n{s}"),
    st.lists(st.sampled_from(sdp_lines) | st.text(max_size=20), max_size=14).map("\r\n".join),
)
offer_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"sdp": sdps,
                           "type": st.sampled_from(["offer", "answer", "pranswer", ""]) | json_values}),
    st.fixed_dictionaries({"sdp": sdps, "type": st.just("offer")}),
    st.fixed_dictionaries({"sdp": sdps, "type": st.just("offer")},
                          optional={"session": session_bodies | json_values, "extra": json_values}),
)
raw_bytes = st.binary(max_size=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    # A long connect timeout so the one live session survives the whole module without a client.
    sessions = SessionDefaults(ttff_s=3.0, max_sessions_per_client=10, connect_timeout_s=600.0,
                               max_duration_s=600.0)
    # Without a fixed cost model the fuzzer might never reach a live session (see fixed_cost_model).
    cost = fixed_cost_model(tmp_path_factory.mktemp("fuzz") / "cost.json")
    with BackgroundServer(tiny_serve_config(sessions=sessions, cost_model=cost)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def live_id(http: httpx.Client) -> Iterator[str]:
    r = http.post("/v1/sessions", json={"prompt": "a red circle", "steps": 1})
    assert r.status_code in (201, 202), r.text
    sid = r.json()["session_id"]
    yield sid
    http.delete(f"/v1/sessions/{sid}")


def encode(body: Any) -> bytes:
    # NaN/Infinity tokens are not JSON: the server must say so (422 invalid_json), not crash.
    return json.dumps(body, allow_nan=True).encode()


def check(http: httpx.Client, r: httpx.Response, sent: Any) -> None:
    """The property, plus cleanup of anything the request created."""
    event(f"{r.status_code} {r.headers.get('content-type', '') and r.json().get('error', '')}"
          if r.headers.get("content-type") == "application/json" else str(r.status_code))
    where = f"{r.request.method} {r.request.url.path} <- {sent!r:.500}"
    if r.status_code == 503:
        body = r.json()
        assert body.get("error") in ("capacity_exhausted", "slo_infeasible"), f"{where}: {r.text}"
        assert isinstance(body.get("message"), str)
        assert r.headers.get("Retry-After", "").isdigit(), f"{where}: {r.headers}"
        return
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:500]}"
    if 400 <= r.status_code < 500:
        try:
            body = r.json()
        except ValueError:
            raise AssertionError(f"{where}: {r.status_code} non-JSON body {r.text[:300]!r}") from None
        assert isinstance(body, dict), f"{where}: {body!r}"
        assert isinstance(body.get("error"), str) and body["error"], f"{where}: {body!r}"
        assert isinstance(body.get("message"), str), f"{where}: {body!r}"
    if r.status_code in (201, 202) and r.request.method == "POST":
        sid = r.json().get("session_id")
        assert isinstance(sid, str), f"{where}: {r.text}"
        d = http.delete(f"/v1/sessions/{sid}")
        assert d.status_code == 200, d.text
        assert http.get(f"/v1/sessions/{sid}").json()["state"] in ("finished", "failed")


def post(http: httpx.Client, path: str, content: bytes, method: str = "POST") -> httpx.Response:
    return http.request(method, path, content=content, headers={"Content-Type": "application/json"})


@FUZZ
@given(body=st.one_of(json_values, session_bodies))
def test_create_session_any_json(http: httpx.Client, body: Any) -> None:
    check(http, post(http, "/v1/sessions", encode(body)), body)


@FUZZ
@given(body=st.one_of(json_values, param_bodies), on_live=st.booleans(),
       other_id=st.text(min_size=1, max_size=30))
def test_patch_params_any_json(http: httpx.Client, live_id: str, body: Any, on_live: bool,
                               other_id: str) -> None:
    sid = live_id if on_live else other_id
    r = post(http, f"/v1/sessions/{quote(sid, safe='')}/params", encode(body), "PATCH")
    check(http, r, body)
    if on_live:
        assert r.status_code in (200, 422), r.text  # the live session stays live whatever it was sent
        if r.status_code == 200:
            assert isinstance(r.json()["applied_at_frame"], int)


@FUZZ
@given(body=offer_bodies, on_live=st.booleans())
def test_session_offer_any_sdp(http: httpx.Client, live_id: str, body: Any, on_live: bool) -> None:
    sid = live_id if on_live else "s-no-such-session"
    r = post(http, f"/v1/sessions/{sid}/offer", encode(body))
    check(http, r, body)
    if on_live:
        assert http.get(f"/v1/sessions/{sid}").json()["state"] in ("active", "queued"), \
            f"a bad offer ended the session: {body!r}"


@FUZZ
@given(body=offer_bodies)
def test_one_shot_offer_any_body(http: httpx.Client, body: Any) -> None:
    check(http, post(http, "/v1/webrtc/offer", encode(body)), body)


@FUZZ
@given(data=raw_bytes, route=st.sampled_from(["/v1/sessions", "PATCH live", "PATCH none", "offer live",
                                               "/v1/webrtc/offer"]),
       content_type=st.sampled_from(["application/json", "text/plain", "",
                                     "application/x-www-form-urlencoded"]))
def test_raw_bytes_bodies(http: httpx.Client, live_id: str, data: bytes, route: str,
                          content_type: str) -> None:
    method, path = {
        "PATCH live": ("PATCH", f"/v1/sessions/{live_id}/params"),
        "PATCH none": ("PATCH", "/v1/sessions/nope/params"),
        "offer live": ("POST", f"/v1/sessions/{live_id}/offer"),
    }.get(route, ("POST", route))
    headers = {"Content-Type": content_type} if content_type else {}
    r = http.request(method, path, content=data, headers=headers)
    check(http, r, data)
