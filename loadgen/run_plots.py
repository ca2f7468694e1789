"""PNG plots of a load-generator report: TTFF CDF, frame-interval CDF, delivered fps over time.

Drawn from the JSON report and the run's pooled frame intervals (those are not in the JSON).
A bare `Figure` (no pyplot) renders through Agg on save: no display and no global backend state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def _cdf(ax: Any, values_ms: np.ndarray, *, label: str, color: str) -> None:
    if values_ms.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    x = np.sort(values_ms)
    ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=label, color=color)


def write_plots(report: dict[str, Any], intervals_ms: np.ndarray, out: str | Path) -> Path:
    """One PNG with three panels; returns its path."""
    sessions = report["sessions"]
    slo = report["config"]["slo"]
    fig = Figure(figsize=(16, 4.5), layout="constrained")
    ax_ttff, ax_iv, ax_fps = fig.subplots(1, 3)

    ttff = np.asarray([s["ttff_ms"] for s in sessions if s.get("ttff_ms") is not None], dtype=float)
    _cdf(ax_ttff, ttff, label="TTFF", color="tab:blue")
    if "ttff_ms" in slo:
        ax_ttff.axvline(slo["ttff_ms"], color="tab:red", linestyle="--", label=f"SLO {slo['ttff_ms']:g} ms")
    ax_ttff.set(title="Time to first frame", xlabel="ms", ylabel="fraction of sessions")

    _cdf(ax_iv, intervals_ms, label="all frames", color="tab:green")
    fps = report["server"].get("fps")
    if fps:
        ax_iv.axvline(1e3 / fps, color="gray", linestyle=":", label=f"1/fps = {1e3 / fps:.1f} ms")
    if "interval_p99_ms" in slo:
        ax_iv.axvline(slo["interval_p99_ms"], color="tab:red", linestyle="--", label="SLO p99")
    ax_iv.set(title="Frame interval", xlabel="ms", ylabel="fraction of intervals")

    for s in sessions:
        series = s.get("fps_series") or []
        if series:
            t0 = s["requested_s"] + s["ttff_ms"] / 1e3
            ax_fps.plot(t0 + np.arange(len(series)) + 0.5, series, linewidth=0.8, alpha=0.7)
    if fps:
        ax_fps.axhline(fps, color="gray", linestyle=":")
    ax_fps.set(title="Delivered fps per session", xlabel="run time (s)", ylabel="new frames per second")

    for ax in (ax_ttff, ax_iv):
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    ax_fps.grid(alpha=0.3)
    summary = report["summary"]
    fig.suptitle(f"{report['config']['transport']} {report['config']['mode']}: "
                 f"attainment {100 * (summary['slo_attainment'] or 0):.1f} %, goodput "
                 f"{summary['goodput']:.3f} sessions/s")
    path = Path(out)
    fig.savefig(path, dpi=110)
    return path
