"""GPU checks with the real layer widths; skipped on machines without CUDA."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rollcast.workers import CachePolicy, KVCachePool, ModelConfig, PromptBatch
from rollcast.workers.checkpoint import synthetic_model
from rollcast.workers.reference_forward import reference_forward

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_blocks_match_reference_on_cuda(dtype):
    """Two layers of the 1.3B at 480x832, two 3-frame blocks through the cache on the GPU, against
    the fp32 masked reference (exact in fp32, bf16 within a few percent)."""
    cfg = dataclasses.replace(ModelConfig.preset("wan-1.3b"), num_layers=2)
    ref_model = synthetic_model(cfg, seed=0).cuda().eval()
    model = copy.deepcopy(ref_model).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 60, 104, generator=g).cuda()
    t = (torch.rand(1, 6, generator=g) * 1000).cuda()
    ctx = torch.randn(20, cfg.text_dim, generator=g).cuda()
    with torch.no_grad():
        ref = reference_forward(ref_model, x, t, PromptBatch.stack([ref_model.prompt_kv(ctx)]),
                                frames_per_block=3)
        pool = KVCachePool(layers=model.layers, rows=1, policy=CachePolicy("g", 3, 6),
                           tokens_per_frame=1560, num_heads=12, head_dim=128, dtype=dtype,
                           device="cuda")
        prompts = PromptBatch.stack([model.prompt_kv(ctx)])
        outs = []
        for start in (0, 3):
            frames = [list(range(start, start + 3))]
            kv = pool.batch(rows=[0], frames=frames, rope_positions=frames, new_block=[True],
                            grid_hw=(30, 52), rope=model.rope)
            outs.append(model(x[:, :, start : start + 3], t[:, start : start + 3], prompts, kv.attend))
    got = torch.cat(outs, dim=2)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-4 if dtype == torch.float32 else 3e-2), rel


def test_bench_runs_the_real_1_3b_shape_on_cuda(tmp_path):
    """`rollcast bench` with the 1.3B at 832x480, TAEHV, 2 steps: a complete report whose spec peak
    and MFU are sane (the figures themselves belong in docs/benchmarking.md, not in asserts)."""
    import json

    from rollcast.server.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "wan-1.3b", "--resolution", "832x480", "--steps", "2", "--batch", "2",
                 "--stages", "2", "--vae", "tiny", "--iters", "3", "--device", "cuda",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"].startswith("cuda") and r["dtype"] == "bfloat16"
    assert r["memory_kind"] == "cuda_max_allocated"
    assert r["fps"] > 0 and 0 < r["mfu"]["dit"] < 1
    assert r["flops"]["dit_forward"] == pytest.approx(
        r["analytic_dit_forward_flops"] + r["analytic_dit_omitted_flops"], rel=1e-3)
