"""Activation transport: in-process queues and torch.distributed (gloo) across processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

from rollcast.pipeline_parallel.transport import (
    DistTransport,
    PeerFailedError,
    QueueHub,
    QueueTransport,
    RingGroup,
    Transport,
    connect_ring,
    free_port,
)

Message = tuple[str, dict[str, Tensor]]


def _messages() -> list[Message]:
    """Kinds and layouts covering every dtype/shape corner the pipeline may send."""
    g = torch.Generator().manual_seed(0)
    mixed = {
        "x": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "mask": torch.rand(5, generator=g) > 0.5,
        "idx": torch.arange(7),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "none": torch.zeros(0, 3),
        "t": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "f32": torch.randn(3, generator=g),
    }
    return [
        ("forward", mixed),
        ("open_row", {}),
        ("forward", {**mixed, "x": torch.randn(2, 5, 4, generator=g).bfloat16()}),  # new shape
        ("step", {"i": torch.tensor(3), "flag": torch.tensor(True)}),
        ("forward", {k: v.clone() + 1 if v.dtype != torch.bool else ~v for k, v in mixed.items()}),
    ]


def _assert_message_equal(got: Message, want: Message) -> None:
    assert got[0] == want[0]
    assert list(got[1]) == list(want[1])
    for name, expected in want[1].items():
        actual = got[1][name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        assert torch.equal(actual, expected), name


def _layout_key(kind: str, tensors: dict[str, Tensor]) -> tuple[Any, ...]:
    return (kind, *((name, tuple(t.shape), t.dtype) for name, t in tensors.items()))


def _clone(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # Received buffers are reused by the next recv, so anything forwarded is cloned first.
    return {k: v.clone() for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------
# QueueTransport


def test_queue_transport_round_trip_and_order() -> None:
    hub = QueueHub(2)
    a, b = hub.transport(0), hub.transport(1)
    assert isinstance(a, Transport)
    messages = _messages()
    for kind, tensors in messages:
        a.send(1, kind, tensors)
    for want in messages:
        _assert_message_equal(b.recv(0, timeout_s=1), want)
    a.close()
    b.close()


def test_queue_transport_between_threads() -> None:
    hub = QueueHub(3)
    received: list[Message] = []

    def relay() -> None:
        t = hub.transport(1)
        for _ in range(3):
            kind, tensors = t.recv(0, timeout_s=5)
            t.send(2, kind, tensors)

    thread = threading.Thread(target=relay)
    thread.start()
    sender, sink = hub.transport(0), hub.transport(2)
    for i in range(3):
        sender.send(1, "forward", {"i": torch.tensor(i)})
    for _ in range(3):
        received.append(sink.recv(1, timeout_s=5))
    thread.join(timeout=5)
    assert [int(m[1]["i"]) for m in received] == [0, 1, 2]


def test_queue_transport_tags_are_independent() -> None:
    hub = QueueHub(2)
    a, b = hub.transport(0), hub.transport(1)
    a.send(1, "on_tag1", {"v": torch.tensor(1)}, tag=1)
    a.send(1, "on_tag0", {"v": torch.tensor(0)}, tag=0)
    assert b.recv(0, tag=0, timeout_s=1)[0] == "on_tag0"
    assert b.recv(0, tag=1, timeout_s=1)[0] == "on_tag1"


def test_queue_transport_handshake_once_per_layout() -> None:
    hub = QueueHub(2)
    a, b = hub.transport(0), hub.transport(1)
    for _ in range(3):
        a.send(1, "forward", {"x": torch.zeros(2, 3)})
        b.recv(0, timeout_s=1)
    assert (a.handshakes_sent, b.handshakes_received) == (1, 1)
    a.send(1, "forward", {"x": torch.zeros(2, 4)})  # new shape
    a.send(1, "forward", {"x": torch.zeros(2, 3, dtype=torch.bfloat16)})  # new dtype
    a.send(1, "forward", {"x": torch.zeros(2, 4)})
    for _ in range(3):
        b.recv(0, timeout_s=1)
    assert (a.handshakes, b.handshakes) == (3, 3)


def test_queue_transport_layout_cache_is_bounded() -> None:
    hub = QueueHub(2)
    a, b = hub.transport(0, max_layouts=2), hub.transport(1, max_layouts=2)
    for n in [1, 2, 3, 1, 3]:  # 1 is evicted by 3, so it handshakes again; 3 is still cached
        a.send(1, "forward", {"x": torch.zeros(n)})
        assert b.recv(0, timeout_s=1)[1]["x"].shape == (n,)
    assert a.handshakes_sent == 4


def test_queue_transport_timeout_raises() -> None:
    b = QueueHub(2).transport(1)
    start = time.monotonic()
    with pytest.raises(PeerFailedError, match="rank 0"):
        b.recv(0, timeout_s=0.2)
    assert time.monotonic() - start < 1.0


def test_queue_transport_failed_peer_raises_fast() -> None:
    hub = QueueHub(2)
    b = hub.transport(1)
    threading.Timer(0.1, hub.fail, (0, "stage thread crashed: boom")).start()
    start = time.monotonic()
    with pytest.raises(PeerFailedError, match=r"rank 0 failed: stage thread crashed: boom"):
        b.recv(0)  # no timeout: only the failure flag can end this
    assert time.monotonic() - start < 1.0
    with pytest.raises(PeerFailedError):
        b.send(0, "forward", {})


# ----------------------------------------------------------------------------------------------
# DistTransport over gloo, across processes. The test process is rank 0 (so it can watch the
# others' exit codes, as an executor would); ranks 1.. are spawned processes.

_INIT_TIMEOUT_S = 30.0


def _init_child(rank: int, world_size: int, port: int) -> DistTransport:
    torch.set_num_threads(1)
    group = connect_ring(rank, world_size, init_method=f"tcp://127.0.0.1:{port}", timeout_s=_INIT_TIMEOUT_S)
    return DistTransport(group, device="cpu")


def _relay_worker(rank: int, world_size: int, port: int, results: Any) -> None:
    """Rank 1 echoes "echo*" kinds to 0, answers "tags" on two tags, and passes "ring" to 2;
    rank 2 passes "ring" to 0. Both stop on "stop" and report their handshake counts."""
    t = _init_child(rank, world_size, port)
    while True:
        kind, tensors = t.recv(rank - 1, timeout_s=20)
        if kind == "stop":
            break
        if kind.startswith("echo"):
            t.send(0, kind, _clone(tensors))
        elif kind == "tags":
            t.send(0, "on_tag1", {"v": torch.tensor(1)}, tag=1)
            t.send(0, "on_tag0", {"v": torch.tensor(0)}, tag=0)
        elif kind == "ring":
            t.send((rank + 1) % world_size, kind, _clone(tensors))
    if rank == 1:
        t.send(2, "stop", {})
    results.put((rank, t.handshakes_sent, t.handshakes_received))
    t.close()


def _victim_worker(rank: int, world_size: int, port: int, results: Any) -> None:
    t = _init_child(rank, world_size, port)
    t.send(0, "hello", {"pid": torch.tensor(os.getpid())})
    assert t.recv(0, timeout_s=20)[0] == "go"
    t.send(0, "reply", {"x": torch.arange(3)})
    t.recv(0, timeout_s=60)  # waits here until killed


@contextmanager
def _gloo_world(world_size: int, worker: Any) -> Iterator[tuple[list[Any], Any, RingGroup]]:
    """Spawns ranks 1.. running `worker`, joins the ring as rank 0, and always cleans up."""
    ctx = mp.get_context("spawn")
    port = free_port()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(rank, world_size, port, results), daemon=True)
        for rank in range(1, world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        group = connect_ring(0, world_size, init_method=f"tcp://127.0.0.1:{port}", timeout_s=_INIT_TIMEOUT_S)
        yield procs, results, group
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


@pytest.mark.timeout(90)
def test_dist_transport_round_trip_ring_tags_and_handshakes() -> None:
    with _gloo_world(3, _relay_worker) as (procs, results, group):
        t = DistTransport(group, device="cpu", liveness=_exit_code_liveness(procs))
        assert isinstance(t, Transport)

        # Round trip of every layout/kind, twice: the second pass reuses the cached buffers.
        messages = [(f"echo_{kind}", tensors) for kind, tensors in _messages()]
        for _ in range(2):
            for kind, tensors in messages:
                t.send(1, kind, tensors)
                _assert_message_equal(t.recv(1, timeout_s=20), (kind, tensors))
        n_echo_layouts = len({_layout_key(kind, tensors) for kind, tensors in messages})
        assert n_echo_layouts == len(messages) - 1  # the last one repeats the first's layout
        assert t.handshakes_sent == n_echo_layouts and t.handshakes_received == n_echo_layouts

        # Several messages in flight before any is received: order is kept.
        for i in range(6):
            t.send(1, "echo_order", {"i": torch.tensor(i)})
        assert [int(t.recv(1, timeout_s=20)[1]["i"]) for _ in range(6)] == list(range(6))

        # Tag independence: rank 1 sends on tag 1 first, we take tag 0 first.
        t.send(1, "tags", {})
        assert t.recv(1, tag=0, timeout_s=20)[0] == "on_tag0"
        assert t.recv(1, tag=1, timeout_s=20)[0] == "on_tag1"

        # Ring relay 0 -> 1 -> 2 -> 0, same layout three times, then a new shape.
        for n in [4, 4, 4, 6]:
            x = torch.randn(2, n).bfloat16()
            t.send(1, "ring", {"x": x, "n": torch.tensor(n)})
            kind, got = t.recv(2, timeout_s=20)
            assert kind == "ring" and torch.equal(got["x"], x) and int(got["n"]) == n

        t.send(1, "stop", {})
        counts = {rank: (sent, received) for rank, sent, received in [results.get(timeout=20) for _ in procs]}
        t.close()
    # Rank 1 sent: the echo layouts, "echo_order", one per tag, and to rank 2: ring x2 + stop.
    assert counts[1] == (n_echo_layouts + 1 + 2 + 3, n_echo_layouts + 1 + 1 + 2 + 1)
    assert counts[2] == (2, 3)  # ring layouts out; ring layouts + stop in
    assert t.handshakes_received == n_echo_layouts + 1 + 2 + 2


def _exit_code_liveness(procs: list[Any]) -> Any:
    by_rank = {rank: proc for rank, proc in enumerate(procs, start=1)}

    def liveness(rank: int) -> str | None:
        proc = by_rank.get(rank)
        if proc is None or proc.exitcode is None:
            return None
        return f"process {proc.pid} exited with code {proc.exitcode}"

    return liveness


@pytest.mark.timeout(60)
def test_dist_transport_timeouts_liveness_and_killed_peer() -> None:
    with _gloo_world(2, _victim_worker) as (procs, _, group):
        verdicts: dict[int, str] = {}
        by_exit_code = _exit_code_liveness(procs)

        def liveness(rank: int) -> str | None:
            return verdicts.get(rank) or by_exit_code(rank)

        t = DistTransport(group, device="cpu", liveness=liveness)
        kind, hello = t.recv(1, timeout_s=20)
        assert kind == "hello" and int(hello["pid"]) == procs[0].pid

        # Nothing arrives in time -> PeerFailedError; the interrupted receive is resumed later.
        start = time.monotonic()
        with pytest.raises(PeerFailedError, match=r"rank 1 .*within 0.3 s"):
            t.recv(1, timeout_s=0.3)
        assert time.monotonic() - start < 2.0
        t.send(1, "go", {})
        kind, reply = t.recv(1, timeout_s=20)
        assert kind == "reply" and torch.equal(reply["x"], torch.arange(3))

        # Liveness reporting the peer dead ends a wait without timeout.
        verdicts[1] = "declared dead by the test"
        with pytest.raises(PeerFailedError, match="rank 1 failed: declared dead by the test"):
            t.recv(1)
        verdicts.clear()

        # A SIGKILLed peer ends a waiting recv promptly (connection reset or liveness, whichever first).
        threading.Timer(0.3, os.kill, (procs[0].pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(PeerFailedError, match="rank 1"):
            t.recv(1, timeout_s=15)
        assert time.monotonic() - start < 5.0

        # Sending to the dead peer fails too, and close() does not hang.
        start = time.monotonic()
        with pytest.raises(PeerFailedError, match="rank 1"):
            for _ in range(8):
                t.send(1, "forward", {"x": torch.zeros(3)})
            t.flush(timeout_s=5)
        assert time.monotonic() - start < 5.0
        t.close()


def test_connect_ring_rejects_bad_addresses() -> None:
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        connect_ring(0, 2, init_method="file:///tmp/x")
    with pytest.raises(ValueError, match="outside a world of 2"):
        connect_ring(2, 2, init_method="tcp://127.0.0.1:1")


@pytest.mark.timeout(60)
def test_two_rings_in_one_process_are_independent() -> None:
    """Two pipelines' rings side by side in one process (replicas): each carries its own traffic."""
    ports = [free_port(), free_port()]
    groups: dict[tuple[int, int], RingGroup] = {}

    def join(ring: int, rank: int) -> None:
        groups[ring, rank] = connect_ring(rank, 2, init_method=f"tcp://127.0.0.1:{ports[ring]}", timeout_s=20)

    threads = [threading.Thread(target=join, args=(r, k)) for r in range(2) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    ends = {key: DistTransport(g, device="cpu") for key, g in groups.items()}
    for ring in range(2):
        ends[ring, 0].send(1, f"ring{ring}", {"x": torch.full((3,), ring)})
    for ring in range(2):
        kind, msg = ends[ring, 1].recv(0, timeout_s=10)
        assert kind == f"ring{ring}" and msg["x"].tolist() == [ring] * 3
    for t in ends.values():
        t.close()


def test_queue_transport_is_a_transport() -> None:
    assert isinstance(QueueTransport(QueueHub(1), 0), Transport)
