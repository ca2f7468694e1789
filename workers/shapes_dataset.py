"""A procedural video dataset: coloured shapes moving in named directions, bouncing off the edges.

Every clip is a pure function of (seed, index): its attributes are drawn from a generator seeded by
both, and its frames are rendered on demand from closed-form trajectories, so any frame of any clip
can be produced without simulating the frames before it (training reads windows deep into a clip).

The prompt is built from the attributes ("a red circle moving left slowly on a black background";
sometimes "... and a blue square moving up quickly ..."), and `parse_prompt` reads it back, so the
detector (`shape_detector.py`) scores generated videos against the attributes a prompt asks for.

A lone object starts at the centre, two on their own lanes (`start_point`), up to a small jitter.
That keeps the first frames nearly determined by the prompt, which is what a one-step sampler (it
predicts the mean clip for a prompt) needs to draw a sharp object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Object colours are far apart in RGB and from both backgrounds, so nearest-colour segmentation
# separates them even after a lossy VAE.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 230),
    "magenta": (220, 50, 220),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (110, 110, 110)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Pixels per frame as a fraction of the frame's width (2 and 4 px at 128x128).
SPEEDS: dict[str, float] = {"slowly": 1 / 64, "quickly": 1 / 32}
# Object half-extent as a fraction of the shorter side (16 px at 128x128).
SIZE = 0.125
JITTER = 0.03  # start-position jitter, fraction of the shorter side
FUNCTION_WORDS = ("a", "an", "moving", "and", "on", "background")
VOCABULARY: tuple[str, ...] = (*FUNCTION_WORDS, *COLORS, *BACKGROUNDS, *SHAPES, *DIRECTIONS, *SPEEDS)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    direction: str
    speed: str
    # Start offset (fractions of the shorter side) from the direction's fixed start point.
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def phrase(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} {self.speed}"


@dataclass(frozen=True)
class Clip:
    objects: tuple[ShapeObject, ...]
    background: str
    width: int = 128
    height: int = 128

    @property
    def prompt(self) -> str:
        return " and ".join(o.phrase for o in self.objects) + f" on a {self.background} background"

    @property
    def radius(self) -> float:
        return SIZE * min(self.width, self.height)

    def speed_px(self, obj: ShapeObject) -> float:
        return SPEEDS[obj.speed] * self.width


def sample_clip(rng: np.random.Generator, width: int = 128, height: int = 128,
                two_objects: float = 0.25) -> Clip:
    """Random attributes: one object, or two (probability `two_objects`) of different colours."""
    background = str(rng.choice(list(BACKGROUNDS)))
    n = 2 if rng.random() < two_objects else 1
    colors = rng.choice(list(COLORS), size=n, replace=False)
    objects = tuple(
        ShapeObject(shape=str(rng.choice(SHAPES)), color=str(c), direction=str(rng.choice(list(DIRECTIONS))),
                    speed=str(rng.choice(list(SPEEDS))),
                    jitter=(float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(-JITTER, JITTER))))
        for c in colors
    )
    return Clip(objects, background, width, height)


def parse_prompt(prompt: str, width: int = 128, height: int = 128) -> Clip:
    """The clip a prompt describes (jitter zero); ValueError if it is not a dataset prompt."""
    text = " ".join(re.findall(r"[a-z]+", prompt.lower()))
    m = re.fullmatch(r"(.+) on an? (\w+) background", text)
    if m is None or m.group(2) not in BACKGROUNDS:
        raise ValueError(f"not a shapes prompt (no known background): {prompt!r}")
    objects = []
    for phrase in m.group(1).split(" and "):
        words = phrase.split()
        if len(words) != 6 or words[0] not in ("a", "an") or words[3] != "moving":
            raise ValueError(f"not a shapes prompt: {phrase!r} in {prompt!r}")
        _, color, shape, _, direction, speed = words
        if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS or speed not in SPEEDS:
            raise ValueError(f"unknown attribute in {phrase!r}")
        objects.append(ShapeObject(shape, color, direction, speed))
    return Clip(tuple(objects), m.group(2), width, height)


# -- trajectories -------------------------------------------------------------------------------------


def _reflect(p: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Unfolded positions p folded into [lo, hi] by reflection (bouncing), and the sign (+1/-1)
    of the folded motion relative to the unfolded one."""
    span = hi - lo
    u = np.mod(p - lo, 2 * span)
    forward = u <= span
    return np.where(forward, lo + u, lo + 2 * span - u), np.where(forward, 1.0, -1.0)


