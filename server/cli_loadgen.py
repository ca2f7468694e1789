"""`rollcast loadgen`: open many real client sessions against a running server (WebRTC or the
WebSocket transport), time every received frame, and report TTFF, jitter and SLO attainment."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from rollcast.loadgen.load_config import TRANSPORTS, LoadConfig
from rollcast.loadgen.load_run import LoadgenError, run_load
from rollcast.loadgen.run_plots import write_plots
from rollcast.loadgen.run_report import build_report, pooled_intervals_ms, summary_table
from rollcast.loadgen.session_trace import SessionTrace
from rollcast.loadgen.slo import SLO
from rollcast.scheduler.arrivals import ARRIVALS
from rollcast.server.cli_args import positive_float, positive_int
from rollcast.server.runtime import API_KEY_ENV


def _url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"expected an http(s)://HOST:PORT URL, got {text!r}")
    return text.rstrip("/")


def _slo(text: str) -> SLO:
    try:
        return SLO.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--slo: ")) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", type=_url, default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--transport", choices=TRANSPORTS, default="ws")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    p.add_argument("--rate", type=positive_float, default=0.5, help="session arrivals per second")
    p.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="gamma: coefficient of variation of inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", type=positive_int, default=None,
                   help="at most this many sessions at once (later arrivals wait for a slot)")
    p.add_argument("--duration", type=positive_float, default=30.0, help="seconds of arrivals")
    p.add_argument("--session-seconds", type=positive_float, default=10.0,
                   help="each session streams this long after its first frame")
    p.add_argument("--mode", choices=("t2v", "v2v"), default="t2v",
                   help="v2v clients send a synthetic moving-bar camera")
    p.add_argument("--slo", type=_slo, default=SLO(),
                   help="per-session SLO, e.g. ttff_ms=1000,interval_p99_ms=100 (keys: ttff_ms, "
                        "interval_p99_ms, jitter_p99_ms, deadline_miss_rate, freezes, dropped_frames, "
                        "min_fps; default ttff_ms=1000,deadline_miss_rate=0.01)")
    p.add_argument("--prompt", default=LoadConfig.prompt)
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the server's)")
    p.add_argument("--first-frame-timeout", type=positive_float, default=30.0,
                   help="a session with no frame this long after connecting is an error")
    p.add_argument("--seed", type=int, default=0, help="arrival times and per-session seeds")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"default: ${API_KEY_ENV}")
    p.add_argument("--json", type=Path, help="write the full report (config, summary, per session) here")
    p.add_argument("--plot", type=Path, help="write a PNG: TTFF CDF, frame-interval CDF, fps over time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _check_outputs(args: argparse.Namespace) -> None:
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{flag}: directory {path.parent} does not exist")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ValueError(f"--plot writes a PNG; give a .png path, got {args.plot}")


def run(args: argparse.Namespace) -> int:
    _check_outputs(args)
    cfg = LoadConfig(url=args.url, transport=args.transport, arrival=args.arrival, rate=args.rate,
                     burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                     duration_s=args.duration, session_seconds=args.session_seconds, mode=args.mode,
                     slo=args.slo, seed=args.seed, prompt=args.prompt, steps=args.steps,
                     first_frame_timeout_s=args.first_frame_timeout, api_key=args.api_key)
    bar = tqdm(total=len(cfg.arrivals()), unit="session", file=sys.stderr, disable=args.no_progress,
               desc="loadgen")
    tally = {"ok": 0, "rejected": 0, "error": 0}

    def on_done(trace: SessionTrace) -> None:
        key = {"completed": "ok", "rejected": "rejected"}.get(trace.outcome, "error")
        tally[key] += 1
        bar.update(1)
        bar.set_postfix(tally, refresh=False)

    try:
        result = asyncio.run(run_load(cfg, on_done))
    except LoadgenError as e:
        raise ValueError(str(e)) from None
    finally:
        bar.close()
    report = build_report(result)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        write_plots(report, pooled_intervals_ms(result.traces), args.plot)
    print(summary_table(report))
    return 0
