"""`rollcast bench` on the tiny model (CPU): the report's keys, its internal consistency, the FLOP
count against the cost model's formula, v2v's encode, and flags refused before anything loads."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rollcast.loadgen.flop_count import count_flops, device_peak, spec_peak
from rollcast.pipeline_parallel.partition import even_ranges
from rollcast.server.cli import main

TINY = ["bench", "--config", "tiny", "--resolution", "64x64", "--device", "cpu"]
KEYS = {
    "config", "resolution", "steps", "batch", "stages", "executor", "vae", "mode", "policy", "device",
    "device_name",
    "dtype", "iters", "warmup", "seed", "frames_per_block", "video_frames_per_block", "forwards_per_block",
    "tokens_per_forward", "kv_tokens", "fps", "fps_per_stream", "block_ms", "block_breakdown_ms", "ttff_ms",
    "text_encode_ms", "dit_step_ms", "dit_context_ms", "vae_decode_ms", "vae_encode_ms", "stage_timings",
    "pipelined_fps_bound", "flops", "analytic_dit_forward_flops", "analytic_dit_omitted_flops", "tflops",
    "mfu", "peak_tflops", "peak_source", "peak_memory_mb", "memory_kind",
}


def bench(tmp: Path, *flags: str) -> tuple[dict[str, Any], str]:
    out = tmp / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*TINY, *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text()), stdout.getvalue()


@pytest.fixture(scope="module")
def t2v(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    # Self-forcing: 3-frame blocks, 2 steps + a context pass, sink 3 + window 18 frames (named:
    # tiny's own default is longlive).
    return bench(tmp_path_factory.mktemp("t2v"), "--policy", "self-forcing", "--steps", "2",
                 "--batch", "2", "--stages", "3", "--iters", "3")


@pytest.fixture(scope="module")
def v2v(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    # StreamDiffusionV2: 1-frame blocks, no context pass; a given peak skips the matmul measurement.
    return bench(tmp_path_factory.mktemp("v2v"), "--mode", "v2v", "--policy", "streamdiffusionv2",
                 "--steps", "2", "--iters", "3", "--warmup", "2", "--peak-tflops", "0.5")


def test_report_has_every_key_and_consistent_throughput(t2v):
    r, summary = t2v
    assert set(r) == KEYS
    assert (r["config"], r["mode"], r["vae"], r["policy"], r["device"]) == ("tiny", "t2v", "tiny",
                                                                            "self-forcing", "cpu")
    assert r["resolution"] == [64, 64] and r["steps"] == 2 and r["forwards_per_block"] == 3
    assert r["frames_per_block"] == 3 and r["video_frames_per_block"] == 12
    assert r["tokens_per_forward"] == 2 * 3 * 16 and r["kv_tokens"] == 21 * 16  # 4x4 patches per frame
    assert r["warmup"] == 7  # 21 cache frames / 3 per block
    assert r["fps"] > 0
    assert r["fps"] == pytest.approx(2 * 12 * 1000 / r["block_ms"]["mean"], rel=1e-3)
    assert r["fps_per_stream"] == pytest.approx(r["fps"] / 2, rel=1e-3)
    parts = r["block_breakdown_ms"]
    assert parts["encode"] < 0.5 < r["vae_encode_ms"]  # t2v: measured, but not part of the block
    assert 0.7 * r["block_ms"]["mean"] < sum(parts.values()) <= 1.01 * r["block_ms"]["mean"]
    assert parts["dit"] == pytest.approx(2 * r["dit_step_ms"], rel=0.5)
    assert r["dit_context_ms"] > 0 and r["vae_decode_ms"] > 0 and r["text_encode_ms"] > 0
    assert r["ttff_ms"] > r["dit_step_ms"]  # a text encode, 2 forwards (batch 1) and a decode
    assert r["peak_source"] == "measured_matmul" and r["peak_tflops"] > 0
    assert r["memory_kind"] == "process_max_rss" and r["peak_memory_mb"] > 50
    assert "fps" in summary and "MFU" in summary and len(summary.splitlines()) == 5


def test_stages_cover_the_layers_and_add_up_to_the_forward(t2v):
    r, _ = t2v
    stages = r["stage_timings"]
    assert [s["layers"] for s in stages] == [[0, 2], [2, 3], [3, 4]]
    assert all(s["dit_ms"] > 0 for s in stages)
    model_ms = sum(s["dit_ms"] for s in stages)
    # The step adds the runner's host work (cache metadata, sampler) around the model's forward.
    assert 0.4 * r["dit_step_ms"] < model_ms <= 1.15 * r["dit_step_ms"]
    period = max(max(s["dit_ms"] for s in stages) * 3, r["vae_decode_ms"])
    assert r["pipelined_fps_bound"] == pytest.approx(2 * 12 * 1000 / period, rel=1e-3)


@pytest.mark.parametrize(("layers", "stages", "sizes"), [(4, 3, [2, 1, 1]), (30, 4, [8, 8, 7, 7]),
                                                         (40, 1, [40]), (4, 4, [1, 1, 1, 1])])
def test_stage_layers_split_evenly_and_contiguously(layers, stages, sizes):
    ranges = even_ranges(layers, stages)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(layers))


def test_flop_count_matches_the_cost_model_formula(t2v):
    r, _ = t2v
    counted, analytic = r["flops"]["dit_forward"], r["analytic_dit_forward_flops"]
    assert counted == pytest.approx(analytic, rel=0.05)
    # The whole gap is what the formula leaves out: patch embedding, head, time-embedding MLP.
    assert counted == analytic + r["analytic_dit_omitted_flops"]
    flops = r["flops"]
    assert flops["block"] == 3 * counted + flops["vae_decode_block"]  # t2v: no encode in the block
    assert flops["vae_encode_block"] > 0
    assert r["mfu"]["dit"] == pytest.approx(
        counted / (r["dit_step_ms"] / 1000) / (r["peak_tflops"] * 1e12), rel=0.01)


def test_cpu_attention_is_counted():
    q, k = torch.randn(2, 4, 16, 32), torch.randn(2, 4, 64, 32)
    expected = 2 * (2 * 2 * 4 * 16 * 64 * 32)  # QK^T and PV, 2 FLOPs per multiply-accumulate
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, k)) == expected
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask)) == expected


def test_v2v_adds_the_encode_to_the_block(v2v):
    r, _ = v2v
    assert r["mode"] == "v2v" and r["frames_per_block"] == 1 and r["video_frames_per_block"] == 4
    assert r["dit_context_ms"] is None and r["forwards_per_block"] == 2
    assert r["block_breakdown_ms"]["encode"] > 0.5 and r["block_breakdown_ms"]["context"] == 0
    flops = r["flops"]
    assert flops["block"] == 2 * flops["dit_forward"] + flops["vae_decode_block"] + flops["vae_encode_block"]
    period = max(max(s["dit_ms"] for s in r["stage_timings"]) * 2, r["vae_decode_ms"] + r["vae_encode_ms"])
    assert r["pipelined_fps_bound"] == pytest.approx(4 * 1000 / period, rel=1e-3)
    assert (r["peak_tflops"], r["peak_source"]) == (0.5, "flag")


def test_peak_table_and_flag():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert spec_peak("NVIDIA H200", bf16).tflops == 989.4  # type: ignore[union-attr]
    assert spec_peak("NVIDIA H100 PCIe", bf16).tflops == 756.0  # type: ignore[union-attr]
    assert spec_peak("NVIDIA L40S", bf16).tflops == 362.1  # type: ignore[union-attr]
    assert spec_peak("NVIDIA A100-SXM4-80GB", fp32).source == "spec:NVIDIA A100-SXM4-80GB"  # type: ignore[union-attr]
    assert spec_peak("NVIDIA A100-SXM4-80GB", fp32).tflops == 19.5  # type: ignore[union-attr]
    assert spec_peak("Some Future GPU", bf16) is None
    assert device_peak(torch.device("cpu"), fp32, 2.5).source == "flag"


@pytest.mark.parametrize(("flags", "message"), [
    (["--stages", "5"], "--stages must be between 1 and the model's 4 layers"),
    (["--resolution", "12x7"], "multiples of 16x16"),
    (["--steps", "9"], "--steps"),
    (["--peak-tflops", "-1"], "--peak-tflops must be a positive number"),
    (["--json", "/no/such/dir/out.json"], "does not exist"),
])
def test_bad_values_exit_2_with_one_line(flags, message, capsys):
    assert main([*TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rollcast: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch", "0"], "--batch"), (["--iters", "0"], "--iters"), (["--warmup", "-1"], "--warmup"),
    (["--vae", "huge"], "invalid choice"), (["--mode", "i2v"], "invalid choice"),
])
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_kernel_microbench_needs_cuda(capsys):
    assert main(["bench", "--kernels"]) == 2
    assert "--kernels needs a CUDA device" in capsys.readouterr().err
