"""A run's traces -> the JSON report (stable snake_case keys) and the console summary table.

Per session: the `frame_metrics` numbers, SLO verdict and violations, and the server's own stats.
Per run:
- counts: requested, admitted (201), queued (202), rejected by reason (503/429), completed,
  errors by kind;
- `slo_attainment`: sessions that met their SLO / all requested (rejected and failed ones count
  as misses); `goodput`: SLO-meeting sessions per second of the arrival window;
- latency: TTFF and admission-wait percentiles over sessions; frame-interval percentiles and jitter
  over all received frames of all sessions pooled; `deadline_miss_rate` = all misses / all frames
  due; freezes, drops and repeats summed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from rollcast.loadgen.frame_metrics import fps_series, new_content, percentile_ms, session_metrics
from rollcast.loadgen.load_run import RunResult
from rollcast.loadgen.session_trace import SessionTrace
from rollcast.loadgen.slo import SLO

FORMAT = "rollcast-loadgen/1"


def session_report(trace: SessionTrace, slo: SLO, t_start: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": trace.index, "scheduled_s": round(trace.scheduled_s, 3),
        # later than scheduled when --max-concurrency held the session back
        "requested_s": round(trace.t_request - t_start, 3) if trace.t_request else None,
        "session_id": trace.session_id,
        "outcome": trace.outcome, "http_status": trace.http_status, "admission": trace.admission,
        "reject_reason": trace.reject_reason, "error": trace.error, "error_message": trace.error_message,
        "stop_reason": trace.stop_reason, "fps_target": trace.fps,
        "unmatched_frames": trace.unmatched_frames, "messages": dict(trace.messages),
    }
    metrics = (session_metrics(trace.frames, fps=trace.fps, t_request=trace.t_request,
                               admission_wait_s=trace.admission_wait_s,
                               ttff_budget_s=slo.ttff_ms / 1e3) if trace.frames else {})
    violations = slo.violations(metrics) if trace.outcome == "completed" else ["not_completed"]
    out.update(metrics)
    out["slo_met"] = not violations
    out["slo_violations"] = violations
    out["fps_series"] = fps_series_of(trace)
    out["server_stats"] = (trace.server_stats or {}).get("stats")
    return out


def fps_series_of(trace: SessionTrace) -> list[int]:
    return fps_series(new_content(trace.frames))


def build_report(result: RunResult) -> dict[str, Any]:
    cfg = result.config
    sessions = [session_report(t, cfg.slo, result.t_start) for t in result.traces]
    return {
        "format": FORMAT,
        "config": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("api_key", "slo")},
                   "slo": cfg.slo.bounds()},
        "server": _server_summary(result.server),
        "summary": summarize(result.traces, sessions, duration_s=cfg.duration_s, wall_s=result.wall_s),
        "sessions": sessions,
    }


def pooled_intervals_ms(traces: list[SessionTrace]) -> np.ndarray:
    """Every received frame's interval to the previous one, all sessions together."""
    parts = [np.diff([f.t for f in t.frames]) for t in traces if len(t.frames) > 1]
    return np.concatenate(parts) * 1e3 if parts else np.zeros(0)


