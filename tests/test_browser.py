"""The web page in headless Chromium against a live tiny-model server: a text stream over WebRTC
(frames decoded, TTFF, a live prompt change acked with a frame id, Stop ends the session) and a
webcam stream from Chromium's fake camera. Skipped where /usr/bin/chromium is missing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)
pytest.importorskip("playwright.sync_api")

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

from rollcast.server.background import BackgroundServer  # noqa: E402
from tests.server_helpers import fixed_cost_model, tiny_serve_config  # noqa: E402

ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        "--disable-features=WebRtcHideLocalIpsWithMdns"]
CONSOLE: dict[int, list[str]] = {}  # the page's console messages, for failure reports


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    cost = fixed_cost_model(tmp_path_factory.mktemp("browser") / "cost.json")
    with BackgroundServer(tiny_serve_config(cost_model=cost)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser, server: BackgroundServer) -> Iterator[Page]:
    context = browser.new_context()
    pg = context.new_page()
    console: list[str] = []
    pg.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    CONSOLE[id(pg)] = console
    pg.goto(server.url + "/")
    pg.wait_for_function("() => window.rollcast !== undefined", timeout=5000)
    try:
        yield pg
    finally:
        context.close()
        CONSOLE.pop(id(pg), None)


def wait_for(page: Page, expression: str, timeout_s: float, what: str) -> None:
    """Wait until `expression` (JS, over window.rollcast as `r`) is truthy; fail with the page's state."""
    try:
        page.wait_for_function(f"() => {{ const r = window.rollcast; return {expression}; }}",
                               timeout=timeout_s * 1000, polling=100)
    except PlaywrightTimeout:
        state = page.evaluate(
            "() => ({...window.rollcast, pc: undefined, dc: undefined, camera: undefined,"
            " status: document.getElementById('status').textContent,"
            " log: Array.from(document.querySelectorAll('#log li')).map((li) => li.textContent)})")
        pytest.fail(f"timed out waiting for {what}: {state}\nconsole: {CONSOLE.get(id(page))}")


def session_state(server: BackgroundServer, sid: str) -> dict:
    r = httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_text_stream_prompt_change_and_stop(page: Page, server: BackgroundServer) -> None:
    page.check("input[name=mode][value=t2v]")
    page.click("#start")
    wait_for(page, "r.framesDecoded >= 20", 20, "20 decoded frames")
    state = page.evaluate("() => ({ttff: window.rollcast.ttffMs, sid: window.rollcast.sessionId,"
                          " errors: window.rollcast.errors})")
    assert isinstance(state["ttff"], (int, float)) and state["ttff"] > 0, state
    sid = state["sid"]
    assert isinstance(sid, str) and sid
    assert session_state(server, sid)["state"] == "active"

    prompt = page.locator("#prompt")
    prompt.fill("blue waves under a full moon")
    prompt.dispatch_event("input")
    wait_for(page, "r.acks.some((a) => a.for === 'params.update' && Number.isInteger(a.applied_at_frame))",
             10, "an ack of the prompt change")
    acks = page.evaluate("() => window.rollcast.acks")
    ack = next(a for a in acks if a["for"] == "params.update")
    assert ack["applied_at_frame"] >= 0
    assert page.evaluate("() => window.rollcast.errors") == []

    page.click("#stop")
    deadline = time.monotonic() + 5
    while (info := session_state(server, sid))["state"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info["state"] == "finished", info
    assert info["reason"] in ("closed_by_client", "client_disconnected"), info
    assert info["stats"]["frames_sent"] >= 20
    assert page.is_disabled("#stop") and page.is_enabled("#start")


def test_webcam_stream(page: Page, server: BackgroundServer) -> None:
    page.check("input[name=mode][value=v2v]")
    page.click("#start")
    wait_for(page, "r.framesDecoded >= 10", 20, "10 decoded frames from the webcam stream")
    sid = page.evaluate("() => window.rollcast.sessionId")
    info = session_state(server, sid)
    assert info["state"] == "active", info
    assert info["transport"] == "webrtc", info
    page.click("#stop")
    deadline = time.monotonic() + 5
    while session_state(server, sid)["state"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_state(server, sid)["state"] == "finished"
