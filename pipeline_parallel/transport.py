"""Activation transport between pipeline-parallel ranks.

A message is a ``kind`` (short string) plus a dict of named tensors. Messages between one
(src, dst, tag) triple arrive in order; different tags are independent streams.

Wire protocol (``DistTransport``), per message on one (src, dst, tag) stream:

1. one int64 header ``h``. ``h >= 0``: a layout id the receiver already knows. ``h < 0``: a
   one-time *handshake*: a uint8 tensor of ``-h`` bytes follows, the JSON description of a new
   layout (its id, kind, and per tensor name, shape, dtype, device type).
2. one payload per non-empty tensor, in layout order, each sent as a flat uint8 view so every dtype
   (bool, bfloat16, ...) travels over gloo and NCCL alike without a copy.

The receiver allocates buffers for a layout once, at its handshake, and receives every later
message of that layout straight into them. Both ends keep the same bounded LRU of layouts per
stream (they see the same sequence of ids), so varying shapes cannot grow memory without bound.

Buffer validity: tensors returned by ``recv`` stay valid at least until the next ``recv`` with the
same (src, tag); after that the transport may overwrite them. Clone anything kept longer, and in
particular clone a received tensor before forwarding it with ``send`` (a send is asynchronous and
the next receive may overwrite the buffer while it is still being sent).

Threading: at most one thread receives on a given (src, tag) and at most one sends on a given
(dst, tag) at a time; different streams may be used from different threads.

What we found about gloo (torch 2.13) and why the waits look the way they do:

- ``Work.is_completed()`` on a gloo ``isend``/``irecv`` never turns True until someone calls
  ``wait()``, and ``get_future()`` is not implemented, so it cannot be polled.
- ``Work.wait(timeout)`` that expires closes the gloo pair for good ("Application timeout caused
  pair closure"): short timed waits cannot be used for polling either, and an idle wait longer than
  the process group timeout would break the connection.
- gloo sends are rendezvous: a send completes only once the receiver has posted the matching recv.
- A SIGKILLed peer on the same host surfaces promptly as ``RuntimeError: Connection closed by
  peer`` from a pending wait or from posting the next op.

So every gloo wait runs in a daemon thread calling ``wait()`` with a very long timeout, and the
caller polls that thread's completion every ``poll_interval_s``, checking ``timeout_s`` and the
``liveness`` callback in between. NCCL works (CUDA tensors) are polled with ``is_completed()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Generic, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistTransport",
    "PeerFailedError",
    "QueueHub",
    "QueueTransport",
    "RingGroup",
    "Transport",
    "connect_ring",
    "free_port",
]

Liveness = Callable[[int], "str | None"]

# How often waits wake up to check deadlines, peer failure flags and liveness.
DEFAULT_POLL_S = 0.05
# Asynchronous sends allowed in flight per destination before `send` waits for the oldest.
DEFAULT_MAX_OUTSTANDING = 4
# Layouts remembered per stream; both ends evict the same least recently used one.
DEFAULT_MAX_LAYOUTS = 32
# gloo waits use this instead of the process group timeout, because an expired gloo wait closes the
# pair for good; peer death and deadlines are detected by polling instead. Kept well below the
# range where converting the duration to a steady_clock deadline could overflow.
_GLOO_WAIT = timedelta(days=30)


class PeerFailedError(RuntimeError):
    """A peer rank died or stopped answering; the message names the rank and why."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def _peer_failed(rank: int, reason: str) -> PeerFailedError:
    return PeerFailedError(f"rank {rank} failed: {reason}", rank=rank)


@runtime_checkable
class Transport(Protocol):
    rank: int
    world_size: int

    def send(self, dst: int, kind: str, tensors: Mapping[str, Tensor], *, tag: int = 0) -> None: ...

    def recv(
        self, src: int, *, tag: int = 0, timeout_s: float | None = None
    ) -> tuple[str, dict[str, Tensor]]: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# Layouts (shared by both transports)


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda": the receiver places it on its own device of that type

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Layout:
    kind: str
    specs: tuple[_TensorSpec, ...]


def _layout_of(kind: str, tensors: Mapping[str, Tensor]) -> _Layout:
    specs = tuple(_TensorSpec(name, tuple(t.shape), t.dtype, t.device.type) for name, t in tensors.items())
    return _Layout(kind, specs)


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype in layout description: {name!r}")
    return dtype


