"""`rollcast loadgen` against a live tiny `rollcast serve` on loopback, over both transports: the JSON
report is complete, frame counts and ids are exact, rejections are counted by reason; bad flags
exit 2 with a message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollcast.loadgen.load_config import LoadConfig
from rollcast.server.background import BackgroundServer
from rollcast.server.cli import main
from tests.server_helpers import fixed_cost_model, tiny_serve_config

FPS = 16
SESSION_S = 2.5
SUMMARY_KEYS = {
    "requested", "admitted", "queued", "rejected", "rejected_by_reason", "completed", "errors",
    "errors_by_kind", "slo_met", "slo_attainment", "goodput", "slo_violations", "p50_ttff_ms", "p95_ttff_ms",
    "p99_ttff_ms", "p50_admission_wait_ms", "p95_admission_wait_ms", "p99_admission_wait_ms",
    "p50_frame_interval_ms", "p95_frame_interval_ms", "p99_frame_interval_ms", "jitter_p99_ms",
    "deadline_miss_rate", "deadline_misses", "freezes", "frames_received", "frames_dropped",
    "repeated_frames", "mean_delivered_fps", "wall_s",
}
SESSION_KEYS = {
    "index", "scheduled_s", "requested_s", "session_id", "outcome", "http_status", "admission",
    "reject_reason", "error", "error_message", "stop_reason", "fps_target", "unmatched_frames", "messages",
    "ttff_ms", "admission_wait_ms", "frames_received", "frames_delivered", "repeated_frames",
    "frames_dropped",
    "p50_frame_interval_ms", "p95_frame_interval_ms", "p99_frame_interval_ms", "jitter_p99_ms", "freezes",
    "deadline_misses", "deadline_miss_rate", "delivered_fps", "streamed_s", "slo_met", "slo_violations",
    "fps_series", "server_stats",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    cost = fixed_cost_model(tmp_path_factory.mktemp("loadgen") / "cost.json")
    with BackgroundServer(tiny_serve_config(cost_model=cost)) as srv:
        yield srv


def _loadgen(url: str, tmp: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    out = tmp / "run.json"
    rc = main(["loadgen", "--url", url, "--no-progress", "--json", str(out), "--session-seconds",
               str(SESSION_S), "--first-frame-timeout", "10", *flags])
    return rc, json.loads(out.read_text())


def _expected_sessions(rate: float, duration: float, seed: int) -> int:
    return len(LoadConfig(url="http://x", rate=rate, duration_s=duration, seed=seed).arrivals())


def _check_streamed(s: dict[str, Any]) -> None:
    """One session that streamed SESSION_S seconds of a healthy 16 fps stream."""
    assert s["outcome"] == "completed" and s["stop_reason"] == "closed_by_client", s
    # Frames received from the first one through SESSION_S later: 1 + 2.5 x 16 = 41 (pacing jitter +-2).
    # A stall of the shared test machine (CI has 2 cores) costs the frames it lasted, since a live
    # stream resumes at its pace instead of bursting; the client reports it as a freeze, so only a
    # session with one may fall short, and it must still have streamed to the end.
    expected = 1 + SESSION_S * FPS
    assert s["frames_received"] <= expected + 2, s["frames_received"]
    floor = expected - 2 if s["freezes"] == 0 else 0.75 * expected
    assert s["frames_received"] >= floor, (s["frames_received"], s["freezes"])
    assert s["streamed_s"] == pytest.approx(SESSION_S, abs=0.15)
    assert s["frames_dropped"] == 0 and s["unmatched_frames"] == 0
    assert s["frames_delivered"] + s["repeated_frames"] == s["frames_received"]
    assert 0 < s["ttff_ms"] < 3000
    assert s["p50_frame_interval_ms"] == pytest.approx(1000 / FPS, abs=6)
    assert s["server_stats"]["frames_sent"] >= s["frames_received"]
    assert s["messages"].get("stream_stopped") == 1


def test_ws_t2v_run_gives_a_complete_report_and_plot(server: BackgroundServer, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    n = _expected_sessions(1.5, 2.0, seed=3)
    assert n >= 2
    plot = tmp_path / "run.png"
    rc, report = _loadgen(server.url, tmp_path, "--transport", "ws", "--rate", "1.5", "--duration", "2",
                          "--seed", "3", "--plot", str(plot), "--slo", "ttff_ms=3000,deadline_miss_rate=none")
    assert rc == 0
    assert report["format"] == "rollcast-loadgen/1"
    assert report["config"]["transport"] == "ws" and report["config"]["slo"] == {"ttff_ms": 3000.0}
    assert report["server"]["id"] == "tiny" and report["server"]["resolution"] == "64x64"
    s = report["summary"]
    assert set(s) == SUMMARY_KEYS
    assert (s["requested"], s["admitted"], s["completed"], s["errors"], s["rejected"]) == (n, n, n, 0, 0)
    assert s["slo_met"] == n and s["slo_attainment"] == 1.0 and s["goodput"] == pytest.approx(n / 2.0)
    assert len(report["sessions"]) == n
    for sess in report["sessions"]:
        assert set(sess) == SESSION_KEYS
        _check_streamed(sess)
    assert s["frames_received"] == sum(x["frames_received"] for x in report["sessions"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "SLO attainment" in out and "100.0 %" in out


def test_webrtc_t2v_run_matches_frame_ids(server: BackgroundServer, tmp_path: Path) -> None:
    n = _expected_sessions(1.0, 1.5, seed=5)
    rc, report = _loadgen(server.url, tmp_path, "--transport", "webrtc", "--rate", "1", "--duration", "1.5",
                          "--seed", "5", "--slo", "ttff_ms=3000")
    assert rc == 0 and report["summary"]["requested"] == n >= 1
    assert report["summary"]["completed"] == n, report["summary"]["errors_by_kind"]
    for sess in report["sessions"]:
        _check_streamed(sess)
        assert sess["frames_delivered"] >= 35  # ids came through the data channel, none unknown


def test_ws_v2v_run_streams_a_synthetic_camera(server: BackgroundServer, tmp_path: Path) -> None:
    rc, report = _loadgen(server.url, tmp_path, "--transport", "ws", "--mode", "v2v", "--rate", "1",
                          "--duration", "1.5", "--seed", "5", "--slo", "ttff_ms=3000")
    assert rc == 0 and report["summary"]["completed"] == report["summary"]["requested"] >= 1
    for sess in report["sessions"]:
        _check_streamed(sess)
        assert sess["server_stats"]["frames_generated"] >= 21  # input arrived: blocks were generated


def test_rejections_are_counted_by_reason(server: BackgroundServer, tmp_path: Path) -> None:
    n = _expected_sessions(4.0, 1.0, seed=0)
    # 1 ms to the first frame cannot be met even by an idle server: 503 slo_infeasible for every one.
    rc, report = _loadgen(server.url, tmp_path, "--rate", "4", "--duration", "1", "--seed", "0",
                          "--slo", "ttff_ms=1")
    s = report["summary"]
    assert rc == 0 and s["requested"] == n >= 2
    assert s["rejected"] == n and s["rejected_by_reason"] == {"slo_infeasible": n}
    assert s["slo_attainment"] == 0.0 and s["goodput"] == 0.0 and s["p50_ttff_ms"] is None
    assert all(x["slo_violations"] == ["not_completed"] and x["http_status"] == 503
               for x in report["sessions"])


@pytest.mark.parametrize(("flags", "needle"), [
    (["--rate", "0"], "--rate: expected a positive number"),
    (["--transport", "pigeon"], "--transport: invalid choice"),
    (["--url", "ftp://host"], "--url: expected an http(s)://HOST:PORT URL"),
    (["--slo", "ttff_ms=soon"], "--slo: ttff_ms must be a number"),
    (["--max-concurrency", "0"], "--max-concurrency: expected a positive integer"),
    (["--plot", "out.txt"], "--plot writes a PNG"),
    (["--json", "/nonexistent-dir/x.json"], "--json: directory /nonexistent-dir does not exist"),
    (["--url", "http://127.0.0.1:9"], "cannot reach the server at http://127.0.0.1:9"),
])
def test_bad_flags_exit_2_with_a_message(flags: list[str], needle: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["loadgen", "--no-progress", "--duration", "1", *flags]))
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
