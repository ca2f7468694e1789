"""Prometheus metrics (prefix `rollcast_`, seconds, histograms where a distribution matters).

One `ServerMetrics` per app, on its own registry (tests run many apps in one process). Engine
events feed most of it (`on_engine_event`, called on the engine thread); the transports report
what only they see: frames sent, frame intervals, freezes, drops. Gauges that are a view of current
state (sessions by state, cache bytes, GPU memory) are read at scrape time from `gauges()`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rollcast.scheduler.events import EngineEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets from a frame interval (tens of ms) to a slow first frame (tens of s).
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.0625, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                    0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class _StateGauges(Collector):
    """Scrape-time gauges from a callable returning {metric suffix: {labels tuple: value}}."""

    def __init__(self, read: Callable[[], dict[str, object]]) -> None:
        self._read = read

    def collect(self):  # type: ignore[no-untyped-def]
        state = self._read()
        sessions = GaugeMetricFamily("rollcast_sessions", "Sessions by state", labels=["state"])
        for name, count in state.get("sessions", {}).items():  # type: ignore[union-attr]
            sessions.add_metric([name], count)
        yield sessions
        yield GaugeMetricFamily("rollcast_predicted_load", "Admission's predicted executor load (1 = full)",
                                value=float(state.get("predicted_load", 0.0)))  # type: ignore[arg-type]
        yield GaugeMetricFamily("rollcast_kv_cache_bytes", "Bytes of the preallocated KV cache pool",
                                value=float(state.get("kv_cache_bytes", 0)))  # type: ignore[arg-type]
        yield GaugeMetricFamily("rollcast_kv_cache_rows_used", "KV cache rows held by sessions",
                                value=float(state.get("kv_cache_rows_used", 0)))  # type: ignore[arg-type]
        yield GaugeMetricFamily("rollcast_gpu_memory_bytes", "GPU memory allocated by torch (0 on CPU)",
                                value=float(state.get("gpu_memory_bytes", 0)))  # type: ignore[arg-type]
        yield from _pipeline_metrics(state.get("pipelines", []))  # type: ignore[arg-type]


def _pipeline_metrics(pipelines: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    """Per replica (`--replicas`): its sessions, load, cache rows, whether it is being rebuilt
    and how many times it lost a stage."""
    families = {
        "active": GaugeMetricFamily("rollcast_pipeline_sessions", "Active sessions per pipeline",
                                    labels=["pipeline"]),
        "predicted_load": GaugeMetricFamily("rollcast_pipeline_predicted_load",
                                            "Admission's predicted load per pipeline (1 = full)",
                                            labels=["pipeline"]),
        "kv_cache_rows_used": GaugeMetricFamily("rollcast_pipeline_kv_cache_rows_used",
                                                "KV cache rows held per pipeline", labels=["pipeline"]),
        "rebuilding": GaugeMetricFamily("rollcast_pipeline_rebuilding",
                                        "1 while the pipeline is rebuilt after losing a stage",
                                        labels=["pipeline"]),
    }
    failures = CounterMetricFamily("rollcast_pipeline_failures", "Times a pipeline lost a stage",
                                   labels=["pipeline"])
    for p in pipelines:
        label = [str(p["pipeline"])]
        for key, family in families.items():
            family.add_metric(label, float(p[key]))  # type: ignore[arg-type]
        failures.add_metric(label, float(p["failures"]))  # type: ignore[arg-type]
    yield from families.values()
    yield failures


class ServerMetrics:
    def __init__(self, read_state: Callable[[], dict[str, object]]) -> None:
        r = self.registry = CollectorRegistry()
        self.admissions = Counter("rollcast_admissions", "Admission decisions", ["outcome", "reason"],
                                  registry=r)
        self.queue_wait = Histogram("rollcast_queue_wait_seconds", "Request to admission",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.ttff = Histogram("rollcast_ttff_seconds", "Session request to its first frame sent",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.frame_interval = Histogram("rollcast_frame_interval_seconds",
                                        "Time between consecutive frames sent to a client",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.generation_latency = Histogram(
            "rollcast_generation_latency_seconds", "A chunk's first forward to its frames decoded",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.chunk_lateness = Histogram("rollcast_chunk_lateness_seconds",
                                        "How late chunks were past their deadline (late chunks only)",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.deadline_misses = Counter("rollcast_deadline_misses", "Chunks ready after their deadline",
                                       registry=r)
        self.freezes = Counter("rollcast_freezes", "Runs of repeated frames because a chunk was late",
                               registry=r)
        self.repeated_frames = Counter("rollcast_repeated_frames", "Frames repeated while frozen",
                                       registry=r)
        self.drops = Counter("rollcast_frames_dropped", "Frames dropped by bounded queues", ["place"],
                             registry=r)
        self.frames_sent = Counter("rollcast_frames_sent", "Frames sent to clients", ["transport"],
                                   registry=r)
        self.frames_generated = Counter("rollcast_frames_generated", "Frames decoded by the engine",
                                        registry=r)
        self.batch_size = Histogram("rollcast_batch_size", "Forwards per micro-batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.stage_time = Histogram("rollcast_stage_seconds", "Time per micro-batch by stage", ["stage"],
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.degradations = Counter("rollcast_degradations", "Step/fps changes by direction",
                                    ["direction", "what"], registry=r)
        self.sessions_ended = Counter("rollcast_sessions_ended", "Sessions that ended, by outcome",
                                      ["outcome"], registry=r)
        self.rebuild_time = Histogram("rollcast_pipeline_rebuild_seconds",
                                      "A lost pipeline's rebuild: new stages started and connected",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.control_messages = Counter("rollcast_control_messages", "Control messages by type and result",
                                        ["type", "result"], registry=r)
        r.register(_StateGauges(read_state))

    def on_engine_event(self, e: EngineEvent) -> None:
        d = e.data
        if e.kind == "admitted":
            self.admissions.labels("admitted", "").inc()
            self.queue_wait.observe(float(d.get("wait_s", 0.0)))
        elif e.kind == "queued":
            self.admissions.labels("queued", "capacity_exhausted").inc()
        elif e.kind == "rejected":
            self.admissions.labels("rejected", str(d.get("reason", ""))).inc()
        elif e.kind == "frames_ready":
            self.frames_generated.inc(int(d.get("num_frames", 0)))
            if "generation_s" in d:
                self.generation_latency.observe(float(d["generation_s"]))
        elif e.kind == "deadline_miss":
            self.deadline_misses.inc()
            self.chunk_lateness.observe(float(d.get("late_s", 0.0)))
        elif e.kind in ("degraded", "recovered"):
            self.degradations.labels(e.kind, str(d.get("what", ""))).inc()
        elif e.kind in ("finished", "failed"):
            outcome = "failed" if e.kind == "failed" else str(d.get("reason", "finished"))
            self.sessions_ended.labels(outcome).inc()
        elif e.kind == "pipeline_rebuilt":
            self.rebuild_time.observe(float(d.get("seconds", 0.0)))
        elif e.kind == "batch_done":
            self.batch_size.observe(int(d.get("size", 0)))
            for stage, seconds in dict(d.get("stages", {})).items():
                self.stage_time.labels(stage).observe(float(seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)