def summarize(traces: list[SessionTrace], sessions: list[dict[str, Any]], *, duration_s: float,
              wall_s: float) -> dict[str, Any]:
    n = len(traces)
    met = sum(s["slo_met"] for s in sessions)
    streamed = [s for s in sessions if s.get("ttff_ms") is not None]
    intervals = pooled_intervals_ms(traces) / 1e3
    period = np.asarray([1.0 / t.fps for t in traces for _ in range(max(0, len(t.frames) - 1))])
    due = sum(_frames_due(s) for s in streamed)
    misses = sum(s["deadline_misses"] for s in streamed)
    violations = Counter(v for s in sessions for v in s["slo_violations"])
    delivered = [s["delivered_fps"] for s in streamed if s["delivered_fps"] is not None]
    return {
        "requested": n,
        "admitted": sum(t.admission == "admitted" for t in traces),
        "queued": sum(t.admission == "queued" for t in traces),
        "rejected": sum(t.outcome == "rejected" for t in traces),
        "rejected_by_reason": dict(Counter(t.reject_reason for t in traces if t.outcome == "rejected")),
        "completed": sum(t.outcome == "completed" for t in traces),
        "errors": sum(t.outcome == "error" for t in traces),
        "errors_by_kind": dict(Counter(t.error for t in traces if t.outcome == "error")),
        "slo_met": met,
        "slo_attainment": round(met / n, 6) if n else None,
        "goodput": round(met / duration_s, 6),
        "slo_violations": dict(violations),
        **_percentiles("ttff_ms", [s["ttff_ms"] / 1e3 for s in streamed]),
        **_percentiles("admission_wait_ms", [s["admission_wait_ms"] / 1e3 for s in streamed]),
        **_percentiles("frame_interval_ms", intervals),
        "jitter_p99_ms": percentile_ms(np.abs(intervals - period), 99) if intervals.size else None,
        "deadline_miss_rate": round(misses / due, 6) if due else None,
        "deadline_misses": misses,
        "freezes": sum(s["freezes"] for s in streamed),
        "frames_received": sum(s["frames_received"] for s in streamed),
        "frames_dropped": sum(s["frames_dropped"] for s in streamed),
        "repeated_frames": sum(s["repeated_frames"] for s in streamed),
        "mean_delivered_fps": round(float(np.mean(delivered)), 3) if delivered else None,
        "wall_s": round(wall_s, 3),
    }


def _frames_due(s: dict[str, Any]) -> int:
    return s["frames_delivered"] + s["frames_dropped"]


def _percentiles(name: str, seconds: Any) -> dict[str, float | None]:
    stem = name.removesuffix("_ms")
    return {f"p{q}_{stem}_ms": percentile_ms(seconds, q) for q in (50, 95, 99)}


def _server_summary(server: dict[str, Any]) -> dict[str, Any]:
    models = server.get("models") or [{}]
    return {k: v for k, v in models[0].items() if k != "params"}


# -- console -----------------------------------------------------------------------------------------

def summary_table(report: dict[str, Any]) -> str:
    """A fixed-width table of the headline numbers, for the terminal."""
    s, c = report["summary"], report["config"]
    rows = [
        ("sessions", f"{s['requested']} requested: {s['admitted']} admitted, {s['queued']} queued, "
                     f"{s['rejected']} rejected, {s['errors']} errors"),
        ("SLO", ", ".join(f"{k}={v:g}" for k, v in c["slo"].items())),
        ("SLO attainment", _pct(s["slo_attainment"])),
        ("goodput", f"{s['goodput']:.3f} sessions/s"),
        ("TTFF p50 / p95 / p99", _ms(s["p50_ttff_ms"], s["p95_ttff_ms"], s["p99_ttff_ms"])),
        ("admission wait p50 / p99", _ms(s["p50_admission_wait_ms"], s["p99_admission_wait_ms"])),
        ("frame interval p50 / p95 / p99",
         _ms(s["p50_frame_interval_ms"], s["p95_frame_interval_ms"], s["p99_frame_interval_ms"])),
        ("jitter p99", _ms(s["jitter_p99_ms"])),
        ("deadline miss rate", _pct(s["deadline_miss_rate"])),
        ("freezes / dropped / repeated", f"{s['freezes']} / {s['frames_dropped']} / {s['repeated_frames']}"),
        ("delivered fps (mean)", "-" if s["mean_delivered_fps"] is None
         else f"{s['mean_delivered_fps']:.2f}"),
    ]
    if s["rejected_by_reason"]:
        rows.append(("rejected by reason", _counts(s["rejected_by_reason"])))
    if s["errors_by_kind"]:
        rows.append(("errors by kind", _counts(s["errors_by_kind"])))
    width = max(len(k) for k, _ in rows)
    title = (f"rollcast loadgen: {c['transport']} {c['mode']}, {c['arrival']} {c['rate']:g}/s "
             f"for {c['duration_s']:g} s")
    return "\n".join([title, "-" * len(title), *(f"{k:<{width}}  {v}" for k, v in rows)])


def _ms(*values: float | None) -> str:
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values) + " ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _counts(counts: dict[str | None, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