def _encode_layout(layout_id: int, layout: _Layout) -> bytes:
    specs = [[s.name, list(s.shape), str(s.dtype), s.device_type] for s in layout.specs]
    return json.dumps({"id": layout_id, "kind": layout.kind, "tensors": specs}).encode()


def _decode_layout(raw: bytes) -> tuple[int, _Layout]:
    doc = json.loads(raw.decode())
    specs = tuple(
        _TensorSpec(name, tuple(shape), _dtype_from_name(dtype), device_type)
        for name, shape, dtype, device_type in doc["tensors"]
    )
    return int(doc["id"]), _Layout(str(doc["kind"]), specs)


@dataclass
class _SendLayouts:
    """Sender side of one stream: layout -> id, LRU-bounded in step with the receiver."""

    capacity: int
    ids: OrderedDict[_Layout, int] = field(default_factory=OrderedDict)
    next_id: int = 0

    def lookup(self, layout: _Layout) -> tuple[int, bool]:
        """Returns (layout id, whether this is new and needs a handshake)."""
        if layout in self.ids:
            self.ids.move_to_end(layout)
            return self.ids[layout], False
        layout_id = self.next_id
        self.next_id += 1
        self.ids[layout] = layout_id
        if len(self.ids) > self.capacity:
            self.ids.popitem(last=False)
        return layout_id, True


_State = TypeVar("_State")


@dataclass
class _RecvLayouts(Generic[_State]):
    """Receiver side of one stream: id -> (layout, cached state), evicting like `_SendLayouts`."""

    capacity: int
    entries: OrderedDict[int, tuple[_Layout, _State]] = field(default_factory=OrderedDict)

    def add(self, layout_id: int, layout: _Layout, state: _State) -> None:
        self.entries[layout_id] = (layout, state)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def get(self, layout_id: int, src: int, tag: int) -> tuple[_Layout, _State]:
        if layout_id not in self.entries:
            raise RuntimeError(f"protocol error: unknown layout id {layout_id} from rank {src} tag {tag}")
        self.entries.move_to_end(layout_id)
        return self.entries[layout_id]


def _check_peer(rank: int, peer: int, world_size: int) -> None:
    if not 0 <= peer < world_size or peer == rank:
        raise ValueError(f"rank {rank}: invalid peer {peer} (world size {world_size})")


@dataclass
class _Counters:
    """Handshake counters, shared by the threads of one transport."""

    sent: int = 0
    received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_sent(self) -> None:
        with self.lock:
            self.sent += 1

    def count_received(self) -> None:
        with self.lock:
            self.received += 1


class _HandshakeCounts:
    """`handshakes` = layout descriptions this endpoint sent plus those it received."""

    _counters: _Counters

    @property
    def handshakes_sent(self) -> int:
        return self._counters.sent

    @property
    def handshakes_received(self) -> int:
        return self._counters.received

    @property
    def handshakes(self) -> int:
        return self._counters.sent + self._counters.received


# ----------------------------------------------------------------------------------------------
# In-process transport


@dataclass
class _QueuedMessage:
    layout_id: int
    description: _Layout | None  # set on the handshake message of a layout
    tensors: dict[str, Tensor]


class QueueHub:
    """Shared state of the `QueueTransport`s of one process: one queue per (src, dst, tag)."""

    def __init__(self, world_size: int, *, poll_interval_s: float = DEFAULT_POLL_S) -> None:
        self.world_size = world_size
        self.poll_interval_s = poll_interval_s
        self._queues: dict[tuple[int, int, int], queue.SimpleQueue[_QueuedMessage]] = {}
        self._failed: dict[int, str] = {}
        self._lock = threading.Lock()

    def transport(self, rank: int, *, max_layouts: int = DEFAULT_MAX_LAYOUTS) -> QueueTransport:
        return QueueTransport(self, rank, max_layouts=max_layouts)

    def fail(self, rank: int, reason: str) -> None:
        """Marks `rank` failed: every `recv` from it (and `send` to it) raises PeerFailedError."""
        with self._lock:
            self._failed.setdefault(rank, reason)

    def failure(self, rank: int) -> str | None:
        return self._failed.get(rank)

    def queue(self, src: int, dst: int, tag: int) -> queue.SimpleQueue[_QueuedMessage]:
        key = (src, dst, tag)
        with self._lock:
            if key not in self._queues:
                self._queues[key] = queue.SimpleQueue()
            return self._queues[key]