def start_point(clip: Clip, index: int) -> tuple[float, float]:
    """Object `index`'s position at frame 0: the middle of the frame along its motion, on lane
    (index + 1) / (n + 1) across it, plus its jitter. A lone object starts at the centre whatever
    its direction: the first block then depends on the prompt only through colour, shape and
    background, and direction only has to move it, relative to where it already is (a DiT with
    RoPE alone knows relative positions long before absolute ones; with direction-dependent
    starts the first training run drew the mean of the four starts, a blob in the middle)."""
    obj = clip.objects[index]
    dx, dy = DIRECTIONS[obj.direction]
    lane = (index + 1) / (len(clip.objects) + 1)
    side = min(clip.width, clip.height)
    x = clip.width * 0.5 if dx else clip.width * lane
    y = clip.height * 0.5 if dy else clip.height * lane
    return x + obj.jitter[0] * side, y + obj.jitter[1] * side


def trajectory(clip: Clip, index: int, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres [T, 2] (x, y) of object `index` at the given frame numbers, and its velocity [T, 2]
    (pixels per frame, sign flipped after each bounce)."""
    obj = clip.objects[index]
    dx, dy = DIRECTIONS[obj.direction]
    x0, y0 = start_point(clip, index)
    r, v = clip.radius, clip.speed_px(obj)
    t = frames.astype(np.float64)
    x, sx = _reflect(x0 + dx * v * t, r, clip.width - r)
    y, sy = _reflect(y0 + dy * v * t, r, clip.height - r)
    return np.stack([x, y], 1), np.stack([dx * v * sx, dy * v * sy], 1)


# -- rendering ----------------------------------------------------------------------------------------


def shape_mask(shape: str, cx: np.ndarray, cy: np.ndarray, r: float, height: int, width: int) -> np.ndarray:
    """Boolean masks [T, H, W] of a shape centred at (cx[t], cy[t]) with half-extent r."""
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5
    dx = xs - cx.astype(np.float32)[:, None, None]
    dy = ys - cy.astype(np.float32)[:, None, None]
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        # Same area as the circle: half-side r·sqrt(pi)/2.
        h = r * 0.886
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Upright triangle: apex at (0, -r), base at y = 0.8r, 2.2r wide.
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * (1.1 / 1.8))
    raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")


def render(clip: Clip, start: int, frames: int) -> np.ndarray:
    """Frames start .. start + frames - 1 of the clip, uint8 [T, H, W, 3]. Later objects are drawn
    over earlier ones."""
    t = np.arange(start, start + frames)
    out = np.empty((frames, clip.height, clip.width, 3), np.uint8)
    out[:] = np.array(BACKGROUNDS[clip.background], np.uint8)
    for i, obj in enumerate(clip.objects):
        centre, _ = trajectory(clip, i, t)
        mask = shape_mask(obj.shape, centre[:, 0], centre[:, 1], clip.radius, clip.height, clip.width)
        out[mask] = np.array(COLORS[obj.color], np.uint8)
    return out


class ShapesDataset:
    """Clip i of a seed, rendered on the fly: `clip(i)` is its attributes, `frames(i, ...)` pixels."""

    def __init__(self, seed: int, width: int = 128, height: int = 128, two_objects: float = 0.25) -> None:
        self.seed = seed
        self.width = width
        self.height = height
        self.two_objects = two_objects

    def clip(self, index: int) -> Clip:
        rng = np.random.default_rng([self.seed, index])
        return sample_clip(rng, self.width, self.height, self.two_objects)

    def frames(self, index: int, frames: int, start: int = 0) -> np.ndarray:
        return render(self.clip(index), start, frames)
