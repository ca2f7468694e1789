"""Scores a generated shapes video against its prompt without a neural judge.

Pixels are segmented by nearest colour: each pixel takes the closest of the dataset's object colours
or the frame's background (the median of its border pixels), if it is within `max_distance` of it.
Each colour's area and centroid per frame are then the measurements:

- colour accuracy: share of frames whose dominant object colours are the prompted ones (every
  prompted colour covers at least `min_area_frac` of an object, and no other colour covers more
  than the smallest prompted one). A failing frame gets one reason (COLOR_FAILURES): a prompted
  colour scattered, a prompted object missing or too small, or another colour outgrowing one;
- direction accuracy: share of short steps (the frames the fastest prompted object needs to cross
  `window_frac` of the width) in which each object's centroid moves along its prompted direction.
  Objects bounce: the expected direction flips each time the track, seen moving as prompted,
  reaches the wall it was heading to; steps near a wall (where the bounce happens) are not scored;
- persistence: share of frames in which every prompted object is present;
- smoothness: share of frame-to-frame centroid steps no longer than the fastest speed plus a
  tolerance (no teleporting or flicker of the track).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rollcast.workers.shapes_dataset import COLORS, DIRECTIONS, SPEEDS, Clip, ShapeObject

COLOR_NAMES = tuple(COLORS)
# Why a frame fails colour, in the order a frame's reason is picked: a prompted colour's pixels
# scatter (a streak, a smear, two objects stuck together); a prompted object is missing or smaller
# than `min_area_frac` (it dimmed away); or another colour's blob outgrows a prompted one.
COLOR_FAILURES = ("not_compact", "too_small", "other_color")
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], np.float32)  # [K, 3]


@dataclass(frozen=True)
class DetectorConfig:
    max_distance: float = 100.0  # RGB distance beyond which a pixel is nobody's
    min_area_frac: float = 0.3  # of the object's nominal area, for "present"
    # Also for "present": the colour's pixels lie in one compact blob, their RMS distance from
    # their centroid at most this many object radii (a disc or square: ~0.7; scattered noise: ~3).
    max_spread: float = 1.2
    # A direction step spans the frames the fastest prompted object needs to cross this share of
    # the width (8 frames slowly, 4 quickly): long enough to measure, short enough to fit between walls.
    window_frac: float = 0.125
    min_motion_frac: float = 0.4  # of the nominal displacement over a window
    jump_tolerance_frac: float = 0.04  # of the width, added to the fastest speed
    chunk: int = 64  # frames segmented at once (bounds memory on long videos)
    stride: int = 2  # segment every stride-th pixel per axis (4x less work; centroids barely move)


@dataclass
class Tracks:
    """Per-frame measurements of a video per colour: area [T, K], centroid [T, K, 2] (x, y) and
    spread [T, K] (RMS distance of the colour's pixels from their centroid)."""

    area: np.ndarray
    centroid: np.ndarray
    spread: np.ndarray
    width: int
    height: int


@dataclass
class VideoScore:
    """Per-frame verdicts of one video; `summary` turns any frame range of them into scores."""

    frames: int
    # [T] int8: -1 where colour holds, else the index of the frame's reason in COLOR_FAILURES.
    color_failure: np.ndarray = field(repr=False)
    present: np.ndarray = field(repr=False)  # [T] bool: every prompted object present
    # Per frame transition t -> t+1 where an object was tracked: whether every such step was smooth
    # (-1: nothing tracked, 0: a jump, 1: smooth).
    smooth: np.ndarray = field(repr=False)
    # Per scored direction window: its first frame and whether every object moved as prompted.
    direction_frames: np.ndarray = field(repr=False)
    direction_ok: np.ndarray = field(repr=False)

    def summary(self, start: int = 0, end: int | None = None) -> dict[str, float]:
        """Scores over frames [start, end): colour, direction, persistence, smoothness (shares)."""
        end = self.frames if end is None else min(end, self.frames)
        sl = slice(start, end)
        sm = self.smooth[start:max(start, end - 1)]
        sm = sm[sm >= 0]
        d = self.direction_ok[(self.direction_frames >= start) & (self.direction_frames < end)]
        return {
            "color": float(self.color_ok[sl].mean()) if end > start else 0.0,
            "direction": float(d.mean()) if len(d) else 0.0,
            "persistence": float(self.present[sl].mean()) if end > start else 0.0,
            "smoothness": float(sm.mean()) if len(sm) else 0.0,
        }

    @property
    def color_ok(self) -> np.ndarray:
        """[T] bool: the prompted colours dominate."""
        return self.color_failure < 0

    def color_failures(self, start: int = 0, end: int | None = None) -> dict[str, int]:
        """How many frames of [start, end) fail colour, by reason (they sum to the failing frames)."""
        f = self.color_failure[start:end]
        return {name: int((f == i).sum()) for i, name in enumerate(COLOR_FAILURES)}

    @property
    def color(self) -> float:
        return self.summary()["color"]

    @property
    def direction(self) -> float:
        return self.summary()["direction"]

    @property
    def persistence(self) -> float:
        return self.summary()["persistence"]

    @property
    def smoothness(self) -> float:
        return self.summary()["smoothness"]


def _background(frames: np.ndarray) -> np.ndarray:
    """Per-frame background colour [T, 3]: the median of the border pixels."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    return np.median(border.astype(np.float32), axis=1)


def track(frames: np.ndarray, config: DetectorConfig | None = None) -> Tracks:
    """Segment uint8 frames [T, H, W, 3] by nearest colour; areas and centroids per colour."""
    cfg = config or DetectorConfig()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.shape}")
    t, h, w, _ = frames.shape
    k = len(COLOR_NAMES)
    st = cfg.stride
    frames = frames[:, st // 2::st, st // 2::st]
    area = np.zeros((t, k), np.float32)
    centroid = np.full((t, k, 2), np.nan, np.float32)
    spread = np.full((t, k), np.nan, np.float32)
    ys, xs = np.mgrid[st // 2:h:st, st // 2:w:st].astype(np.float32) + 0.5
    for s in range(0, t, cfg.chunk):
        x = frames[s:s + cfg.chunk].astype(np.float32)
        bg = _background(x)
        d_obj = np.linalg.norm(x[..., None, :] - _PALETTE, axis=-1)  # [n, H, W, K]
        d_bg = np.linalg.norm(x - bg[:, None, None], axis=-1)  # [n, H, W]
        nearest = d_obj.argmin(-1)
        best = np.take_along_axis(d_obj, nearest[..., None], -1)[..., 0]
        # An object colour too close to the background (a white shape is not a gray frame's
        # background) would otherwise claim background pixels.
        valid = (best < cfg.max_distance) & (best < d_bg)
        for c in range(k):
            m = valid & (nearest == c)
            a = m.sum((1, 2)).astype(np.float32)
            area[s:s + len(x), c] = a * st * st
            with np.errstate(invalid="ignore", divide="ignore"):
                centroid[s:s + len(x), c, 0] = (m * xs).sum((1, 2)) / a
                centroid[s:s + len(x), c, 1] = (m * ys).sum((1, 2)) / a
                sq = (m * (xs * xs + ys * ys)).sum((1, 2)) / a
                cx, cy = centroid[s:s + len(x), c, 0], centroid[s:s + len(x), c, 1]
                spread[s:s + len(x), c] = np.sqrt(np.maximum(sq - cx * cx - cy * cy, 0))
    return Tracks(area, centroid, spread, w, h)


def _nominal_area(clip: Clip) -> float:
    return float(np.pi * clip.radius**2)


def _color_verdict(tracks: Tracks, clip: Clip, cfg: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: [T, n] presence of each object, and why colour fails (index into
    COLOR_FAILURES; -1 where the prompted colours dominate)."""
    idx = [COLOR_NAMES.index(o.color) for o in clip.objects]
    min_area = cfg.min_area_frac * _nominal_area(clip)
    with np.errstate(invalid="ignore"):
        compact = tracks.spread <= cfg.max_spread * clip.radius  # NaN (no pixels): False
    scattered = ~compact & ~np.isnan(tracks.spread)  # pixels, but spread out (none: missing)
    blob = np.where(compact, tracks.area, 0.0)  # area that counts as an object
    present = blob[:, idx] >= min_area  # [T, n]
    others = np.delete(blob, idx, axis=1)
    other_max = others.max(1) if others.shape[1] else np.zeros(len(tracks.area))
    dominant = blob[:, idx].min(1) > other_max
    ok = present.all(1) & dominant
    not_compact = scattered[:, idx].any(1)
    reason = np.select([ok, not_compact, ~present.all(1)], [-1, 0, 1], 2).astype(np.int8)
    return present, reason


def window_frames(clip: Clip, cfg: DetectorConfig) -> int:
    fastest = max(SPEEDS[o.speed] for o in clip.objects)
    return max(2, round(cfg.window_frac / fastest))


def _direction_steps(c: np.ndarray, present: np.ndarray, obj: ShapeObject, clip: Clip,
                     cfg: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Window start frames scored for one object, and whether it moved as expected in each."""
    dx, dy = DIRECTIONS[obj.direction]
    axis = 0 if dx else 1
    sign = float(dx or dy)
    extent = clip.width if axis == 0 else clip.height
    speed = SPEEDS[obj.speed] * clip.width
    w = window_frames(clip, cfg)
    margin = clip.radius + speed * w + cfg.jump_tolerance_frac * clip.width
    starts, oks = [], []
    near = False
    last_ok = False
    for s in range(0, len(c) - w, w):
        e = s + w
        if not (present[s] and present[e]):
            continue
        pos = np.array([c[s, axis], c[e, axis]])
        at_low, at_high = (pos < margin).any(), (pos > extent - margin).any()
        if at_low or at_high:
            # Seen moving as expected into the wall it now reached: it bounces, so the expected
            # direction flips (once per visit). An object that starts at a wall, or drifted the
            # wrong way into it, earns no flip.
            if not near and last_ok and ((sign < 0 and at_low) or (sign > 0 and at_high)):
                sign = -sign
            near = True
            continue
        near = False
        d = c[e] - c[s]  # (x, y)
        along, across = d[axis], d[1 - axis]
        ok = along * sign >= cfg.min_motion_frac * speed * w and abs(along) >= abs(across)
        last_ok = bool(ok)
        starts.append(s)
        oks.append(last_ok)
    return np.array(starts, int), np.array(oks, bool)


def score_tracks(tracks: Tracks, clip: Clip, config: DetectorConfig | None = None) -> VideoScore:
    cfg = config or DetectorConfig()
    t = len(tracks.area)
    present, color_failure = _color_verdict(tracks, clip, cfg)
    fastest = max(SPEEDS.values()) * clip.width
    max_jump = fastest + cfg.jump_tolerance_frac * clip.width
    per_window: dict[int, list[bool]] = {}
    smooth = np.full(max(t - 1, 0), -1, np.int8)
    for i, obj in enumerate(clip.objects):
        c = tracks.centroid[:, COLOR_NAMES.index(obj.color)]
        starts, oks = _direction_steps(c, present[:, i], obj, clip, cfg)
        for s, ok in zip(starts.tolist(), oks.tolist(), strict=True):
            per_window.setdefault(s, []).append(ok)
        both = present[1:, i] & present[:-1, i]
        ok = np.linalg.norm(c[1:] - c[:-1], axis=1) <= max_jump
        # A transition is smooth only if every object tracked across it moved smoothly.
        smooth = np.where(both, np.where(ok & (smooth != 0), 1, 0), smooth).astype(np.int8)
    frames = np.array(sorted(per_window), int)
    dir_ok = np.array([all(per_window[s]) for s in frames.tolist()], bool)
    return VideoScore(frames=t, color_failure=color_failure, present=present.all(1),
                      smooth=smooth, direction_frames=frames, direction_ok=dir_ok)


def slice_tracks(tracks: Tracks, start: int, end: int | None = None) -> Tracks:
    return Tracks(tracks.area[start:end], tracks.centroid[start:end], tracks.spread[start:end],
                  tracks.width, tracks.height)


def concat_tracks(parts: list[Tracks]) -> Tracks:
    """Tracks of consecutive pieces of one video (streamed scoring of long videos)."""
    return Tracks(np.concatenate([p.area for p in parts]), np.concatenate([p.centroid for p in parts]),
                  np.concatenate([p.spread for p in parts]), parts[0].width, parts[0].height)


def score_video(frames: np.ndarray, clip: Clip, config: DetectorConfig | None = None) -> VideoScore:
    """Score uint8 frames [T, H, W, 3] against the clip (or parsed prompt) they should show."""
    if frames.shape[1:3] != (clip.height, clip.width):
        raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, "
                         f"the clip {clip.width}x{clip.height}")
    return score_tracks(track(frames, config), clip, config)


def frames_to_adapt(ok: np.ndarray, frame_of: np.ndarray, switch: int, hold: int) -> int | None:
    """Frames from `switch` until `ok` holds for `hold` consecutive entries (frame_of[i] is the
    frame of entry i); None if it never does."""
    run = 0
    for i in np.nonzero(frame_of >= switch)[0].tolist():
        run = run + 1 if ok[i] else 0
        if run >= hold:
            return int(frame_of[i - hold + 1] - switch)
    return None