class QueueTransport(_HandshakeCounts):
    """Transport between threads of one process. Tensors are passed by reference (no copy), so
    received tensors stay valid for as long as the caller keeps them; the sender must not modify
    them in place after sending. The handshake is bookkeeping only (counted like DistTransport's)."""

    def __init__(self, hub: QueueHub, rank: int, *, max_layouts: int = DEFAULT_MAX_LAYOUTS) -> None:
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self._max_layouts = max_layouts
        self._send_layouts: dict[tuple[int, int], _SendLayouts] = {}
        self._recv_layouts: dict[tuple[int, int], _RecvLayouts[None]] = {}
        self._counters = _Counters()

    def send(self, dst: int, kind: str, tensors: Mapping[str, Tensor], *, tag: int = 0) -> None:
        _check_peer(self.rank, dst, self.world_size)
        if (reason := self.hub.failure(dst)) is not None:
            raise _peer_failed(dst, reason)
        layout = _layout_of(kind, tensors)
        layouts = self._send_layouts.setdefault((dst, tag), _SendLayouts(self._max_layouts))
        layout_id, is_new = layouts.lookup(layout)
        if is_new:
            self._counters.count_sent()
        message = _QueuedMessage(layout_id, layout if is_new else None, dict(tensors))
        self.hub.queue(self.rank, dst, tag).put(message)

    def recv(
        self, src: int, *, tag: int = 0, timeout_s: float | None = None
    ) -> tuple[str, dict[str, Tensor]]:
        _check_peer(self.rank, src, self.world_size)
        message = self._wait_message(src, tag, timeout_s)
        layouts = self._recv_layouts.setdefault((src, tag), _RecvLayouts(self._max_layouts))
        if message.description is not None:
            layouts.add(message.layout_id, message.description, None)
            self._counters.count_received()
        layout, _ = layouts.get(message.layout_id, src, tag)
        return layout.kind, message.tensors

    def _wait_message(self, src: int, tag: int, timeout_s: float | None) -> _QueuedMessage:
        inbox = self.hub.queue(src, self.rank, tag)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            # Checked before the queue: a failed peer's stream is not trusted any more.
            if (reason := self.hub.failure(src)) is not None:
                raise _peer_failed(src, reason)
            wait_s = self.hub.poll_interval_s
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _peer_failed(src, f"nothing received on tag {tag} within {timeout_s:g} s")
                wait_s = min(wait_s, remaining)
            try:
                return inbox.get(timeout=wait_s)
            except queue.Empty:
                continue

    def close(self) -> None:
        """Nothing to release: queues belong to the hub."""


# ----------------------------------------------------------------------------------------------
# torch.distributed transport


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (racy by nature: bind it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class RingGroup:
    """The process groups of one pipeline's ranks. They are built from their own TCP store, not
    as the process's default group, so one driver process can run several pipelines (replicas)
    and rebuild a failed one without disturbing the others."""

    rank: int
    world_size: int
    host: dist.ProcessGroup  # gloo: headers and host tensors
    device: dist.ProcessGroup | None = None  # NCCL for CUDA tensors (None on CPU)
    store: dist.Store | None = None  # kept alive as long as the groups

    def close(self) -> None:
        """Drop the groups (the peers may be gone; nothing here waits for them)."""
        if self.device is not None and hasattr(self.device, "shutdown"):
            with contextlib.suppress(RuntimeError):
                self.device.shutdown()
        self.device = None
        self.store = None


def connect_ring(
    rank: int, world_size: int, *, init_method: str, cuda: bool = False, timeout_s: float = 600.0
) -> RingGroup:
    """Rendezvous at ``tcp://HOST:PORT`` (rank 0 serves the store there) and build the groups.
    With a loopback address, gloo is told to use the loopback interface (unless
    GLOO_SOCKET_IFNAME is set) so ranks on one host talk over 127.0.0.1 only.

    `timeout_s` bounds the rendezvous; DistTransport's waits do not depend on it."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or url.hostname is None or url.port is None:
        raise ValueError(f"init method must look like tcp://HOST:PORT, got {init_method!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if url.hostname in ("127.0.0.1", "localhost"):
        loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
        if loopback is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0, timeout=timeout)
    host = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, world_size, timeout)
    device = None
    if cuda:
        device = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, world_size)
    return RingGroup(rank, world_size, host, device, store)


def _bytes_view(t: Tensor) -> Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, 0-d included), sharing its memory."""
    return t.reshape(-1).view(torch.uint8)


class _BackgroundWait:
    """Runs `fn` in a daemon thread so the caller can poll for it with deadlines and liveness."""

    def __init__(self, fn: Callable[[], object], name: str) -> None:
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None
        self._fn = fn
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # handed to the polling thread
            self.error = exc
        finally:
            self.done.set()


@dataclass
class _OutgoingMessage:
    works: list[tuple[dist.Work, bool]]  # (work, is_nccl)
    keepalive: list[Tensor]  # the tensors must outlive their asynchronous sends


class _SendReaper:
    """Waits, in FIFO order in a daemon thread, for the asynchronous sends to one peer, so `send`
    can bound what is outstanding without blocking on gloo's unpollable works."""

    def __init__(self, rank: int, peer: int) -> None:
        self.peer = peer
        self.error: BaseException | None = None
        self._pending: deque[_OutgoingMessage | None] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"send-reaper-{rank}->{peer}", daemon=True)
        self._thread.start()

    @property
    def outstanding(self) -> int:
        return sum(1 for m in self._pending if m is not None)

    def push(self, message: _OutgoingMessage | None) -> None:
        """Queues a message to wait for; None stops the thread after what is queued."""
        with self._cond:
            self._pending.append(message)
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                message = self._pending[0]
            if message is None:
                return
            try:
                for work, is_nccl in message.works:
                    _wait_work(work, is_nccl)
            except BaseException as exc:
                with self._cond:
                    self.error = exc
                    self._pending.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending.popleft()
                self._cond.notify_all()


