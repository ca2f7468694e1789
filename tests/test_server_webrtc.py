"""WebRTC end to end on loopback: an aiortc client receives a text-to-video stream from the tiny
model at the session's fps, changes the prompt over the `control` data channel and gets an ack with
the frame id; a video-to-video stream from a synthetic camera track; the one-shot offer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from rollcast.server.background import BackgroundServer
from tests.server_helpers import tiny_serve_config

FPS = 16


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(tiny_serve_config()) as srv:
        yield srv


class MovingBar(VideoStreamTrack):
    """A 30 fps camera: a white bar sweeping over black, 160x120."""

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        img = np.zeros((120, 160, 3), np.uint8)
        x = (pts // 3000 * 4) % 160
        img[:, x:x + 8] = 255
        frame = VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def _stream(url: str, seconds: float, *, mode: str = "t2v", control: list[dict] = (),
                  one_shot: bool = False) -> dict[str, Any]:
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("control")
    messages: list[dict] = []
    frames: list[tuple[float, int, tuple[int, int]]] = []
    got_track = asyncio.Event()

    channel.on("message", lambda raw: messages.append(json.loads(raw)))
    if mode == "v2v":
        pc.addTrack(MovingBar())
    else:
        pc.addTransceiver("video", direction="recvonly")

    async def read(track: Any) -> None:
        try:
            while True:
                f = await track.recv()
                frames.append((time.monotonic(), f.pts, (f.width, f.height)))
        except MediaStreamError:
            pass

    readers: list[asyncio.Task] = []

    @pc.on("track")
    def on_track(track: Any) -> None:
        readers.append(asyncio.ensure_future(read(track)))
        got_track.set()

    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        if one_shot:
            body = {"sdp": pc.localDescription.sdp, "type": "offer",
                    "session": {"mode": mode, "prompt": "waves", "steps": 2}}
            r = await http.post("/v1/webrtc/offer", json=body)
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
        else:
            r = await http.post("/v1/sessions", json={"mode": mode, "prompt": "a red circle", "steps": 2})
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
            r = await http.post(f"/v1/sessions/{sid}/offer", json=offer)
            assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["type"] == "answer" and answer["session_id"] == sid
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        await asyncio.wait_for(got_track.wait(), 10)
        t0 = time.monotonic()
        for msg in control:
            while channel.readyState != "open":
                await asyncio.sleep(0.05)
            await asyncio.sleep(max(0.0, t0 + msg.pop("_at", 0.0) - time.monotonic()))
            channel.send(json.dumps(msg))
        await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
        info = (await http.get(f"/v1/sessions/{sid}")).json()
        await http.delete(f"/v1/sessions/{sid}")
    await asyncio.sleep(0.3)  # stream_stopped on the channel
    for t in readers:
        t.cancel()
    await pc.close()
    return {"frames": frames, "messages": messages, "info": info, "session_id": sid}


def _steady_fps(frames: list[tuple[float, int, tuple[int, int]]]) -> float:
    """Frames per second after the first second (jitter buffer start-up excluded)."""
    t_first = frames[0][0]
    later = [t for t, _, _ in frames if t > t_first + 1.0]
    return (len(later) - 1) / (later[-1] - later[0])


def test_t2v_stream_at_target_fps_and_prompt_change_ack(server: BackgroundServer) -> None:
    change = {"type": "params.update", "id": 11, "params": {"prompt": "a blue square"}, "_at": 1.0}
    out = asyncio.run(_stream(server.url, 5.0, control=[change]))
    frames = out["frames"]
    assert len(frames) >= 3.0 * FPS, f"{len(frames)} frames in 5 s"
    assert abs(_steady_fps(frames) - FPS) <= 2.0
    assert {size for _, _, size in frames} == {(64, 64)}
    # 90 kHz timestamps one frame period apart (the sender's clock, not the network's).
    steps = np.diff([pts for _, pts, _ in frames])
    assert np.median(steps) == pytest.approx(90_000 / FPS, abs=2)
    acks = [m for m in out["messages"] if m.get("type") == "ack"]
    assert [a["id"] for a in acks] == [11]
    assert acks[0]["applied_at_frame"] in range(9, 200, 12)  # a block boundary: 9 + 12k
    stats = [m for m in out["messages"] if m.get("type") == "stats"]
    assert stats and stats[-1]["frames_sent"] > 0
    assert out["info"]["stats"]["ttff_ms"] < 3000 and out["info"]["transport"] == "webrtc"
    assert any(m.get("type") == "stream_stopped" for m in out["messages"])


def test_v2v_stream_from_a_synthetic_camera(server: BackgroundServer) -> None:
    out = asyncio.run(_stream(server.url, 4.0, mode="v2v"))
    assert len(out["frames"]) >= 2.0 * FPS
    stats = out["info"]["stats"]
    # The 30 fps camera is sampled to the session's 16 fps: about half the input frames dropped.
    assert stats["dropped"]["input"] > 0 and stats["frames_generated"] >= 21
    assert out["info"]["state"] == "active"


def test_one_shot_offer(server: BackgroundServer) -> None:
    out = asyncio.run(_stream(server.url, 2.5, one_shot=True))
    assert len(out["frames"]) >= FPS
