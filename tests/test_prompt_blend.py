"""Prompt embedding blends (linear, slerp) and timed transitions."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from rollcast.workers.prompt_blend import PromptTransition, blend, normalise_weights, slerp

TEXT_LEN, DIM, TOKENS = 16, 32, 10


def embedding(seed: int, tokens: int = TOKENS, norm: float | None = None) -> Tensor:
    """A prompt-like embedding: `tokens` random rows, zero rows after them."""
    g = torch.Generator().manual_seed(seed)
    e = torch.zeros(TEXT_LEN, DIM)
    e[:tokens] = torch.randn(tokens, DIM, generator=g)
    if norm is not None:
        e[:tokens] *= norm / e[:tokens].norm(dim=-1, keepdim=True)
    return e


def test_linear_one_hot_weights_return_that_embedding_exactly() -> None:
    a, b = embedding(0), embedding(1)
    assert torch.equal(blend([a, b], [1, 0]), a)
    assert torch.equal(blend([a, b], [0, 3.5], "linear"), b)
    assert torch.equal(blend([a, b], [1, 0], "slerp"), a)
    out = blend([a, b], [1, 0])
    assert out is not a  # a new tensor, never an alias of the input
    half = blend([a, b], [2, 2])
    torch.testing.assert_close(half, (a + b) / 2)
    torch.testing.assert_close(blend([a, b, embedding(2)], [1, 1, 2]), (a + b + 2 * embedding(2)) / 4)


def test_linear_keeps_dtype() -> None:
    a, b = embedding(0).bfloat16(), embedding(1).bfloat16()
    out = blend([a, b], [0.3, 0.7])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), 0.3 * a.float() + 0.7 * b.float(), atol=1e-2, rtol=1e-2)


def test_slerp_endpoints_exact_and_keeps_equal_norms() -> None:
    a, b = embedding(0, norm=3.0), embedding(1, norm=3.0)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for t in (0.25, 0.5, 0.8):
        s = slerp(a, b, t)
        torch.testing.assert_close(s[:TOKENS].norm(dim=-1), torch.full((TOKENS,), 3.0))
        # lerp of near-orthogonal random rows loses norm; slerp must not match it.
        lerp_norm = ((1 - t) * a + t * b)[:TOKENS].norm(dim=-1)
        assert (lerp_norm < 3.0 * 0.95).all()
        torch.testing.assert_close(blend([a, b], [1 - t, t], "slerp"), s)
    # Midpoint direction is the bisector of the two rows.
    mid = slerp(a, b, 0.5)
    bisector = (a + b)[:TOKENS]
    cos = torch.nn.functional.cosine_similarity(mid[:TOKENS], bisector, dim=-1)
    torch.testing.assert_close(cos, torch.ones(TOKENS))


def test_slerp_interpolates_norms_linearly() -> None:
    a, b = embedding(0, norm=1.0), embedding(1, norm=5.0)
    torch.testing.assert_close(slerp(a, b, 0.25)[:TOKENS].norm(dim=-1), torch.full((TOKENS,), 2.0))


def test_zero_rows_stay_zero_and_parallel_rows_fall_back_to_lerp() -> None:
    a, b = embedding(0, tokens=4), embedding(1, tokens=7)
    for method in ("linear", "slerp"):
        out = blend([a, b], [0.5, 0.5], method)
        assert torch.equal(out[7:], torch.zeros(TEXT_LEN - 7, DIM)), method
        assert torch.isfinite(out).all()
    # Rows zero in one input only: slerp fades them in linearly (no NaN from a zero direction).
    torch.testing.assert_close(slerp(a, b, 0.5)[4:7], 0.5 * b[4:7])
    # Parallel (and anti-parallel) rows: lerp.
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)
    torch.testing.assert_close(slerp(a, -a, 0.25), 0.5 * a)


def test_slerp_of_three_is_pairwise_cumulative() -> None:
    e = [embedding(i, norm=2.0) for i in range(3)]
    w = [1.0, 1.0, 2.0]
    expected = slerp(slerp(e[0], e[1], 0.5), e[2], 0.5)
    torch.testing.assert_close(blend(e, w, "slerp"), expected)
    torch.testing.assert_close(blend(e, w, "slerp")[:TOKENS].norm(dim=-1), torch.full((TOKENS,), 2.0))
    # A zero-weight first embedding does not leak in.
    torch.testing.assert_close(blend(e, [0.0, 1.0, 1.0], "slerp"), slerp(e[1], e[2], 0.5))


def test_bad_weights_and_inputs() -> None:
    a, b = embedding(0), embedding(1)
    for weights in ([1.0, -0.5], [0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0], []):
        with pytest.raises(ValueError):
            normalise_weights(weights)
    with pytest.raises(ValueError, match="non-negative"):
        blend([a, b], [1.0, -1.0])
    with pytest.raises(ValueError, match="zero"):
        blend([a, b], [0, 0], "slerp")
    with pytest.raises(ValueError, match="weights"):
        blend([a, b], [1.0])
    with pytest.raises(ValueError, match="shape"):
        blend([a, b[:5]], [1, 1])
    with pytest.raises(ValueError, match="method"):
        blend([a, b], [1, 1], "cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        slerp(a, b, 1.5)
    assert normalise_weights([1, 3]) == [0.25, 0.75]


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_transition_reaches_end_exactly_and_monotonically(method: str) -> None:
    start, end = embedding(0), embedding(1, tokens=6)
    n = 5
    tr = PromptTransition(start, end, blocks=n, method=method)  # type: ignore[arg-type]
    dists = []
    for k in range(n + 3):
        e = tr.at(k)
        assert e.shape == start.shape
        assert torch.equal(e[TOKENS:], torch.zeros(TEXT_LEN - TOKENS, DIM))  # padding stays zero
        dists.append((e - end).norm().item())
        assert tr.done(k) == (k >= n)
        if k < n:
            assert not torch.equal(e, end)
        else:
            assert torch.equal(e, end)
    assert (tr.at(0) - start).norm() > 0  # block 0 is already a step away from start
    assert all(d1 < d0 for d0, d1 in itertools.pairwise(dists[: n + 1])), dists
    assert tr.fraction(0) == pytest.approx(1 / (n + 1)) and tr.fraction(n) == 1.0


def test_transition_rejects_bad_arguments() -> None:
    a, b = embedding(0), embedding(1)
    for blocks in (0, -3):
        with pytest.raises(ValueError, match="blocks"):
            PromptTransition(a, b, blocks=blocks)
    with pytest.raises(ValueError, match="shape"):
        PromptTransition(a, b[:4], blocks=2)
    with pytest.raises(ValueError, match="method"):
        PromptTransition(a, b, blocks=2, method="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PromptTransition(a, b, blocks=2).at(-1)
