"""The engine: one loop that owns all scheduling state and drives an executor.

Four verbs per tick:
- `schedule(now)`: admit queued sessions that now fit, let the degradation controller act, and
  ask the policy for the next micro-batch;
- `submit(batch)`: hand it to the executor;
- `collect()`: wait for the executor's result;
- `update(result)`: advance the sessions, stamp finished chunks against their deadlines, feed the
  measured time back into the cost model, emit events.

Clients call `open_session` / `close_session` / `set_steps` / `set_prompt` / `push_input` from any
thread; the engine's lock serialises them with the loop (never held during a forward), and
`push_input` wakes a loop that waits for a v2v session's input. The loop runs in its own thread
(`start`) for serving, or is stepped directly (`tick`, `run_until`) on a fake clock by tests and
the simulator.

A result with `lost` set means the executor's pipeline lost a stage: the engine pauses its
sessions (`degraded`, what: pipeline), has the executor `rebuild` on the next tick, and resumes
them (`recovered`) or ends those the executor could not carry over.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rollcast.scheduler.admission import AdmissionConfig, AdmissionController, AdmissionDecision, spec_of
from rollcast.scheduler.clock import Clock
from rollcast.scheduler.cost_model import CostModel
from rollcast.scheduler.degradation import Change, DegradationConfig, DegradationController
from rollcast.scheduler.events import EngineEvent, EventKind
from rollcast.scheduler.executor import CapacityError, Executor
from rollcast.scheduler.policies import Policy
from rollcast.scheduler.session import BlockGeometry, SessionRecord, SessionRequest
from rollcast.scheduler.work import BatchResult, MicroBatch


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    learn_costs: bool = True  # update the cost model from measured batch times
    # A block may start at most its session's TTFF plus this long before its deadline (None: as
    # early as possible). Live streams need a bound: frames made far ahead only wait in queues.
    max_lead_s: float | None = 1.0


class Engine:
    def __init__(
        self,
        executor: Executor,
        cost: CostModel,
        policy: Policy,
        *,
        clock: Clock,
        geometry: Callable[[SessionRequest], BlockGeometry],
        config: EngineConfig | None = None,
        on_event: Callable[[EngineEvent], None] | None = None,
    ) -> None:
        self.executor = executor
        self.cost = cost
        self.policy = policy
        self.clock = clock
        self.geometry = geometry
        self.config = config or EngineConfig()
        self.admission = AdmissionController(self.config.admission, cost, self.config.max_batch)
        self.degradation = DegradationController(self.config.degradation)
        self.sessions: dict[str, SessionRecord] = {}  # every session ever seen, by id
        self.active: dict[str, SessionRecord] = {}
        self.queue: deque[SessionRecord] = deque()
        # Recent events for inspection (tests, the simulator, debugging); frames are not kept.
        self.events: deque[EngineEvent] = deque(maxlen=200_000)
        self._on_event = on_event
        self._misses_since_check = 0
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._running = False
        # Submitted, not yet through `update`, oldest first: up to the executor's depth (one per
        # pipeline stage), each of different sessions' lanes.
        self._in_flight: list[MicroBatch] = []
        self.admission.parallelism = max(1, self.depth)
        self._next_release: float | None = None  # when pacing next lets a held block start
        self._block_t0: dict[tuple[str, int], float] = {}  # (session, block) -> its first forward
        self.batches = 0
        self.batched_items = 0
        self.max_in_flight = 0  # the most micro-batches the executor held at once
        # Fault recovery: a result reporting the pipeline lost pauses every session; the loop then
        # has the executor rebuild it and carry them over. Meanwhile `rebuilding` is set and
        # admission refuses newcomers (a replica set places them elsewhere).
        self.pipeline_failures = 0
        self.rebuilding = False
        self._lost: str | None = None
        self._next_rebuild = -math.inf

    # -- client calls (any thread) -------------------------------------------------------------

    def open_session(self, request: SessionRequest) -> AdmissionDecision:
        with self._lock:
            if request.session_id in self.sessions:
                raise ValueError(f"session {request.session_id!r} exists already")
            now = self.clock.now()
            rec = SessionRecord(request, self.geometry(request), t_arrival=now)
            rec.lanes = self.policy.lanes(request)
            self.sessions[request.session_id] = rec
            decision = self._decide(rec, now, allow_queue=True)
            if decision.outcome == "admitted":
                decision = self._admit(rec, now, decision)
            elif decision.outcome == "queued":
                self.queue.append(rec)
                self._emit("queued", now, rec, position=decision.queue_position,
                           estimated_wait_s=decision.estimated_wait_s)
            else:
                rec.state = "rejected"
                self._emit("rejected", now, rec, reason=decision.reason,
                           retry_after_s=decision.retry_after_s)
            self._wake.notify_all()
            return decision

    def preview(self, request: SessionRequest) -> AdmissionDecision:
        """What `open_session` would decide for `request` now, changing nothing (replica placement)."""
        with self._lock:
            rec = SessionRecord(request, self.geometry(request), t_arrival=self.clock.now())
            rec.lanes = self.policy.lanes(request)
            decision = self._decide(rec, rec.t_arrival, allow_queue=True)
            if decision.outcome == "admitted" and not self.policy.admission:
                # No admission control, but placement still wants the load it would bring.
                specs = [*(spec_of(r) for r in self.active.values()), spec_of(rec)]
                decision = dataclasses.replace(decision, predicted_load=self.admission.load(specs))
            return decision

    def close_session(self, session_id: str, reason: str = "closed") -> None:
        with self._lock:
            rec = self.sessions.get(session_id)
            if rec is None:
                raise KeyError(session_id)
            now = self.clock.now()
            if rec in self.queue:
                self.queue.remove(rec)
            if rec.state in ("active", "queued"):
                self._end(rec, now, "finished", reason=reason)

    def set_steps(self, session_id: str, steps: int) -> int:
        """Change an active session's denoising steps from the block after the one it is on
        (whether or not that one has started); returns that block's first frame. The executor
        hears of it when the switch happens (`update`)."""
        with self._lock:
            rec = self.active[session_id]
            if not 1 <= steps <= rec.request.steps:
                raise ValueError(f"steps must lie in [1, {rec.request.steps}], got {steps}")
            rec.set_steps(steps)
            return rec.geometry.first_frame_of(rec.lane_block[0] + 1)

    def set_prompt(self, session_id: str, prompt: object, transition_blocks: int = 0) -> int:
        """Change an active session's prompt from the next block to start on (at once, or blended
        over `transition_blocks` blocks); returns that block's first frame."""
        with self._lock:
            rec = self.active[session_id]
            self.executor.set_prompt(session_id, prompt, transition_blocks)
            return rec.geometry.first_frame_of(self._next_block_start(rec))

    def push_input(self, session_id: str, frames: object) -> int:
        """Hand a v2v session input frames (uint8 [T, H, W, 3]) from any thread. The executor only
        buffers them (it encodes on the engine thread when a block starts); the loop wakes if it
        was waiting for them. Returns the frames buffered and not yet encoded. Input for a session
        that is not active (still queued, or ended) is dropped: 0."""
        with self._lock:
            rec = self.sessions[session_id]
            if rec.state != "active":
                return 0
            buffered = self.executor.push_frames(session_id, frames)
            self._wake.notify_all()
            return buffered

    def set_paused(self, session_id: str, paused: bool) -> int:
        """Pause (no new blocks start; the one under way finishes) or resume a session; returns
        the first frame of the block the change applies to."""
        with self._lock:
            rec = self.active[session_id]
            rec.set_paused(paused, self.clock.now())
            self._wake.notify_all()
            return rec.geometry.first_frame_of(self._next_block_start(rec))

    @property
    def depth(self) -> int:
        """Micro-batches the executor can hold at once (its pipeline stages; 1 without)."""
        return int(getattr(self.executor, "depth", 1))

    @property
    def running(self) -> bool:
        thread = self._thread
        return self._running and thread is not None and thread.is_alive()

    # -- the four verbs ---------------------------------------------------------------------------

    def schedule(self, now: float) -> MicroBatch | None:
        with self._lock:
            self._admit_from_queue(now)
            self._degrade_or_recover(now)
            releases = []
            for rec in self.active.values():
                rec.note_input(self.executor.ready(rec.session_id), now)
                release = rec.note_clock(now, self.config.max_lead_s)
                if release is not None:
                    releases.append(release)
            self._next_release = min(releases, default=None)
            return self.policy.next_batch(now, list(self.active.values()), self.cost, self.config.max_batch)

    def submit(self, batch: MicroBatch) -> None:
        with self._lock:
            self._in_flight.append(batch)
            self.max_in_flight = max(self.max_in_flight, len(self._in_flight))
            for item in batch.items:
                self.sessions[item.session_id].busy_lanes.add(item.lane)
        self.executor.submit(batch)

    def collect(self) -> BatchResult:
        return self.executor.collect()

    def update(self, result: BatchResult) -> None:
        if result.lost is not None:
            self._lose_pipeline(result.lost, result.finished)
            return
        with self._lock:
            self._release(result.batch)
            self.batches += 1
            self.batched_items += len(result.batch.items)
            if self._on_event is not None:
                stages = {"batch": result.seconds, **result.stages}
                self._on_event(EngineEvent("batch_done", result.finished, "",
                                           {"size": len(result.batch.items), "stages": stages}))
            if self.config.learn_costs and not result.failed:
                self.cost.observe(result.batch.batch_shape(), result.seconds)
            for item in result.batch.items:
                rec = self.sessions[item.session_id]
                if rec.state != "active":
                    continue  # closed while its forward ran
                if item.session_id in result.failed:
                    rec.error = result.failed[item.session_id]
                    self._end(rec, result.finished, "failed", reason=rec.error)
                    continue
                rec.stats.batch_sizes.append(len(result.batch.items))
                if item.starts_block:
                    self._block_t0[(rec.session_id, item.block)] = result.started
                rec.t_ready = result.finished
                steps = rec.steps
                finished = rec.advance(item)
                if rec.steps != steps:  # a step change took effect at this block boundary
                    self.executor.set_steps(rec.session_id, rec.steps)
                if finished:
                    self._chunk_done(rec, item.block, result, steps)

    # -- loops --------------------------------------------------------------------------------

    def tick(self) -> bool:
        """One round: schedule and submit micro-batches until the executor holds `depth` of them
        (the ring of a pipeline is full) or nothing else is ready, then collect and update the
        oldest. False when there was nothing to run."""
        if self._lost is not None:
            return self._rebuild()
        while len(self._in_flight) < self.depth:
            batch = self.schedule(self.clock.now())
            if batch is None:
                break
            self.submit(batch)
        if not self._in_flight:
            return False
        self.update(self.collect())
        if self._lost is not None:
            self._rebuild()
        return True

    def run_until(self, t_end: float, arrivals: Callable[[float], float | None] | None = None) -> None:
        """Step the loop until `t_end` on the engine's clock. `arrivals(now)` opens the sessions
        due by now and returns when the next one is due (None: no more)."""
        while self.clock.now() < t_end:
            next_arrival = arrivals(self.clock.now()) if arrivals else None
            if self.tick():
                continue
            wake = min(t for t in (next_arrival, self._next_timer(), t_end) if t is not None)
            if wake <= self.clock.now():
                wake = self.clock.now() + 1e-3
            self.clock.sleep_until(wake)

    def start(self) -> None:
        """Run the loop in its own thread until `stop`."""
        with self._lock:
            if self._thread is not None:
                return
            self._running = True
            self._thread = threading.Thread(target=self._serve, name="rollcast-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._running = False
            self._wake.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _serve(self) -> None:
        while True:
            with self._lock:
                if not self._running:
                    return
            try:
                if self.tick():
                    continue
            except Exception as e:  # an executor bug fails the sessions it touched, not the loop
                self._fail_in_flight(e)
                continue
            with self._lock:
                if self._running:
                    timer = self._next_timer()
                    wait = 0.05 if timer is None else max(0.0, min(0.05, timer - self.clock.now()))
                    self._wake.wait(wait)

    # -- internals ------------------------------------------------------------------------------

    def _next_block_start(self, rec: SessionRecord) -> int:
        """The next block of `rec` to start denoising after the forward now running, if any."""
        starting = any(
            i.session_id == rec.session_id and i.kind == "denoise" and i.step == 0 and i.lane == 0
            for batch in self._in_flight for i in batch.items)
        block = rec.lane_block[0]
        if rec.lanes == 1 and rec.step > 0:
            return block + 1  # under way
        return block + 1 if starting else block

    def _release(self, batch: MicroBatch) -> None:
        if batch in self._in_flight:
            self._in_flight.remove(batch)
        for item in batch.items:
            self.sessions[item.session_id].busy_lanes.discard(item.lane)

    def _lose_pipeline(self, reason: str, now: float) -> None:
        """The executor's pipeline is gone, with what was in flight on it (none of it took effect:
        those forwards run again). Every active session gets `degraded` (what: pipeline) and
        waits for the rebuild; queued ones wait too."""
        with self._lock:
            self.pipeline_failures += 1
            self.rebuilding = True
            self._lost = reason
            for batch in list(self._in_flight):
                self._release(batch)
            for rec in self.active.values():
                self._emit("degraded", now, rec, what="pipeline", old="running", new="rebuilding",
                           reason=reason)
            self._emit_engine("pipeline_lost", now, reason=reason, failures=self.pipeline_failures)

    def _rebuild(self) -> bool:
        """Start a fresh pipeline (outside the lock: it takes seconds; client calls on this engine
        see `rebuilding` meanwhile). A failed rebuild is retried, at most once a second. Returns
        whether it was attempted."""
        t0 = self.clock.now()
        if t0 < self._next_rebuild:
            return False
        reason = self._lost
        try:
            dropped = set(self.executor.rebuild())
        except Exception as e:  # no pipeline: its sessions are gone; try again later
            with self._lock:
                now = self.clock.now()
                self._next_rebuild = now + 1.0
                self._end_lost(set(self.active), f"{reason}; rebuild failed: {type(e).__name__}: {e}", now)
                self._emit_engine("pipeline_lost", now, reason=f"rebuild failed: {e}",
                                  failures=self.pipeline_failures)
            return True
        with self._lock:
            now = self.clock.now()
            self._end_lost(dropped, str(reason), now)
            self._lost = None
            self.rebuilding = False
            self._emit_engine("pipeline_rebuilt", now, seconds=now - t0, resumed=len(self.active),
                              dropped=len(dropped))
            for rec in self.active.values():
                self._emit("recovered", now, rec, what="pipeline", old="rebuilding", new="running")
        return True

    def _end_lost(self, session_ids: set[str], reason: str, now: float) -> None:
        for sid in session_ids:
            rec = self.active.get(sid)
            if rec is not None:
                rec.error = f"pipeline_failed: {reason}"
                self._end(rec, now, "failed", reason=rec.error)

    def _emit_engine(self, kind: EventKind, t: float, **data: object) -> None:
        """An event about the engine itself (session_id "")."""
        event = EngineEvent(kind, t, "", dict(data))
        if self._on_event is not None:
            self._on_event(event)
        self.events.append(event)

    def _fail_in_flight(self, error: Exception) -> None:
        with self._lock:
            batches = list(self._in_flight)
            for batch in batches:
                self._release(batch)
            now = self.clock.now()
            for sid in {i.session_id for b in batches for i in b.items}:
                rec = self.sessions[sid]
                if rec.state == "active":
                    rec.error = f"executor error: {type(error).__name__}: {error}"
                    self._end(rec, now, "failed", reason=rec.error)

    def _next_timer(self) -> float | None:
        """The next time something may change without an arrival (queue timeouts, degradation,
        a paced block start)."""
        timers = [self._next_release]
        if self.queue:
            timers.append(self.clock.now() + self.config.degradation.min_interval_s)
        return min((t for t in timers if t is not None), default=None)

    def _decide(self, rec: SessionRecord, now: float, *, allow_queue: bool) -> AdmissionDecision:
        if self.rebuilding:
            return AdmissionDecision("rejected", "capacity_exhausted",
                                     retry_after_s=self.config.admission.default_retry_after_s,
                                     detail="the pipeline is being rebuilt after a failure")
        if not self.policy.admission:
            return AdmissionDecision("admitted")
        return self.admission.decide(rec, list(self.active.values()), now=now, queue_len=len(self.queue),
                                     allow_queue=allow_queue, allow_degrade=self.policy.degradation)

    def _admit(self, rec: SessionRecord, now: float, decision: AdmissionDecision) -> AdmissionDecision:
        """Open the session on the executor and make it active; when the executor refuses it (a
        setup it cannot run, or no room) the session ends rejected and nothing of it stays."""
        try:
            self.executor.open(rec)
        except Exception as e:  # the loop must survive whatever an executor raises here
            reason, retry = ("capacity_exhausted", self.config.admission.default_retry_after_s) \
                if isinstance(e, CapacityError) else ("unsupported", None)
            rec.error = f"{type(e).__name__}: {e}"
            self._end(rec, now, "rejected", reason=reason, detail=rec.error, retry_after_s=retry)
            return AdmissionDecision("rejected", reason, retry_after_s=retry, detail=rec.error,
                                     predicted_load=decision.predicted_load)
        rec.admit(now, lanes=rec.lanes)
        self.active[rec.session_id] = rec
        self._emit("admitted", now, rec, wait_s=now - rec.t_arrival, lanes=rec.lanes,
                   predicted_load=round(decision.predicted_load, 4))
        for sid, steps in decision.degrade:
            target = self.active[sid]
            change = Change(sid, "steps", target.pending_steps or target.steps, steps, "degraded")
            self._apply(change, now)
            self.degradation.note_degraded(sid, now)
        return decision

    def _admit_from_queue(self, now: float) -> None:
        while self.queue and not self.rebuilding:
            head = self.queue[0]
            decision = self._decide(head, now, allow_queue=False)
            if decision.outcome == "admitted":
                self.queue.popleft()
                self._admit(head, now, decision)  # a refusal ends it rejected; the line moves on
                continue
            if now - head.t_arrival > self.config.admission.max_queue_wait_s:
                self.queue.popleft()
                self._end(head, now, "rejected", reason="capacity_exhausted",
                          retry_after_s=self.config.admission.default_retry_after_s)
                continue
            return

    def _degrade_or_recover(self, now: float) -> None:
        if not self.policy.degradation:
            return
        change = self.degradation.step(now, list(self.active.values()), self._misses_since_check,
                                       self.admission.load)
        self._misses_since_check = 0
        if change is not None:
            self._apply(change, now)

    def _apply(self, change: Change, now: float) -> None:
        rec = self.active[change.session_id]
        if change.kind == "steps":
            rec.set_steps(int(change.new))  # the executor follows at the block boundary (`update`)
        else:
            rec.set_fps(change.new)
        self.degradation.applied(rec)
        self._emit(change.direction, now, rec, what=change.kind, old=change.old, new=change.new)  # type: ignore[arg-type]

    def _chunk_done(self, rec: SessionRecord, block: int, result: BatchResult, steps: int) -> None:
        geo = rec.geometry
        now = result.finished
        deadline = rec.deadline(block)
        late = now - deadline
        # v2v: how long the starts of this block and the ones before it waited for input.
        rec.input_delay_s += rec.block_input_wait_s.pop(block, 0.0)
        waited = rec.input_delay_s
        st = rec.stats
        st.chunks += 1
        st.frames += geo.frames_of(block)
        if st.t_first_frame is None:
            st.t_first_frame = now
        self._emit("frames_ready", now, rec, block=block, first_frame=geo.first_frame_of(block),
                   num_frames=geo.frames_of(block), deadline=deadline, late_s=max(0.0, late),
                   steps=steps, input_delay_s=waited, frames=result.frames.get(rec.session_id),
                   generation_s=now - self._block_t0.pop((rec.session_id, block), result.started))
        if late > 0:
            st.late_chunks += 1
            st.max_lateness_s = max(st.max_lateness_s, late)
            # A chunk no later than the stream waited for input is the client's miss: it counts
            # as late, but is no overload signal (fewer steps would not have helped).
            cause = "input" if late <= waited else "schedule"
            if cause == "input":
                st.input_late_chunks += 1
            else:
                self._misses_since_check += 1
            self._emit("deadline_miss", now, rec, block=block, late_s=late, cause=cause,
                       input_delay_s=waited)
        if rec.done:
            self._end(rec, now, "finished", reason="completed")

    def _end(self, rec: SessionRecord, now: float, state: str, **data: object) -> None:
        was_active = rec.state == "active"
        for key in [k for k in self._block_t0 if k[0] == rec.session_id]:
            del self._block_t0[key]
        rec.state = state  # type: ignore[assignment]
        rec.t_finished = now
        self.active.pop(rec.session_id, None)
        if was_active:
            self.executor.close(rec.session_id)
        self.degradation.applied(rec)
        kinds: dict[str, EventKind] = {"rejected": "rejected", "failed": "failed"}
        kind = kinds.get(state, "finished")
        self._emit(kind, now, rec, **data)

    def _emit(self, kind: EventKind, t: float, rec: SessionRecord, **data: object) -> None:
        event = EngineEvent(kind, t, rec.session_id, dict(data))
        if self._on_event is not None:
            self._on_event(event)
        if "frames" in data:
            event = EngineEvent(kind, t, rec.session_id, {k: v for k, v in data.items() if k != "frames"})
        self.events.append(event)

    def snapshot(self) -> dict[str, object]:
        """Load and counts for capacity endpoints and metrics."""
        with self._lock:
            specs = [spec_of(r) for r in self.active.values()]
            return {"active": len(self.active), "queued": len(self.queue),
                    "predicted_load": self.admission.load(specs),
                    "mean_batch": self.batched_items / self.batches if self.batches else 0.0,
                    "pipeline_failures": self.pipeline_failures, "rebuilding": self.rebuilding}
