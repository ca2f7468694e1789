"""The colour/centroid detector on hand-drawn videos with known colour and motion, and on ones
that must score low (wrong colour, wrong direction, vanishing, teleporting, noise)."""

from __future__ import annotations

import numpy as np

from rollcast.workers.shape_detector import COLOR_FAILURES, frames_to_adapt, score_video
from rollcast.workers.shapes_dataset import parse_prompt

W = H = 128


def draw(xs: list[float], ys: list[float], rgb: tuple[int, int, int], bg: tuple[int, int, int] = (0, 0, 0),
         half: int = 14) -> np.ndarray:
    """A filled square per frame, centred at (xs[t], ys[t]), drawn by hand (not the dataset)."""
    out = np.empty((len(xs), H, W, 3), np.uint8)
    out[:] = bg
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        out[t, max(0, int(y) - half):int(y) + half, max(0, int(x) - half):int(x) + half] = rgb
    return out


def moving(start: float, step: float, n: int) -> list[float]:
    return [start + step * t for t in range(n)]


RED_RIGHT = "a red square moving right slowly on a black background"


def test_red_square_moving_right_scores_full_marks() -> None:
    video = draw(moving(30, 2, 40), [64] * 40, (200, 30, 30))  # not the palette's exact red
    s = score_video(video, parse_prompt(RED_RIGHT))
    assert (s.color, s.direction, s.persistence, s.smoothness) == (1.0, 1.0, 1.0, 1.0)
    assert len(s.direction_ok) >= 2


def test_wrong_colour_and_wrong_direction_score_zero() -> None:
    video = draw(moving(30, 2, 40), [64] * 40, (200, 30, 30))
    assert score_video(video, parse_prompt(RED_RIGHT.replace("red", "green"))).color == 0.0
    assert score_video(video, parse_prompt(RED_RIGHT.replace("right", "left"))).direction == 0.0
    assert score_video(video, parse_prompt(RED_RIGHT.replace("right", "up"))).direction == 0.0
    still = draw([64] * 40, [64] * 40, (200, 30, 30))
    assert score_video(still, parse_prompt(RED_RIGHT)).direction == 0.0


def test_vertical_motion_on_gray_with_a_white_object() -> None:
    video = draw([64] * 40, moving(100, -4, 40)[:40], (250, 250, 250), bg=(110, 110, 110))
    video = video[:16]  # 100 -> 40 px: up, before the top wall
    s = score_video(video, parse_prompt("a white circle moving up quickly on a gray background"))
    assert s.color == 1.0 and s.direction == 1.0


def test_bounce_keeps_direction_score_high() -> None:
    # Left at 4 px/frame from x = 80 to the wall at 16, then back to the right.
    xs = [80 - 4 * t for t in range(17)] + [16 + 4 * t for t in range(1, 24)]
    video = draw(xs, [64] * len(xs), (40, 80, 240))
    s = score_video(video, parse_prompt("a blue square moving left quickly on a black background"))
    assert s.direction == 1.0 and s.smoothness == 1.0
    assert (s.direction_frames > 17).any()  # windows after the bounce were scored too


def test_vanishing_and_teleporting_objects_lose_persistence_and_smoothness() -> None:
    video = draw(moving(30, 2, 40), [64] * 40, (200, 30, 30))
    video[::2] = 0  # gone every other frame
    assert score_video(video, parse_prompt(RED_RIGHT)).persistence == 0.5
    xs = [30.0 if t % 2 else 90.0 for t in range(40)]  # jumps 60 px back and forth
    s = score_video(draw(xs, [64] * 40, (200, 30, 30)), parse_prompt(RED_RIGHT))
    assert s.smoothness == 0.0 and s.persistence == 1.0


def test_noise_scores_low() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (40, H, W, 3), dtype=np.uint8)
    s = score_video(noise, parse_prompt(RED_RIGHT))
    assert s.color == s.direction == s.persistence == 0.0  # scattered pixels are no object


def test_two_objects_need_both_colours() -> None:
    red = draw(moving(30, 2, 40), [40] * 40, (230, 40, 40))
    blue = draw([88] * 40, moving(30, 2, 40), (50, 80, 240))
    both = np.where((blue != 0).any(-1, keepdims=True), blue, red)
    prompt = parse_prompt("a red square moving right slowly and a blue square moving down slowly on a "
                          "black background")
    assert score_video(both, prompt).color == 1.0
    assert score_video(both, prompt).direction == 1.0
    assert score_video(red, prompt).color == 0.0


def test_failing_frames_are_split_by_why_colour_failed() -> None:
    """Ten frames each of: the object held, streaked into a bar, shrunk, gone, and outgrown by
    another colour; every failing frame gets exactly one reason."""
    n = 10
    ok = draw([64] * n, [64] * n, (230, 40, 40))
    bar = np.zeros_like(ok)
    bar[:, 60:68, 10:118] = (230, 40, 40)  # 108 px long: spread ~31 px, over 1.2 radii
    small = draw([64] * n, [64] * n, (230, 40, 40), half=5)  # 100 px, under 0.3 of the disc
    gone = np.zeros_like(ok)
    outgrown = np.where((draw([90] * n, [90] * n, (50, 80, 240), half=20) != 0).any(-1, keepdims=True),
                        draw([90] * n, [90] * n, (50, 80, 240), half=20),
                        draw([30] * n, [30] * n, (230, 40, 40), half=10))
    video = np.concatenate([ok, bar, small, gone, outgrown])
    s = score_video(video, parse_prompt(RED_RIGHT))
    assert s.color == 0.2
    assert s.color_failures() == {"not_compact": n, "too_small": 2 * n, "other_color": n}
    assert s.color_failures(0, n) == dict.fromkeys(COLOR_FAILURES, 0)
    assert s.color_failures(n, 2 * n)["not_compact"] == n


def test_frames_to_adapt_counts_from_the_switch_until_the_verdict_holds() -> None:
    ok = np.array([True] * 5 + [False] * 10 + [True, False] + [True] * 20)
    frames = np.arange(len(ok))
    assert frames_to_adapt(ok, frames, switch=5, hold=8) == 12  # held from frame 17
    assert frames_to_adapt(np.zeros(30, bool), np.arange(30), switch=0, hold=4) is None
