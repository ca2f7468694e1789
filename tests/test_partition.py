"""Block scheduler: exact partitioning, layer profiles, the FPS projection and `rollcast partition`."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from rollcast.pipeline_parallel.layer_profile import (
    LayerProfile,
    block_param_count,
    devices_for,
    measure_layer_profile,
)
from rollcast.pipeline_parallel.partition import (
    DeviceSpec,
    LayerCost,
    evaluate_ranges,
    even_ranges,
    plan_partition,
)
from rollcast.pipeline_parallel.projection import PUBLISHED_FPS, project_fps, projection_table
from rollcast.scheduler.cost_model import CostModel
from rollcast.server import cli_partition
from rollcast.workers.causal_wan import WanBlock
from rollcast.workers.model_config import PRESETS, ModelConfig

# ----------------------------------------------------------------------------- partition


def _brute_force(layers: list[LayerCost], devices: list[DeviceSpec]) -> tuple[float, float] | None:
    """(min bottleneck, min sum of squares among optimal splits) over every contiguous split."""
    n, s = len(layers), len(devices)
    best: tuple[float, float] | None = None
    for cuts in itertools.combinations(range(1, n), s - 1):
        bounds = [0, *cuts, n]
        stage = []
        for d, a, b in zip(devices, bounds, bounds[1:], strict=False):
            if d.memory_bytes is not None and sum(c.bytes for c in layers[a:b]) > d.memory_bytes:
                break
            stage.append(sum(c.time_s for c in layers[a:b]) / d.speed + d.fixed_s)
        else:
            key = (max(stage), sum(t * t for t in stage))
            if best is None or key[0] < best[0] * (1 - 1e-9) or (
                    math.isclose(key[0], best[0], rel_tol=1e-9) and key[1] < best[1]):
                best = key
    return best


def _random_case(rng: random.Random) -> tuple[list[LayerCost], list[DeviceSpec]]:
    n = rng.randint(1, 9)
    s = rng.randint(1, min(n, 4))
    layers = [LayerCost(rng.choice([rng.uniform(0, 2), float(rng.randint(0, 3))]), rng.randint(0, 10))
              for _ in range(n)]
    hetero = rng.random() < 0.6
    limited = rng.random() < 0.5
    devices = [
        DeviceSpec(f"d{i}", speed=rng.uniform(0.3, 3.0) if hetero else 1.0,
                   memory_bytes=rng.randint(5, 40) if limited and rng.random() < 0.7 else None,
                   fixed_s=rng.uniform(0, 3) if rng.random() < 0.5 else 0.0)
        for i in range(s)
    ]
    return layers, devices


def test_plan_partition_matches_brute_force() -> None:
    rng = random.Random(1234)
    infeasible = 0
    for _ in range(400):
        layers, devices = _random_case(rng)
        expected = _brute_force(layers, devices)
        if expected is None:
            infeasible += 1
            with pytest.raises(ValueError, match="memory limits"):
                plan_partition(layers, devices)
            continue
        plan = plan_partition(layers, devices)
        assert plan.bottleneck_s == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
        assert sum(t * t for t in plan.stage_s) == pytest.approx(expected[1], rel=1e-9, abs=1e-12)
        # The plan itself is valid: contiguous, non-empty, in order, within memory, and its
        # reported times are what the split costs.
        assert [r.start for r in plan.ranges] == [0, *(r.stop for r in plan.ranges[:-1])]
        assert plan.ranges[-1].stop == len(layers) and all(len(r) > 0 for r in plan.ranges)
        for r, d, t in zip(plan.ranges, devices, plan.stage_s, strict=True):
            assert d.memory_bytes is None or sum(c.bytes for c in layers[r.start:r.stop]) <= d.memory_bytes
            assert t == pytest.approx(sum(c.time_s for c in layers[r.start:r.stop]) / d.speed + d.fixed_s)
        assert plan.bottleneck_s == max(plan.stage_s)
    assert 10 < infeasible < 200  # both branches were exercised


def test_heterogeneous_speeds_and_fixed_costs_move_layers() -> None:
    layers = [LayerCost(1.0, 1)] * 8
    plan = plan_partition(layers, [DeviceSpec("slow", speed=1.0), DeviceSpec("fast", speed=3.0)])
    assert [len(r) for r in plan.ranges] == [2, 6]
    assert plan.bottleneck_s == pytest.approx(2.0)
    # 30 layers of 1 s and a 10 s decode on the last stage: 40 s in all, 20 s each.
    edge = plan_partition([LayerCost(1.0, 1)] * 30, [DeviceSpec("a"), DeviceSpec("b", fixed_s=10.0)])
    assert [len(r) for r in edge.ranges] == [20, 10] and edge.bottleneck_s == pytest.approx(20.0)


def test_tie_break_balances_non_bottleneck_stages_deterministically() -> None:
    # The last stage's 10 s fixed cost is the bottleneck whatever the split; among the optimal
    # splits the first two stages are balanced (3 and 3), not 1 and 5.
    layers = [LayerCost(1.0, 0)] * 7
    devices = [DeviceSpec("a"), DeviceSpec("b"), DeviceSpec("c", fixed_s=10.0)]
    plan = plan_partition(layers, devices)
    assert [len(r) for r in plan.ranges] == [3, 3, 1]
    assert plan_partition(layers, devices) == plan


def test_infeasible_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="3 stages but only 2 layers"):
        plan_partition([LayerCost(1, 1)] * 2, [DeviceSpec(f"d{i}") for i in range(3)])
    # 180 bytes fit 200 in total, but any contiguous split puts 120 on one device.
    with pytest.raises(ValueError, match=r"device 'a' \(stage 0\) holds 100 bytes but needs at least 120"):
        plan_partition([LayerCost(1, 60)] * 3, [DeviceSpec("a", memory_bytes=100),
                                               DeviceSpec("b", memory_bytes=100)])
    # The last layer alone exceeds the last device's limit.
    with pytest.raises(ValueError, match=r"device 'b' .* needs at least 500 bytes"):
        plan_partition([LayerCost(1, 10), LayerCost(1, 500)],
                       [DeviceSpec("a", memory_bytes=1000), DeviceSpec("b", memory_bytes=100)])
    with pytest.raises(ValueError, match="speed must be"):
        plan_partition([LayerCost(1, 1)], [DeviceSpec("a", speed=0.0)])
    with pytest.raises(ValueError, match="layer 1"):
        plan_partition([LayerCost(1, 1), LayerCost(-1, 1)], [DeviceSpec("a")])
    with pytest.raises(ValueError, match="at least one layer"):
        plan_partition([], [DeviceSpec("a")])


def test_even_ranges_follow_streamdiffusionv2() -> None:
    assert [len(r) for r in even_ranges(30, 4)] == [8, 8, 7, 7]
    assert even_ranges(30, 2) == [range(0, 15), range(15, 30)]
    assert even_ranges(40, 3) == [range(0, 14), range(14, 27), range(27, 40)]
    with pytest.raises(ValueError, match="cannot split 3 layers into 4"):
        even_ranges(3, 4)


def test_plan_format_and_dict() -> None:
    plan = evaluate_ranges(even_ranges(4, 2), [LayerCost(0.5, 10**9)] * 4,
                           [DeviceSpec("gpu0"), DeviceSpec("gpu1", fixed_s=1.0)])
    assert plan.bottleneck_s == pytest.approx(2.0)
    d = plan.to_dict()
    stages = [(s["start"], s["stop"], s["bytes"]) for s in d["stages"]]
    assert stages == [(0, 2, 2 * 10**9), (2, 4, 2 * 10**9)]
    text = plan.format()
    assert "gpu1" in text and "2..3" in text and "100.0%" in text and "50.0%" in text


# ----------------------------------------------------------------------------- layer profile


def _profile() -> LayerProfile:
    return LayerProfile(config="tiny", resolution=(64, 64), batch=2, layers=[LayerCost(0.01, 123)] * 3,
                        first_s=0.002, last_s=0.003, device="cpu", kv_frames=21)


def test_layer_profile_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    assert LayerProfile.load(path) == _profile()
    assert json.loads(path.read_text())["format"] == "rollcast-layer-profile/1"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("layers"), "missing key 'layers'"),
    (lambda d: d.update(batch="2"), "batch must be int"),
    (lambda d: d.update(resolution=[64]), "resolution must be"),
    (lambda d: d["layers"][0].update(time_s=-1.0), r"layers\[0\]"),
    (lambda d: d["layers"].__setitem__(1, 5), r"layers\[1\] must be an object"),
    (lambda d: d.update(format="other"), "format is 'other'"),
    (lambda d: d.update(layers=[]), "layers must not be empty"),
])
def test_layer_profile_rejects_malformed_files(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    data = _profile().to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        LayerProfile.load(path)
    assert str(path) in str(err.value)


def test_layer_profile_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        LayerProfile.load(bad)
    with pytest.raises(ValueError, match=r"missing\.json.*cannot read"):
        LayerProfile.load(tmp_path / "missing.json")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_block_param_count_matches_the_module(name: str) -> None:
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        assert block_param_count(cfg) == sum(p.numel() for p in WanBlock(cfg).parameters())


def test_measure_layer_profile_tiny() -> None:
    cfg = ModelConfig.preset("tiny")
    profile = measure_layer_profile(cfg, (64, 64), batch=2, repeats=2)
    assert len(profile.layers) == cfg.num_layers and profile.kv_frames == 21  # self-forcing 3 + 18
    assert all(c.time_s > 0 for c in profile.layers) and profile.first_s > 0 and profile.last_s > 0
    params = sum(p.numel() for p in WanBlock(cfg).parameters())
    tokens = (64 // 16) * (64 // 16)  # VAE stride 8 x patch 2
    assert all(c.bytes == (params + 2 * 2 * 21 * tokens * cfg.dim) * 4 for c in profile.layers)
    with pytest.raises(ValueError, match="smaller than a block"):
        measure_layer_profile(cfg, (64, 64), kv_frames=1)


def test_devices_for_puts_embed_and_head_on_the_edges() -> None:
    p = _profile()
    a, b, c = devices_for(p, [1.0, 1.0, 0.5], [None, 100, 200])
    assert (a.fixed_s, b.fixed_s, c.fixed_s) == (0.002, 0.0, pytest.approx(0.006))
    assert (a.memory_bytes, b.memory_bytes, c.memory_bytes) == (None, 100, 200)
    (only,) = devices_for(p, [2.0])
    assert only.fixed_s == pytest.approx(0.0025)
    with pytest.raises(ValueError, match="one memory limit per stage"):
        devices_for(p, [1.0, 1.0], [None])


# ----------------------------------------------------------------------------- projection


def test_projection_reproduces_one_gpu_and_scales_monotonically() -> None:
    rows = projection_table(gpus=(1, 2, 3, 4, 8), steps=(1, 2, 3, 4))
    by_key = {(r["model"], r["resolution"], r["steps"], r["gpus"]): r for r in rows}
    for (model, res, k, n), r in by_key.items():
        if n == 1 and k in (1, 4):  # the rows the presets are solved from
            assert r["fps"] == pytest.approx(PUBLISHED_FPS[(model, res, 1, k)], rel=1e-3)
        if n > 1:
            prev = by_key[(model, res, k, n - 1 if n <= 4 else 4)]
            assert r["fps"] >= prev["fps"] * (1 - 1e-9)  # more GPUs never hurt a balanced ring
            assert r["fps_even"] <= r["fps"] * (1 + 1e-9)  # the optimum beats SDV2's default
    # The last stage's Wan decode bounds the ring: 1.3B at 480p cannot pass 4 / decode_s.
    decode = CostModel.preset("h100-wan-1.3b-480p").decode_s_per_latent_frame
    assert by_key[("1.3b", "480p", 1, 8)]["fps"] < 4 / decode


def test_projection_stays_near_published_multi_gpu_numbers() -> None:
    # Found: 0.97-1.12x over all 48 published 2-4 GPU points; 15 % leaves room for the
    # reconstructed 3- vs 4-GPU series order of the 1.3B figure without hiding a broken model.
    ratios = [r["ratio"] for r in projection_table(steps=(1, 2, 3, 4)) if r["gpus"] > 1]
    assert len(ratios) == 48
    assert all(1 / 1.15 < x < 1.15 for x in ratios), ratios


def test_projection_rejects_unknown_presets() -> None:
    with pytest.raises(ValueError, match="no H100 preset"):
        project_fps("7b", 1, 2)
    with pytest.raises(ValueError, match="split must be"):
        project_fps("1.3b", 1, 2, split="random")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rollcast partition")
    cli_partition.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_plans_a_saved_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.json"
    LayerProfile("x", (64, 64), 1, [LayerCost(1.0, 10**9)] * 8, 0.0, 0.0, "cpu").save(path)
    assert cli_partition.run(_cli("--profile", str(path), "--speeds", "1,3", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in out["plan"]["stages"]] == [2, 6]
    assert out["even"]["bottleneck_s"] == pytest.approx(4.0) and out["plan"]["bottleneck_s"] == 2.0
    assert cli_partition.run(_cli("--profile", str(path), "--stages", "4")) == 0
    table = capsys.readouterr().out
    assert "bottleneck 2.000000 s" in table and "even split" in table


@pytest.mark.parametrize(("argv", "message"), [
    (("--profile", "{missing}"), "cannot read"),
    (("--profile", "{file}", "--stages", "9"), "9 stages but only 8 layers"),
    (("--profile", "{file}", "--speeds", "1,1", "--memory-gb", "80"), "1 values for 2 stages"),
    (("--profile", "{file}", "--memory-gb", "2,2"), "needs at least"),
    (("--profile", "{file}", "--speeds", "1,x"), "comma-separated numbers"),
    ((), "give --profile FILE, --measure or --project"),
])
def test_cli_bad_input_raises_value_error(tmp_path: Path, argv: tuple[str, ...], message: str) -> None:
    path = tmp_path / "p.json"
    LayerProfile("x", (64, 64), 1, [LayerCost(1.0, 10**9)] * 8, 0.0, 0.0, "cpu").save(path)
    args = _cli(*(a.format(file=path, missing=tmp_path / "none.json") for a in argv))
    with pytest.raises(ValueError, match=message):  # `rollcast` prints it as one line, exit 2
        cli_partition.run(args)


def test_cli_rejects_bad_option_values() -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli("--stages", "0")
    assert exit_info.value.code == 2


def test_cli_measures_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.json"
    args = _cli("--measure", "--resolution", "64x64", "--device", "cpu", "--repeats", "1",
                "--save-profile", str(path), "--json")
    assert cli_partition.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"]["config"] == "tiny" and len(out["plan"]["stages"]) == 2
    assert len(LayerProfile.load(path).layers) == 4


def test_cli_projection(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_partition.run(_cli("--project", "--gpus", "2", "--steps", "1", "--json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 2 * 2 and {r["gpus"] for r in rows} == {1, 2}
    assert cli_partition.run(_cli("--project", "--gpus", "2")) == 0
    assert "paper" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--steps"):
        cli_partition.run(_cli("--project", "--steps", "5"))
