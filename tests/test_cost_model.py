from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import pytest

from rollcast.scheduler.cost_model import COST_PRESETS, FORMAT, CostModel, resolve
from rollcast.scheduler.work import BatchShape, ForwardShape
from rollcast.workers.model_config import ModelConfig

V2V_480 = ForwardShape(latent_frames=1, tokens_per_frame=1560, kv_frames=6, resolution=(832, 480))
V2V_512 = ForwardShape(latent_frames=1, tokens_per_frame=1024, kv_frames=6, resolution=(512, 512))


def _model(**overrides: object) -> CostModel:
    base = CostModel.for_model(
        ModelConfig.preset("wan-1.3b"), name="truth", peak_flops=300e12, half_tokens=1500.0,
        overhead_s=0.004, decode_s_per_latent_frame=0.05, encode_s_per_latent_frame=0.03,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def _shapes() -> list[BatchShape]:
    """Varied sizes, block lengths, KV lengths and resolutions, so every parameter is identifiable."""
    out = []
    for size in (1, 2, 4, 8):
        for frames, kv in ((1, 2), (1, 6), (3, 9), (3, 21)):
            for tpf in (1024, 1560):
                out.append(BatchShape(size, ForwardShape(frames, tpf, kv, (tpf, 1))))
    return out


# ---------------------------------------------------------------------------- FLOP coefficients


def test_flop_coefficients_match_performance_md():
    m13 = CostModel.for_model(ModelConfig.preset("wan-1.3b"), name="a", peak_flops=1e15, half_tokens=0,
                              overhead_s=0)
    m14 = CostModel.for_model(ModelConfig.preset("wan-14b"), name="b", peak_flops=1e15, half_tokens=0,
                              overhead_s=0)
    assert m13.linear_flops_per_token == pytest.approx(2.50e9, rel=2e-3)
    assert m13.attn_flops_per_pair == 184_320
    assert m14.linear_flops_per_token == pytest.approx(23.9e9, rel=2e-3)
    assert m14.attn_flops_per_pair == 819_200
    assert m13.text_len == m14.text_len == 512
    # performance.md §2.4: 1-frame block, 6-frame KV
    assert m13.flops(BatchShape(1, V2V_480)) == pytest.approx(6.74e12, rel=1e-3)
    assert m14.flops(BatchShape(1, V2V_480)) == pytest.approx(49.91e12, rel=1e-3)
    assert m13.flops(BatchShape(1, V2V_512)) == pytest.approx(3.82e12, rel=2e-3)
    assert m14.flops(BatchShape(1, V2V_512)) == pytest.approx(30.07e12, rel=1e-3)
    assert m13.flops(BatchShape(3, V2V_480)) == pytest.approx(3 * 6.74e12, rel=1e-3)


@pytest.mark.parametrize("preset, config", [
    ("h100-wan-1.3b-480p", "wan-1.3b"), ("h100-wan-1.3b-512", "wan-1.3b"),
    ("h100-wan-14b-480p", "wan-14b"), ("h100-wan-14b-512", "wan-14b"),
])
def test_preset_coefficients_come_from_the_model_config(preset: str, config: str):
    m = CostModel.preset(preset)
    ref = CostModel.for_model(ModelConfig.preset(config), name="x", peak_flops=1, half_tokens=0, overhead_s=0)
    assert (m.linear_flops_per_token, m.attn_flops_per_pair, m.text_len) == (
        ref.linear_flops_per_token, ref.attn_flops_per_pair, ref.text_len)


# ---------------------------------------------------------------------------- presets

# StreamDiffusionV2, 1× H100 (performance.md §1.1, Fig. 9 / 11 / 15): steps -> FPS.
PUBLISHED = {
    "h100-wan-1.3b-480p": (V2V_480, {1: 20.47, 2: 17.97, 3: 15.68, 4: 13.95}, {2: 15.50, 3: 12.82, 4: 10.86}),
    "h100-wan-1.3b-512": (V2V_512, {1: 26.21, 2: 24.02, 3: 21.51, 4: 19.43}, {2: 19.15, 3: 15.14, 4: 12.43}),
    # 14B: no ablation published; the 1-GPU rows are taken as stream batch.
    "h100-wan-14b-480p": (V2V_480, {1: 12.68, 2: 8.64, 3: 6.49, 4: 5.28}, {}),
    "h100-wan-14b-512": (V2V_512, {1: 18.71, 2: 13.01, 3: 10.09, 4: 8.26}, {}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_reproduce_published_fps(name: str):
    m = CostModel.preset(name)
    shape, batched, serial = PUBLISHED[name]
    codec = m.codec_s(BatchShape(1, shape, decode_latent_frames=1, encode_latent_frames=1))
    for k, fps in batched.items():  # stream batch: one forward over k lanes per latent frame
        predicted = 4 / m.predict(BatchShape(k, shape, decode_latent_frames=1, encode_latent_frames=1))
        assert predicted == pytest.approx(fps, rel=0.05), (k, "stream batch")
    for k, fps in serial.items():  # no stream batch: k forwards at batch 1 per latent frame
        predicted = 4 / (k * m.forward_s(BatchShape(1, shape)) + codec)
        assert predicted == pytest.approx(fps, rel=0.05), (k, "serial")
    # the figures a preset is solved from are exact
    assert 4 / m.predict(BatchShape(1, shape, 1, 1)) == pytest.approx(batched[1], rel=1e-9)
    assert 4 / m.predict(BatchShape(4, shape, 1, 1)) == pytest.approx(batched[4], rel=1e-9)


def test_preset_codec_split_and_sharing():
    m13, m14 = CostModel.preset("h100-wan-1.3b-480p"), CostModel.preset("h100-wan-14b-480p")
    assert m13.decode_s_per_latent_frame / m13.encode_s_per_latent_frame == pytest.approx(13.55 / 8.05)
    assert m13.decode_s_per_latent_frame + m13.encode_s_per_latent_frame == pytest.approx(0.1378, abs=5e-4)
    assert m14.decode_s_per_latent_frame == m13.decode_s_per_latent_frame
    assert m14.encode_s_per_latent_frame == m13.encode_s_per_latent_frame
    for m in COST_PRESETS.values():
        assert m.overhead_s == 0.002 and m.half_tokens > 0 and 100e12 < m.peak_flops < 989e12


def test_preset_is_a_copy_and_unknown_lists_names():
    m = CostModel.preset("h100-wan-1.3b-480p")
    m.observe(BatchShape(1, V2V_480), 10.0)
    assert COST_PRESETS["h100-wan-1.3b-480p"].scale == 1.0
    with pytest.raises(ValueError, match=r"unknown cost model preset 'nope'.*h100-wan-1\.3b-480p"):
        CostModel.preset("nope")


# ---------------------------------------------------------------------------- prediction shape


def test_predict_is_monotone_in_batch_tokens_and_kv():
    m = CostModel.preset("h100-wan-1.3b-480p")
    sizes = [m.predict(BatchShape(b, V2V_480)) for b in range(1, 9)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    frames = [m.predict(BatchShape(2, dataclasses.replace(V2V_480, latent_frames=f, kv_frames=12)))
              for f in (1, 2, 3)]
    assert frames == sorted(frames) and len(set(frames)) == 3
    tpf = [m.predict(BatchShape(2, dataclasses.replace(V2V_480, tokens_per_frame=t)))
           for t in (256, 1024, 1560)]
    assert tpf == sorted(tpf) and len(set(tpf)) == 3
    kv = [m.predict(BatchShape(2, dataclasses.replace(V2V_480, kv_frames=k))) for k in range(1, 22)]
    assert kv == sorted(kv) and len(set(kv)) == len(kv)
    assert m.predict(BatchShape(1, V2V_480, decode_latent_frames=1)) > m.predict(BatchShape(1, V2V_480))
    assert isinstance(m.predict(BatchShape(1, V2V_480)), float)


def test_efficiency_makes_per_item_cost_fall_with_batch_size():
    m = CostModel.preset("h100-wan-1.3b-480p")
    per_item = [m.forward_s(BatchShape(b, V2V_480)) / b for b in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in itertools.pairwise(per_item))
    assert m.efficiency(m.half_tokens) == pytest.approx(0.5)
    assert m.efficiency(0) == 0.0
    # forward = overhead + flops / (peak · efficiency(T))
    b = BatchShape(3, V2V_480)
    expected = m.overhead_s + m.flops(b) / (m.peak_flops * m.efficiency(3 * 1560))
    assert m.forward_s(b) == pytest.approx(expected, rel=1e-12)
    assert m.forward_s(BatchShape(0, V2V_480)) == 0.0


# ---------------------------------------------------------------------------- fitting


def test_fit_recovers_parameters_exactly_without_noise():
    truth = _model()
    samples = [(b, truth.predict(b)) for b in _shapes()]
    start = _model(peak_flops=50e12, half_tokens=10.0, overhead_s=0.05, scale=1.7)
    fitted = start.fit(samples)
    assert fitted.peak_flops == pytest.approx(truth.peak_flops, rel=1e-6)
    assert fitted.half_tokens == pytest.approx(truth.half_tokens, rel=1e-6)
    assert fitted.overhead_s == pytest.approx(truth.overhead_s, rel=1e-6)
    assert fitted.scale == 1.0 and start.peak_flops == 50e12  # a new model; the old one is untouched


def test_fit_subtracts_predicted_codec():
    truth = _model()
    samples = [(dataclasses.replace(b, decode_latent_frames=b.size, encode_latent_frames=1), 0.0)
               for b in _shapes()]
    samples = [(b, truth.predict(b)) for b, _ in samples]
    fitted = _model(peak_flops=80e12, half_tokens=5000.0, overhead_s=0.0).fit(samples)
    assert fitted.peak_flops == pytest.approx(truth.peak_flops, rel=1e-6)
    assert fitted.half_tokens == pytest.approx(truth.half_tokens, rel=1e-6)
    assert fitted.overhead_s == pytest.approx(truth.overhead_s, rel=1e-6)


def test_fit_with_multiplicative_noise():
    truth = _model()
    rng = random.Random(7)
    samples = [(b, truth.predict(b) * math.exp(rng.gauss(0.0, 0.003))) for b in _shapes() * 4]
    fitted = _model(peak_flops=50e12, half_tokens=10.0, overhead_s=0.0).fit(samples)
    assert fitted.peak_flops == pytest.approx(truth.peak_flops, rel=0.01)
    assert fitted.half_tokens == pytest.approx(truth.half_tokens, rel=0.02)
    # The overhead is a small part of every sample (4 ms of >= 29 ms), so noise moves it most in
    # relative terms; it is held to 2 % of the shortest forward instead.
    shortest = min(truth.predict(b) for b in _shapes())
    assert fitted.overhead_s == pytest.approx(truth.overhead_s, abs=0.02 * shortest)
    for b in _shapes():
        assert fitted.predict(b) == pytest.approx(truth.predict(b), rel=0.01)


def test_fit_constrains_overhead_and_half_tokens_to_be_non_negative():
    truth = _model(overhead_s=0.0, half_tokens=0.0)
    samples = [(b, truth.forward_s(b) * (0.98 if b.size == 1 else 1.0)) for b in _shapes()]
    fitted = truth.fit(samples)
    assert fitted.overhead_s >= 0 and fitted.half_tokens >= 0 and fitted.peak_flops > 0


def test_fit_keeps_overhead_when_samples_cannot_separate_it():
    truth = _model()
    same_kv = [BatchShape(b, V2V_480) for b in (1, 2, 3, 4, 6, 8)]  # one FLOPs-per-token value
    samples = [(b, truth.forward_s(b)) for b in same_kv]
    fitted = _model(overhead_s=0.004, peak_flops=10e12, half_tokens=1.0).fit(samples)
    assert fitted.overhead_s == 0.004
    assert fitted.peak_flops == pytest.approx(truth.peak_flops, rel=1e-6)
    assert fitted.half_tokens == pytest.approx(truth.half_tokens, rel=1e-6)
    given = _model().fit([(b, truth.forward_s(b)) for b in _shapes()], overhead_s=0.004)
    assert given.overhead_s == 0.004 and given.peak_flops == pytest.approx(truth.peak_flops, rel=1e-6)


def test_fit_rejects_bad_samples():
    m = _model()
    with pytest.raises(ValueError, match="at least 2 samples"):
        m.fit([(BatchShape(1, V2V_480), 0.1)])
    with pytest.raises(ValueError, match="do not grow with FLOPs"):
        m.fit([(BatchShape(1, V2V_480), 0.2), (BatchShape(8, V2V_480), 0.1)], overhead_s=0.15)
    with pytest.raises(ValueError, match="codec"):
        m.fit([(BatchShape(1, V2V_480, decode_latent_frames=1), 0.01), (BatchShape(2, V2V_480), 0.1)])
    with pytest.raises(ValueError, match="no tokens"):
        m.fit([(BatchShape(0, V2V_480), 0.1), (BatchShape(2, V2V_480), 0.1)])


def test_fit_codec():
    m = _model().fit_codec([(1, 0.08), (2, 0.16), (4, 0.32)], [(1, 0.02), (3, 0.06)])
    assert m.decode_s_per_latent_frame == pytest.approx(0.08)
    assert m.encode_s_per_latent_frame == pytest.approx(0.02)
    kept = dataclasses.replace(m, decode_scale=1.4).fit_codec([], [(1, 0.03)])
    assert kept.decode_s_per_latent_frame == pytest.approx(0.08) and kept.decode_scale == 1.0
    with pytest.raises(ValueError, match="decode sample"):
        m.fit_codec([(0, 0.1)])


# ---------------------------------------------------------------------------- online correction


def test_observe_moves_scale_toward_measured_ratio():
    m = _model()
    b = BatchShape(2, V2V_480)
    fwd = m.forward_s(b)
    assert m.observe(b, 2 * fwd) == pytest.approx(2.0)
    assert m.scale == pytest.approx(1.1)
    for _ in range(200):
        m.observe(b, 2 * fwd)
    assert m.scale == pytest.approx(2.0, rel=1e-6)
    assert m.predict(b) == pytest.approx(2 * fwd, rel=1e-6)
    m.observe(b, fwd, alpha=1.0)
    assert m.scale == pytest.approx(1.0)


def test_observe_clamps_outliers_and_subtracts_codec():
    m = _model()
    b = BatchShape(1, V2V_480)
    assert m.observe(b, 1000 * m.forward_s(b)) == 10.0
    assert m.scale == pytest.approx(1.9)
    m2 = _model()
    assert m2.observe(b, 0.0) == 0.1
    assert m2.scale == pytest.approx(0.91)
    # a batch that decoded: only the forward part is compared
    m3 = _model()
    d = BatchShape(1, V2V_480, decode_latent_frames=1, encode_latent_frames=1)
    assert m3.observe(d, 1.5 * m3.forward_s(d) + m3.codec_s(d)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="alpha"):
        m3.observe(d, 0.1, alpha=0.0)
    with pytest.raises(ValueError, match="finite"):
        m3.observe(d, math.nan)


def test_observe_codec():
    m = _model()
    assert m.observe_codec(2, 4 * m.decode_s_per_latent_frame) == pytest.approx(2.0)
    assert m.decode_scale == pytest.approx(1.1)
    assert m.codec_s(BatchShape(1, V2V_480, decode_latent_frames=1)) == pytest.approx(1.1 * 0.05)
    assert m.scale == 1.0


# ---------------------------------------------------------------------------- files


def test_json_round_trip_is_exact(tmp_path):
    m = CostModel.preset("h100-wan-14b-512")
    m.observe(BatchShape(3, V2V_512), 0.123456789)
    m.observe_codec(1, 0.0712345)
    path = tmp_path / "cm.json"
    m.save(path)
    assert json.loads(path.read_text())["format"] == FORMAT
    assert CostModel.load(path) == m
    assert CostModel.from_dict(m.to_dict()) == m
    assert resolve(str(path)) == m
    assert resolve("h100-wan-14b-512") == CostModel.preset("h100-wan-14b-512")
    assert resolve(m) == m and resolve(m) is not m


def _write(tmp_path, content: object) -> str:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    good = _model().to_dict()
    missing = {k: v for k, v in good.items() if k not in ("peak_flops", "overhead_s")}
    cases = [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({**good, "format": "other/2"}, "format is 'other/2'"),
        (missing, r"missing fields \['peak_flops', 'overhead_s'\]"),
        ({**good, "peak_flops": "fast"}, "peak_flops must be a number"),
        ({**good, "text_len": 1.5}, "text_len must be an integer"),
        ({**good, "peak_flops": 0}, "peak_flops must be > 0"),
        ({**good, "half_tokens": -1}, "half_tokens must be a finite number >= 0"),
        ({**good, "unknown": 1}, None),  # extra keys are ignored
    ]
    for content, problem in cases:
        path = _write(tmp_path, content)
        if problem is None:
            assert CostModel.load(path) == _model()
            continue
        with pytest.raises(ValueError, match=problem) as err:
            CostModel.load(path)
        assert path in str(err.value)
    nowhere = str(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="cannot read") as err:
        CostModel.load(nowhere)
    assert nowhere in str(err.value)
    with pytest.raises(ValueError, match="neither a cost model preset"):
        resolve("h100-wan-99b")
