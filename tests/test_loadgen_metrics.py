"""The load generator's arithmetic on hand-made frame-time sequences: intervals, jitter, the freeze
rule, frame-id gaps, deadlines, SLO verdicts and the run summary; WebRTC pts matching; arrivals."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from rollcast.loadgen.frame_metrics import (
    FrameArrival,
    fps_series,
    freeze_count,
    new_content,
    session_metrics,
)
from rollcast.loadgen.load_config import LoadConfig
from rollcast.loadgen.load_run import RunResult
from rollcast.loadgen.run_report import build_report, summary_table
from rollcast.loadgen.session_trace import SessionTrace
from rollcast.loadgen.slo import SLO
from rollcast.loadgen.webrtc_client import match_frames
from rollcast.scheduler.arrivals import arrival_times


def _frames(times: list[float], ids: list[int] | None = None, repeated: set[int] = frozenset()
            ) -> list[FrameArrival]:
    ids = list(range(len(times))) if ids is None else ids
    return [FrameArrival(t, i, k in repeated) for k, (t, i) in enumerate(zip(times, ids, strict=True))]


def _metrics(frames: list[FrameArrival], *, fps: float = 10.0, wait: float = 0.0, budget: float = 1.0,
             t_request: float = 0.0) -> dict:
    return session_metrics(frames, fps=fps, t_request=t_request, admission_wait_s=wait, ttff_budget_s=budget)


def test_a_perfect_stream() -> None:
    m = _metrics(_frames([0.5 + 0.1 * k for k in range(21)]))
    assert m["ttff_ms"] == pytest.approx(500.0)
    assert m["p50_frame_interval_ms"] == pytest.approx(100.0)
    assert m["p99_frame_interval_ms"] == pytest.approx(100.0)
    assert m["jitter_p99_ms"] == pytest.approx(0.0, abs=1e-6)
    assert (m["freezes"], m["frames_dropped"], m["deadline_misses"]) == (0, 0, 0)
    assert m["deadline_miss_rate"] == 0.0
    assert m["delivered_fps"] == pytest.approx(10.0)
    assert (m["frames_received"], m["frames_delivered"]) == (21, 21)


def test_interval_percentiles_and_jitter_by_hand() -> None:
    # Intervals 0.1, 0.1, 0.1, 0.2 (ms: 100, 100, 100, 200); linear interpolation as numpy's.
    m = _metrics(_frames([0.0, 0.1, 0.2, 0.3, 0.5]), fps=10.0)
    assert m["p50_frame_interval_ms"] == pytest.approx(100.0)
    assert m["p95_frame_interval_ms"] == pytest.approx(185.0)  # rank 0.95 x 3 = 2.85 of 0..3
    assert m["p99_frame_interval_ms"] == pytest.approx(197.0)
    # |interval - 100 ms| = 0, 0, 0, 100 -> p99 = 97 ms
    assert m["jitter_p99_ms"] == pytest.approx(97.0)


def test_freeze_rule_three_times_the_mean() -> None:
    iv = np.array([0.1] * 9 + [0.45])  # mean 0.135: max(0.405, 0.285) = 0.405 <= 0.45
    assert freeze_count(iv) == 1
    iv = np.array([0.1] * 9 + [0.40])  # mean 0.13: bound 0.39 <= 0.40 still
    assert freeze_count(iv) == 1
    iv = np.array([0.1] * 9 + [0.38])  # mean 0.128: bound 0.384 > 0.38
    assert freeze_count(iv) == 0


def test_freeze_rule_mean_plus_150_ms_binds_at_high_fps() -> None:
    # 20 ms frames: 3 x mean is far below mean + 150 ms, which is the bound that counts.
    base = [0.02] * 19
    mean_a = (sum(base) + 0.19) / 20  # 0.0285 -> bound max(0.0855, 0.1785) = 0.1785 <= 0.19
    assert freeze_count(np.array([*base, 0.19])) == 1 and mean_a + 0.15 <= 0.19
    assert freeze_count(np.array([*base, 0.16])) == 0  # mean 0.027: bound 0.177 > 0.16


def test_server_repeats_are_a_freeze_of_the_picture_not_of_the_cadence() -> None:
    # Frames arrive every 100 ms, but ids 3..6 are the pacer repeating frame 2 (late chunk).
    times = [0.1 * k for k in range(14)]
    ids = [0, 1, 2, 2, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9]
    m = _metrics(_frames(times, ids, repeated={3, 4, 5, 6}))
    assert m["p99_frame_interval_ms"] == pytest.approx(100.0)  # the cadence is perfect
    assert m["repeated_frames"] == 4
    # New content: 0.0, 0.1, 0.2, then 0.7: a 500 ms gap against a mean of 0.9/9 = 0.1 s -> freeze.
    assert m["freezes"] == 1
    assert m["frames_delivered"] == 10 and m["frames_dropped"] == 0
    assert [f.frame_id for f in new_content(_frames(times, ids, repeated={3, 4, 5, 6}))] == list(range(10))


def test_frame_id_gaps_are_drops_and_misses() -> None:
    frames = _frames([0.5, 0.6, 0.7, 1.0, 1.1], ids=[0, 1, 2, 5, 6])
    m = _metrics(frames, budget=1.0)
    assert m["frames_dropped"] == 2
    # Due: 1.0 + 0.1 i; all arrivals are on time, ids 3 and 4 never came: 2 misses of 7 due.
    assert m["deadline_misses"] == 2
    assert m["deadline_miss_rate"] == pytest.approx(2 / 7, abs=1e-6)
    # A stream whose first frames were dropped: ids start at 3.
    assert _metrics(_frames([0.2, 0.3], ids=[3, 4]))["frames_dropped"] == 3


def test_deadlines_count_from_admission_plus_ttff_budget() -> None:
    # Request at t=10, admitted 0.5 s later, TTFF budget 1 s, 10 fps: frame i due at 11.5 + 0.1 i.
    times = [11.2, 11.6, 11.75, 11.85]  # ids 0..3 due 11.5, 11.6, 11.7, 11.8
    m = _metrics(_frames(times), wait=0.5, t_request=10.0)
    assert m["ttff_ms"] == pytest.approx(1200.0)
    assert m["admission_wait_ms"] == pytest.approx(500.0)
    assert m["deadline_misses"] == 2  # ids 2 and 3 (id 1 is exactly on time)


def test_duplicate_ids_and_fps_series() -> None:
    frames = _frames([0.0, 0.05, 0.5, 1.0, 1.2, 2.5], ids=[0, 0, 1, 2, 3, 4])
    assert [f.frame_id for f in new_content(frames)] == [0, 1, 2, 3, 4]
    # Windows [0,1): ids 0, 1; [1,2): 2, 3; [2, 2.5) is partial and left out.
    assert fps_series(new_content(frames)) == [2, 2]


def test_slo_parse_and_violations() -> None:
    slo = SLO.parse("ttff_ms=500, interval_p99_ms=80,min_fps=15")
    assert slo.bounds() == {"ttff_ms": 500.0, "interval_p99_ms": 80.0, "deadline_miss_rate": 0.01,
                            "min_fps": 15.0}
    ok = {"ttff_ms": 400, "p99_frame_interval_ms": 70, "deadline_miss_rate": 0.0, "delivered_fps": 16}
    assert slo.violations(ok) == []
    bad = {**ok, "ttff_ms": 600, "delivered_fps": 12.0, "p99_frame_interval_ms": None}
    assert slo.violations(bad) == ["ttff_ms", "interval_p99_ms", "min_fps"]
    assert SLO.parse("deadline_miss_rate=none").bounds() == {"ttff_ms": 1000.0}
    for text, needle in (("speed=1", "KEY one of"), ("ttff_ms", "KEY=VALUE"), ("ttff_ms=fast", "a number"),
                         ("ttff_ms=-5", "above 0"), ("ttff_ms=none", "cannot be removed"),
                         ("freezes=nan", "above 0")):
        with pytest.raises(ValueError, match=needle):
            SLO.parse(text)


def _trace(index: int, outcome: str, *, frames: list[FrameArrival] = (), **kw: object) -> SessionTrace:
    t = SessionTrace(index, float(index), t_request=0.0, fps=10.0, **kw)  # type: ignore[arg-type]
    t.outcome = outcome  # type: ignore[assignment]
    t.frames = list(frames)
    return t


def test_run_summary_counts_attainment_and_goodput() -> None:
    good = _frames([0.3 + 0.1 * k for k in range(30)])
    late = _frames([1.5 + 0.1 * k for k in range(30)])  # TTFF 1.5 s > 1 s, and every frame late
    traces = [
        _trace(0, "completed", frames=good, admission="admitted"),
        _trace(1, "completed", frames=good, admission="queued"),
        _trace(2, "completed", frames=late, admission="admitted"),
        _trace(3, "rejected", reject_reason="capacity_exhausted"),
        _trace(4, "rejected", reject_reason="too_many_sessions"),
        _trace(5, "error", error="no_first_frame", admission="admitted"),
    ]
    cfg = LoadConfig(url="http://127.0.0.1:1", duration_s=20.0)
    report = build_report(RunResult(cfg, {"models": [{"id": "tiny", "fps": 10.0, "params": {}}]}, traces,
                                    t_start=0.0, wall_s=25.0))
    s = report["summary"]
    assert (s["requested"], s["admitted"], s["queued"], s["rejected"], s["completed"], s["errors"]) == \
        (6, 3, 1, 2, 3, 1)
    assert s["rejected_by_reason"] == {"capacity_exhausted": 1, "too_many_sessions": 1}
    assert s["errors_by_kind"] == {"no_first_frame": 1}
    assert s["slo_met"] == 2 and s["slo_attainment"] == pytest.approx(2 / 6, abs=1e-6)
    assert s["goodput"] == pytest.approx(2 / 20)
    assert s["slo_violations"] == {"ttff_ms": 1, "deadline_miss_rate": 1, "not_completed": 3}
    assert s["deadline_misses"] == 30 and s["deadline_miss_rate"] == pytest.approx(30 / 90, abs=1e-6)
    assert s["p50_ttff_ms"] == pytest.approx(300.0) and s["p99_ttff_ms"] == pytest.approx(1476.0)
    assert s["frames_received"] == 90 and s["p99_frame_interval_ms"] == pytest.approx(100.0)
    assert report["server"] == {"id": "tiny", "fps": 10.0}
    assert "api_key" not in report["config"] and report["config"]["slo"] == {"ttff_ms": 1000.0,
                                                                            "deadline_miss_rate": 0.01}
    assert [x["slo_met"] for x in report["sessions"]] == [True, True, False, False, False, False]
    table = summary_table(report)
    assert "33.3 %" in table and "capacity_exhausted: 1" in table and "no_first_frame: 1" in table


def test_webrtc_pts_matching_finds_the_offset() -> None:
    # 16 fps in 90 kHz ticks; frame 4 a repeat. aiortc counts pts from the first packet it got.
    server = {k * 5625: (k, k == 4) for k in range(10)}
    # The client decoded frames 0..7 and stopped; frames 8, 9 went out before the DELETE. Shifts of
    # 0, 1, 2 frames all match 8 pts: the earliest (the first frame sent) is taken.
    decoded = [(1.0 + 0.0625 * k, k * 5625) for k in range(8)] + [(9.0, 123)]
    frames, unmatched = match_frames(decoded, server)
    assert [f.frame_id for f in frames] == list(range(8))
    assert [f.repeated for f in frames] == [k == 4 for k in range(8)]
    assert unmatched == 1
    # The server's replay ring no longer held frames 0, 1: the client's pts 0 is the server's frame 2.
    late = {pts: v for pts, v in server.items() if v[0] >= 2}
    frames, unmatched = match_frames([(1.0 + 0.0625 * k, (k - 2) * 5625) for k in range(2, 10)], late)
    assert [f.frame_id for f in frames] == list(range(2, 10)) and unmatched == 0
    assert match_frames(decoded, {}) == ([], len(decoded))


def test_arrivals_are_seeded_with_the_asked_rate_and_burstiness() -> None:
    a = arrival_times(2.0, 2000.0, seed=7)
    assert a == arrival_times(2.0, 2000.0, seed=7) != arrival_times(2.0, 2000.0, seed=8)
    assert len(a) / 2000.0 == pytest.approx(2.0, rel=0.05)
    gaps = np.diff(a)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.08)  # Poisson
    g = np.diff(arrival_times(2.0, 2000.0, arrival="gamma", burstiness=3.0, seed=7))
    assert len(g) / 2000.0 == pytest.approx(2.0, rel=0.1)
    assert statistics.pstdev(g) / statistics.mean(g) == pytest.approx(3.0, rel=0.15)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(1.0, 10.0, arrival="gamma", burstiness=0.0)
    with pytest.raises(ValueError, match="positive"):
        arrival_times(0.0, 10.0)
