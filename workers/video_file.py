"""Video files in and out: decoding input videos for video-to-video, writing .mp4 / .npy results.

Frames are uint8 arrays [T, H, W, 3] (RGB). Reading decodes with PyAV (FFmpeg), resamples to the
model's frame rate by presentation time, and fits each frame to the model's resolution by a centre
crop to its aspect ratio followed by an antialiased resize (stretching would distort faces). `.npy`
inputs are taken frame for frame.

Writing goes to a hidden temporary file beside the target and is renamed into place only when
complete, so an interrupted or failed run never leaves a half-written result at the target path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

OUTPUT_SUFFIXES = (".mp4", ".npy")


class VideoFileError(ValueError):
    """An input video that cannot be read, or an output path that cannot be written."""


# -- reading ---------------------------------------------------------------------------------


def fit_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop [T, H, W, 3] uint8 frames to width:height and resize them to exactly that."""
    _, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    target = width / height
    if w / h > target:  # too wide: crop the sides
        cw, ch = round(h * target), h
    else:
        cw, ch = w, round(w / target)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    x = torch.from_numpy(frames[:, y0:y0 + ch, x0:x0 + cw]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _decoded_frames(path: Path, fps: float | None) -> Iterator[np.ndarray]:
    """RGB frames of the first video stream, resampled to `fps` by presentation time: output
    instant k/fps shows the latest source frame at or before it (a faster source drops frames,
    a slower one repeats them)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoFileError(f"input video {path}: the file has no video stream")
        stream = container.streams.video[0]
        source_rate = float(stream.average_rate or 0) or None
        held: np.ndarray | None = None
        held_time = 0.0
        next_time: float | None = None
        for frame in container.decode(stream):
            if fps is None or frame.time is None:
                yield frame.to_ndarray(format="rgb24")
                continue
            if next_time is None:
                next_time = frame.time
            while held is not None and next_time < frame.time - 1e-6:
                yield held
                next_time += 1.0 / fps
            held, held_time = frame.to_ndarray(format="rgb24"), frame.time
        if held is not None and next_time is not None:
            end = held_time + 1.0 / (source_rate or fps)
            while next_time < end - 1e-6:
                yield held
                next_time += 1.0 / fps


def read_video(
    path: str | Path, *, resolution: tuple[int, int], fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Decode `path` (a video file or an .npy array [T, H, W, 3] uint8) to [T, height, width, 3]."""
    p = Path(path)
    width, height = resolution
    if not p.is_file():
        raise VideoFileError(f"input video {p}: no such file")
    if p.suffix == ".npy":
        try:
            frames = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VideoFileError(f"input video {p}: not a readable .npy array ({e})") from e
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise VideoFileError(f"input video {p}: expected uint8 frames [T, H, W, 3], got "
                                 f"{frames.dtype} {tuple(frames.shape)}")
        frames = frames[:max_frames]
    else:
        out: list[np.ndarray] = []
        try:
            for frame in _decoded_frames(p, fps):
                out.append(frame)
                if max_frames is not None and len(out) >= max_frames:
                    break
        except (av.FFmpegError, UnicodeDecodeError) as e:
            raise VideoFileError(f"input video {p}: cannot decode ({e})") from e
        frames = np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)
    if len(frames) == 0:
        raise VideoFileError(f"input video {p}: no frames")
    return fit_frames(frames, width, height)


# -- writing ---------------------------------------------------------------------------------


def check_output_path(path: str | Path) -> Path:
    """Validate an output path before any work is done."""
    p = Path(path)
    if p.suffix not in OUTPUT_SUFFIXES:
        raise VideoFileError(f"output {p}: unsupported file type {p.suffix or '(none)'!r}; "
                             f"use one of {list(OUTPUT_SUFFIXES)}")
    if not p.parent.is_dir():
        raise VideoFileError(f"output {p}: directory {p.parent} does not exist")
    if p.is_dir():
        raise VideoFileError(f"output {p}: is a directory")
    return p


def _bitrate(width: int, height: int, fps: float) -> int:
    """About 0.1 bit per pixel per frame: clean H.264 for generated content."""
    return max(200_000, int(0.1 * width * height * fps))


class VideoFileWriter:
    """Writes uint8 frames [T, H, W, 3] incrementally to .mp4 (H.264) or .npy, atomically.

    Use as a context manager: on a clean exit the file is renamed into place; on an exception the
    temporary file is removed and nothing appears at `path`.
    """

    def __init__(self, path: str | Path, *, width: int, height: int, fps: float, frames: int) -> None:
        self.path = check_output_path(path)
        self.width, self.height, self.fps, self.total = width, height, fps, frames
        self.tmp = self.path.with_name(f".{self.path.name}.partial{self.path.suffix}")
        self.written = 0
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._array: np.memmap | None = None

    def __enter__(self) -> VideoFileWriter:
        if self.path.suffix == ".npy":
            self._array = np.lib.format.open_memmap(
                self.tmp, mode="w+", dtype=np.uint8, shape=(self.total, self.height, self.width, 3))
        else:
            self._container = av.open(str(self.tmp), mode="w", format="mp4")
            stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            stream.width, stream.height = self.width, self.height
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = _bitrate(self.width, self.height, self.fps)
            stream.options = {"preset": "veryfast"}
            self._stream = stream
        return self

    def write(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be [T, {self.height}, {self.width}, 3], got {frames.shape}")
        n = min(len(frames), self.total - self.written)  # never more than announced
        if self._array is not None:
            self._array[self.written:self.written + n] = frames[:n]
        else:
            assert self._container is not None and self._stream is not None
            for f in frames[:n]:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                self._container.mux(self._stream.encode(frame))
        self.written += n

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None and self.written != self.total:
                raise RuntimeError(f"wrote {self.written} of {self.total} frames")
            self._finish()
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)

    def _finish(self) -> None:
        if self._array is not None:
            self._array.flush()
            del self._array
            self._array = None
        if self._container is not None:
            assert self._stream is not None
            self._container.mux(self._stream.encode(None))  # flush the encoder
            self._container.close()
            self._container = None


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels [3, T, H, W] in [-1, 1] → uint8 frames [T, H, W, 3]."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def to_pixels(frames: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 frames [T, H, W, 3] → pixels [3, T, H, W] in [-1, 1] (float32)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return x.permute(3, 0, 1, 2).float().div(127.5).sub(1)
