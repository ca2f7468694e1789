"""The procedural shapes dataset: deterministic from a seed, and the pixels show the attributes
the prompt names (colour, position along the named direction, bouncing inside the frame)."""

from __future__ import annotations

import numpy as np
import pytest

from rollcast.workers.shapes_dataset import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    Clip,
    ShapeObject,
    ShapesDataset,
    parse_prompt,
    render,
    trajectory,
)


def test_same_seed_same_clips_other_seed_other_clips() -> None:
    a, b, c = ShapesDataset(3), ShapesDataset(3), ShapesDataset(4)
    for i in range(5):
        assert a.clip(i) == b.clip(i)
        np.testing.assert_array_equal(a.frames(i, 9, start=40), b.frames(i, 9, start=40))
    assert [a.clip(i).prompt for i in range(10)] != [c.clip(i).prompt for i in range(10)]


def test_any_window_equals_the_same_frames_of_the_whole_clip() -> None:
    d = ShapesDataset(0)
    whole = d.frames(2, 60)
    np.testing.assert_array_equal(d.frames(2, 10, start=50), whole[50:])


def test_prompt_round_trips_through_the_parser() -> None:
    d = ShapesDataset(1)
    for i in range(30):
        clip = d.clip(i)
        parsed = parse_prompt(clip.prompt)
        assert parsed.prompt == clip.prompt
        assert [o.color for o in parsed.objects] == [o.color for o in clip.objects]
    with pytest.raises(ValueError):
        parse_prompt("a purple circle moving left slowly on a black background")
    with pytest.raises(ValueError):
        parse_prompt("waves on a beach")


def test_sometimes_two_objects_of_different_colours() -> None:
    clips = [ShapesDataset(0).clip(i) for i in range(300)]
    two = [c for c in clips if len(c.objects) == 2]
    assert 0.15 < len(two) / len(clips) < 0.35
    assert all(c.objects[0].color != c.objects[1].color for c in two)
    assert " and " in two[0].prompt


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_pixels_show_the_colour_and_motion_of_the_prompt(direction: str) -> None:
    clip = Clip((ShapeObject("square", "red", direction, "slowly"),), "gray")
    frames = render(clip, 0, 12)
    assert tuple(frames[0, 0, 0]) == BACKGROUNDS["gray"]
    red = np.all(frames == np.array(COLORS["red"], np.uint8), axis=-1)  # [T, H, W]
    assert red.sum((1, 2)).min() > 500  # the object is there in every frame
    ys, xs = np.nonzero(red[0])
    ye, xe = np.nonzero(red[-1])
    dx, dy = DIRECTIONS[direction]
    moved = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()])
    # 11 frames at 2 px/frame along the named direction, nothing across it.
    np.testing.assert_allclose(moved, [22 * dx, 22 * dy], atol=1.5)


def test_objects_bounce_inside_the_frame() -> None:
    clip = Clip((ShapeObject("circle", "blue", "left", "quickly"),), "black")
    t = np.arange(200)
    centre, velocity = trajectory(clip, 0, t)
    r = clip.radius
    assert centre[:, 0].min() >= r - 1e-6 and centre[:, 0].max() <= clip.width - r + 1e-6
    signs = np.sign(velocity[:, 0])
    assert signs[0] == -1 and (signs == 1).any()  # it came back after hitting the left wall
    flip = int(np.argmax(signs == 1))
    assert centre[flip - 1, 0] < r + clip.speed_px(clip.objects[0]) + 1e-6  # at the wall
    np.testing.assert_allclose(np.abs(np.diff(centre[:, 0])).max(), 4.0, atol=1e-6)
