"""Video files: H.264 and .npy output written atomically, input decoding with frame-rate
resampling and aspect-preserving resize, and clear errors for bad inputs and outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rollcast.workers.video_file import (
    VideoFileError,
    VideoFileWriter,
    check_output_path,
    fit_frames,
    read_video,
    to_pixels,
    to_uint8,
)


def gradient_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth frames (H.264-friendly) whose brightness encodes the frame index."""
    x = np.linspace(0, 120, w, dtype=np.float32)[None, None, :, None]
    frames = np.broadcast_to(x, (n, h, w, 3)).copy()
    frames += np.arange(n, dtype=np.float32)[:, None, None, None] * 10
    return frames.clip(0, 255).astype(np.uint8)


def write(path: Path, frames: np.ndarray, fps: float = 16) -> None:
    t, h, w, _ = frames.shape
    with VideoFileWriter(path, width=w, height=h, fps=fps, frames=t) as out:
        out.write(frames[: t // 2])
        out.write(frames[t // 2:])


def test_npy_output_is_exact(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (7, 16, 32, 3), dtype=np.uint8)
    write(tmp_path / "a.npy", frames)
    back = np.load(tmp_path / "a.npy")
    assert back.dtype == np.uint8 and back.shape == (7, 16, 32, 3)
    np.testing.assert_array_equal(back, frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_mp4_round_trip_keeps_count_and_content(tmp_path: Path) -> None:
    frames = gradient_frames(12)
    write(tmp_path / "a.mp4", frames, fps=16)
    back = read_video(tmp_path / "a.mp4", resolution=(64, 48))
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3  # lossy, but close
    # Brightness order survives: the frames come back in order.
    means = back.reshape(12, -1).mean(1)
    assert np.all(np.diff(means) > 0)


def test_frame_rate_resampling_by_presentation_time(tmp_path: Path) -> None:
    write(tmp_path / "a.mp4", gradient_frames(30), fps=30)  # 1 s of video
    assert len(read_video(tmp_path / "a.mp4", resolution=(32, 32), fps=16)) == 16
    assert len(read_video(tmp_path / "a.mp4", resolution=(32, 32), fps=60)) == 60
    assert len(read_video(tmp_path / "a.mp4", resolution=(32, 32), fps=16, max_frames=5)) == 5


def test_fit_frames_crops_to_the_aspect_then_resizes() -> None:
    frames = np.zeros((1, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # a white centre square 40x40 in a 2:1 frame
    out = fit_frames(frames, 16, 16)  # square target: the black sides are cropped away
    assert out.shape == (1, 16, 16, 3)
    assert out.min() == 255


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    frames = gradient_frames(4, 16, 16)
    for name in ("a.mp4", "a.npy"):
        with (pytest.raises(RuntimeError, match="boom"),
              VideoFileWriter(tmp_path / name, width=16, height=16, fps=16, frames=4) as out):
            out.write(frames[:2])
            raise RuntimeError("boom")
        with (pytest.raises(RuntimeError, match="wrote 2 of 4"),
              VideoFileWriter(tmp_path / name, width=16, height=16, fps=16, frames=4) as out):
            out.write(frames[:2])
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(VideoFileError, match="no such file"):
        read_video(tmp_path / "missing.mp4", resolution=(16, 16))
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video")
    with pytest.raises(VideoFileError, match="cannot decode"):
        read_video(tmp_path / "junk.mp4", resolution=(16, 16))
    np.save(tmp_path / "floats.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(VideoFileError, match=r"expected uint8 frames \[T, H, W, 3\]"):
        read_video(tmp_path / "floats.npy", resolution=(16, 16))
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(VideoFileError, match="no frames"):
        read_video(tmp_path / "empty.npy", resolution=(16, 16))
    with pytest.raises(VideoFileError, match=r"unsupported file type '\.avi'"):
        check_output_path(tmp_path / "out.avi")
    with pytest.raises(VideoFileError, match="does not exist"):
        check_output_path(tmp_path / "nodir" / "out.mp4")


def test_pixel_conversions_round_trip() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    px = to_pixels(frames)
    assert px.shape == (3, 3, 4, 5) and px.min() >= -1 and px.max() <= 1
    np.testing.assert_array_equal(to_uint8(px), frames)
    assert to_uint8(torch.full((3, 1, 2, 2), 5.0)).max() == 255  # clamped, not wrapped
