"""The server's parts without a model: frame queue, pacing, input sampling, wire format, control
message parsing."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from rollcast.server import control
from rollcast.server.frame_queue import Frame, FrameQueue
from rollcast.server.pacer import VIDEO_CLOCK_RATE, Pacer
from rollcast.server.video_input import InputSampler, fit_frame
from rollcast.server.websocket_transport import FRAME_HEADER, decode_frame, encode_frame


def _frames(ids: range) -> list[Frame]:
    return [Frame(i, np.full((4, 4, 3), i % 256, np.uint8), 0.0) for i in ids]


def test_frame_queue_drops_oldest_and_counts() -> None:
    async def run() -> None:
        q = FrameQueue(3, asyncio.get_running_loop())
        assert q.put_many(_frames(range(5))) == 2
        assert q.dropped == 2
        got = [q.get_nowait() for _ in range(4)]
        assert [f.frame_id for f in got if f] == [2, 3, 4] and got[-1] is None
        q.close()
        assert not await q.wait()

    asyncio.run(run())


def test_pacer_spaces_frames_and_repeats_instead_of_bursting() -> None:
    fps = 50.0

    async def run() -> list:
        loop = asyncio.get_running_loop()
        q = FrameQueue(16, loop)
        pacer = Pacer(q, fps)
        q.put_many(_frames(range(3)))
        out = [await pacer.next() for _ in range(3)]
        # The next chunk is late by ~3 frame periods: repeats, then the chunk, evenly spaced.
        loop.call_later(3.2 / fps, q.put_many, _frames(range(3, 6)))
        out += [await pacer.next() for _ in range(6)]
        q.close()
        out.append(await pacer.next())
        return out

    out = asyncio.run(run())
    assert out[-1] is None
    sent = out[:-1]
    ids = [p.frame.frame_id for p in sent]
    assert ids[:3] == [0, 1, 2]
    repeats = [p for p in sent if p.repeated]
    assert 2 <= len(repeats) <= 4 and all(p.frame.frame_id == 2 for p in repeats)
    assert [i for i in ids if i > 2] == [3, 4, 5][: len([i for i in ids if i > 2])]
    step = VIDEO_CLOCK_RATE / fps
    assert [p.pts for p in sent] == [round(k * step) for k in range(len(sent))]
    gaps = np.diff([p.t_sent for p in sent])
    assert gaps.min() > 0.5 / fps  # never a burst


def test_pacer_counts_one_freeze_per_run() -> None:
    async def run() -> list[bool]:
        q = FrameQueue(8, asyncio.get_running_loop())
        pacer = Pacer(q, 100.0)
        q.put_many(_frames(range(1)))
        sent = [await pacer.next() for _ in range(4)]  # frame 0, then three repeats
        q.put_many(_frames(range(1, 2)))
        sent.append(await pacer.next())
        sent.append(await pacer.next())  # repeat again: a second freeze
        return [p.repeated for p in sent if p is not None]

    repeated = asyncio.run(run())
    freezes = sum(1 for prev, cur in zip([False, *repeated], repeated, strict=False) if cur and not prev)
    assert (len(repeated), sum(repeated), freezes) == (6, 4, 2)


def test_input_sampler_keeps_one_frame_per_tick() -> None:
    s = InputSampler(10.0)
    arrivals = np.arange(0, 2.0, 1 / 30)  # a 30 fps camera for 2 s
    kept = [t for t in arrivals if s.keep(float(t))]
    assert 19 <= len(kept) <= 21
    assert s.dropped == len(arrivals) - len(kept)


def test_fit_frame_crops_to_aspect_and_resizes() -> None:
    img = np.zeros((480, 640, 3), np.uint8)
    img[:, :80] = 255  # a white band at the left edge is cropped away for a square output
    out = fit_frame(img, (64, 64))
    assert out.shape == (64, 64, 3) and out.max() < 40


def test_wire_frame_roundtrip_and_errors() -> None:
    px = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    data = encode_frame(41, 9000, px, repeated=True)
    f = decode_frame(data)
    assert (f.frame_id, f.pts, f.repeated) == (41, 9000, True) and np.array_equal(f.pixels, px)
    with pytest.raises(ValueError, match="shorter"):
        decode_frame(b"RCF1")
    with pytest.raises(ValueError, match="expected"):
        decode_frame(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="8x6 RGB frame"):
        decode_frame(data[:-1])
    assert FRAME_HEADER.size == 25


@pytest.mark.parametrize(("raw", "code", "where"), [
    ("{", "invalid_json", None),
    ("[1, 2]", "invalid_message", "message"),
    ('{"type": "warp"}', "invalid_message", None),
    ('{"type": "params.update", "id": 7, "params": {"steps": 0}}', "invalid_message", "params.steps"),
    ('{"type": "params.update", "params": {"colour": 1}}', "invalid_message", "params.colour"),
    ('{"type": "prompt.transition", "prompt": "x", "blocks": 0}', "invalid_message", "blocks"),
    ('{"type": "ping", "extra": 1}', "invalid_message", "extra"),
    ("x" * 20000, "message_too_large", None),
])
def test_control_parse_errors(raw: str, code: str, where: str | None) -> None:
    out = control.parse(raw)
    assert isinstance(out, dict) and out["type"] == "error" and out["error"] == code
    if where:
        assert out["message"].startswith(where)


def test_control_parse_typed() -> None:
    env = control.parse('{"type": "params.update", "id": "a", "params": {"prompt": "waves", "steps": 2}}')
    assert not isinstance(env, dict)
    assert env.message.type == "params.update" and env.message.params.steps == 2  # type: ignore[union-attr]
    env = control.parse('{"type": "ping"}')
    assert not isinstance(env, dict) and env.message.type == "ping"


def test_frame_queue_wakes_waiter_from_another_thread() -> None:
    import threading

    async def run() -> float:
        q = FrameQueue(4, asyncio.get_running_loop())
        t0 = time.monotonic()
        threading.Timer(0.05, q.put_many, args=(_frames(range(1)),)).start()
        assert await asyncio.wait_for(q.wait(), 2.0)
        return time.monotonic() - t0

    assert asyncio.run(run()) < 1.0


@pytest.mark.parametrize(("text", "urls", "user", "credential"), [
    ("stun:stun.example.org:3478", "stun:stun.example.org:3478", None, None),
    ("turn:relay.example.org:3478?transport=tcp", "turn:relay.example.org:3478?transport=tcp", None, None),
    ("turn:alice:s3cr:et@relay.example.org:3478", "turn:relay.example.org:3478", "alice", "s3cr:et"),
    ("turns:bob:pw@relay.example.org:5349", "turns:relay.example.org:5349", "bob", "pw"),
])
def test_ice_server_urls_and_turn_credentials(text: str, urls: str, user: str | None,
                                              credential: str | None) -> None:
    from rollcast.server.webrtc import ice_server

    server = ice_server(text)
    assert (server.urls, server.username, server.credential) == (urls, user, credential)


@pytest.mark.parametrize("text", ["relay.example.org:3478", "http://x", "turn:", "stun:u:p@host:3478",
                                  "turn:alice@relay:3478", "turn:alice:@relay:3478"])
def test_bad_ice_servers_are_refused(text: str) -> None:
    from rollcast.server.webrtc import ice_server

    with pytest.raises(ValueError, match=r"ICE server|TURN only"):
        ice_server(text)