def _wait_work(work: dist.Work, is_nccl: bool) -> None:
    """Blocks until `work` is done. NCCL works are polled (host-synchronous completion, so buffers
    are ready for any stream); gloo works can only be waited on, with a long timeout (see top)."""
    if is_nccl:
        while not work.is_completed():
            time.sleep(0.0005)
        return
    work.wait(_GLOO_WAIT)


@dataclass
class _PendingRecv:
    """A receive in progress; kept across a `recv` that timed out so the next call resumes it."""

    waiter: _BackgroundWait


class DistTransport(_HandshakeCounts):
    """Transport over a pipeline's `RingGroup` (`connect_ring`).

    CPU: everything goes over the gloo group, using `tag`.
    CUDA: headers and CPU tensors go over the gloo group with tags; CUDA tensors go over NCCL,
    whose point-to-point ignores tags. So between one pair of ranks, CUDA tensors may be sent on
    one tag only (checked: another tag raises ValueError). A CUDA device needs the group's NCCL
    part. (The NCCL path follows this contract but has not run on a multi-GPU host yet.)
    A dead NCCL peer is reported via liveness/timeouts, but the NCCL communicator may be wedged
    afterwards: abort the process group rather than reuse it.

    `liveness(rank)` is called every `poll_interval_s` while waiting on that rank; returning a reason
    string makes the wait raise PeerFailedError naming the rank and that reason.
    """

    def __init__(
        self,
        group: RingGroup,
        *,
        device: torch.device | str,
        liveness: Liveness | None = None,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        max_layouts: int = DEFAULT_MAX_LAYOUTS,
        poll_interval_s: float = DEFAULT_POLL_S,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.group = group
        self.rank = group.rank
        self.world_size = group.world_size
        self.device = torch.device(device)
        self._liveness = liveness
        self._max_outstanding = max_outstanding
        self._max_layouts = max_layouts
        self._poll_interval_s = poll_interval_s
        self._close_timeout_s = close_timeout_s
        self._cuda = self.device.type == "cuda"
        if self._cuda and group.device is None:
            raise ValueError("a CUDA device needs a ring group with NCCL (connect_ring(..., cuda=True))")
        self._send_layouts: dict[tuple[int, int], _SendLayouts] = {}
        self._recv_layouts: dict[tuple[int, int], _RecvLayouts[dict[str, Tensor]]] = {}
        self._pending: dict[tuple[int, int], _PendingRecv] = {}
        self._reapers: dict[int, _SendReaper] = {}
        self._nccl_tags: dict[tuple[str, int], int] = {}  # ("send"/"recv", peer) -> the one tag
        self._counters = _Counters()
        self._closed = False

    # -- send ------------------------------------------------------------------------------------

    def send(self, dst: int, kind: str, tensors: Mapping[str, Tensor], *, tag: int = 0) -> None:
        """Posts the message asynchronously and returns; waits only when more than
        `max_outstanding` messages to `dst` are still in flight (gloo sends complete only once the
        receiver has posted its receive). The caller must not modify the tensors in place."""
        _check_peer(self.rank, dst, self.world_size)
        reaper = self._reaper(dst)
        self._raise_send_error(reaper)
        layout = _layout_of(kind, tensors)
        self._check_devices(layout, dst, tag, "send")
        layouts = self._send_layouts.setdefault((dst, tag), _SendLayouts(self._max_layouts))
        layout_id, is_new = layouts.lookup(layout)
        try:
            message = self._post_message(dst, tag, layout_id, layout if is_new else None, tensors)
        except RuntimeError as exc:  # gloo raises at post time once the pair is closed
            raise _peer_failed(dst, f"send failed: {exc}") from exc
        if is_new:
            self._counters.count_sent()
        reaper.push(message)
        self._wait_for_room(reaper)

    def _post_message(
        self,
        dst: int,
        tag: int,
        layout_id: int,
        description: _Layout | None,
        tensors: Mapping[str, Tensor],
    ) -> _OutgoingMessage:
        message = _OutgoingMessage(works=[], keepalive=[])
        if description is None:
            self._post_send(message, torch.tensor([layout_id], dtype=torch.int64), dst, tag)
        else:
            raw = _encode_layout(layout_id, description)
            self._post_send(message, torch.tensor([-len(raw)], dtype=torch.int64), dst, tag)
            self._post_send(message, torch.frombuffer(bytearray(raw), dtype=torch.uint8), dst, tag)
        for t in tensors.values():
            if t.numel() > 0:
                self._post_send(message, _bytes_view(t.contiguous()), dst, tag)
        return message

    def _post_send(self, message: _OutgoingMessage, payload: Tensor, dst: int, tag: int) -> None:
        is_nccl = payload.device.type == "cuda"
        group = self.group.device if is_nccl else self.group.host
        work = group.send([payload], dst, tag)  # type: ignore[union-attr]
        message.works.append((work, is_nccl))
        message.keepalive.append(payload)

    def _reaper(self, dst: int) -> _SendReaper:
        if dst not in self._reapers:
            self._reapers[dst] = _SendReaper(self.rank, dst)
        return self._reapers[dst]

    def _raise_send_error(self, reaper: _SendReaper) -> None:
        if reaper.error is not None:
            raise _peer_failed(reaper.peer, f"send failed: {reaper.error}") from reaper.error

    def _wait_for_room(self, reaper: _SendReaper) -> None:
        def has_room() -> bool:
            return reaper.error is not None or reaper.outstanding <= self._max_outstanding

        while not reaper.wait_until(has_room, self._poll_interval_s):
            self._check_liveness(reaper.peer)
        self._raise_send_error(reaper)

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every message sent so far has been taken by its receiver."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for reaper in list(self._reapers.values()):

            def drained(r: _SendReaper = reaper) -> bool:
                return r.error is not None or r.outstanding == 0

            while not reaper.wait_until(drained, self._poll_interval_s):
                self._check_liveness(reaper.peer)
                if deadline is not None and time.monotonic() > deadline:
                    raise _peer_failed(reaper.peer, f"sends not received within {timeout_s:g} s")
            self._raise_send_error(reaper)

    # -- recv ------------------------------------------------------------------------------------

    def recv(
        self, src: int, *, tag: int = 0, timeout_s: float | None = None
    ) -> tuple[str, dict[str, Tensor]]:
        """Receives the next message from `src` on `tag`. The returned tensors are valid until the
        next `recv` with the same (src, tag). Raises PeerFailedError when the peer's connection
        breaks, `liveness` reports it dead, or nothing arrives within `timeout_s` (a receive cut
        short by the timeout is resumed, not lost, by the next `recv` on that stream)."""
        _check_peer(self.rank, src, self.world_size)
        key = (src, tag)
        pending = self._pending.get(key)
        if pending is None:
            stream = torch.cuda.current_stream(self.device) if self._cuda else None
            fn = lambda: self._receive_message(src, tag, stream)  # noqa: E731
            pending = _PendingRecv(_BackgroundWait(fn, name=f"recv-{self.rank}<-{src}:{tag}"))
            self._pending[key] = pending
        self._poll(pending.waiter, src, tag, timeout_s)
        del self._pending[key]
        if pending.waiter.error is not None:
            error = pending.waiter.error
            if isinstance(error, ValueError):  # our own checks, not a peer failure
                raise error
            raise _peer_failed(src, f"receive failed: {error}") from error
        result = pending.waiter.result
        assert isinstance(result, tuple)
        return result

    def _poll(self, waiter: _BackgroundWait, src: int, tag: int, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_s = self._poll_interval_s
            if deadline is not None:
                wait_s = max(0.0, min(wait_s, deadline - time.monotonic()))
            if waiter.done.wait(wait_s):
                return
            self._check_liveness(src)
            if deadline is not None and time.monotonic() >= deadline:
                raise _peer_failed(src, f"nothing received on tag {tag} within {timeout_s:g} s")

    def _check_liveness(self, peer: int) -> None:
        if self._liveness is not None and (reason := self._liveness(peer)) is not None:
            raise _peer_failed(peer, reason)

    def _receive_message(
        self, src: int, tag: int, stream: torch.cuda.Stream | None
    ) -> tuple[str, dict[str, Tensor]]:
        """Runs in a background thread: header, optional handshake, then the payloads."""
        header = torch.empty(1, dtype=torch.int64)
        self._recv_into(header, src, tag, stream)
        head = int(header.item())
        layouts = self._recv_layouts.setdefault((src, tag), _RecvLayouts(self._max_layouts))
        if head < 0:
            raw = torch.empty(-head, dtype=torch.uint8)
            self._recv_into(raw, src, tag, stream)
            layout_id, layout = _decode_layout(raw.numpy().tobytes())
            self._check_devices(layout, src, tag, "recv")
            layouts.add(layout_id, layout, self._allocate(layout))
            self._counters.count_received()
        else:
            layout_id = head
        layout, buffers = layouts.get(layout_id, src, tag)
        for t in buffers.values():
            if t.numel() > 0:
                self._recv_into(_bytes_view(t), src, tag, stream)
        return layout.kind, dict(buffers)

    def _recv_into(self, payload: Tensor, src: int, tag: int, stream: torch.cuda.Stream | None) -> None:
        if payload.device.type == "cuda":
            # Posted on the caller's stream so NCCL waits for the caller's earlier use of the buffer.
            # The current device is per thread, and this runs in a helper thread.
            with torch.cuda.device(payload.device), torch.cuda.stream(stream):
                work = self.group.device.recv([payload], src, tag)  # type: ignore[union-attr]
            _wait_work(work, is_nccl=True)
        else:
            _wait_work(self.group.host.recv([payload], src, tag), is_nccl=False)

    def _allocate(self, layout: _Layout) -> dict[str, Tensor]:
        def device_of(spec: _TensorSpec) -> torch.device:
            return self.device if spec.device_type == "cuda" else torch.device("cpu")

        return {s.name: torch.empty(s.shape, dtype=s.dtype, device=device_of(s)) for s in layout.specs}

    def _check_devices(self, layout: _Layout, peer: int, tag: int, direction: str) -> None:
        cuda = [s.name for s in layout.specs if s.device_type == "cuda" and s.nbytes > 0]
        other = [s.name for s in layout.specs if s.device_type not in ("cpu", "cuda")]
        if other:
            raise ValueError(f"tensors {other} are on an unsupported device (only cpu and cuda)")
        if not cuda:
            return
        if not self._cuda:
            raise ValueError(f"tensors {cuda} are on CUDA but the transport's device is {self.device}")
        # NCCL p2p ignores tags, so two tags between one pair would interleave their payloads.
        first_tag = self._nccl_tags.setdefault((direction, peer), tag)
        if first_tag != tag:
            raise ValueError(
                f"CUDA tensors between ranks {self.rank} and {peer} already use tag {first_tag}; "
                f"NCCL ignores tags, so tag {tag} cannot carry CUDA tensors too"
            )

    # -- close -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Waits up to `close_timeout_s` for outstanding sends to be received (so a final "stop"
        message is delivered), then stops the helper threads and drops the ring's groups. Peer
        failures are not raised here."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(PeerFailedError):
            self.flush(timeout_s=self._close_timeout_s)
        for reaper in self._reapers.values():
            reaper.push(None)
        self.group.close()
