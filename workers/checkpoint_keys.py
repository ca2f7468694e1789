"""State-dict key layouts of causal Wan checkpoints, mapped onto Wan's own names.

- Wrapper prefixes: `model.` (Self-Forcing/CausVid/SDV2/Krea wrappers), `module.` (DDP),
  `_orig_mod.` (torch.compile), PEFT's `base_model.model.` and `.base_layer`.
- The diffusers layout (`WanTransformer3DModel`), including its norm2/norm3 swap.
- LongLive-style PEFT LoRA, merged into the base weights: W += (alpha / r) * B @ A.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.", "model.")

# Wan name -> diffusers name; block-level names apply after `blocks.{i}.`.
DIFFUSERS_GLOBAL = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
}
DIFFUSERS_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # Wan runs norm1, norm3 (cross), norm2 (ffn); diffusers renumbers them
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def strip_wrapper_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove prefixes every key shares (repeatedly: `model.model.` happens)."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p) :]: v for k, v in out.items()}
                changed = True
    return {k.replace(".base_layer.", "."): v for k, v in out.items()}


def _rename(name: str, table_global: dict[str, str], table_block: dict[str, str]) -> str:
    m = _BLOCK.match(name)
    if m:
        idx, rest = m.groups()
        for src, dst in table_block.items():
            if rest == src or rest.startswith(src + "."):
                return f"blocks.{idx}.{dst}{rest[len(src):]}"
        return name
    for src, dst in table_global.items():
        if name.startswith(src + ".") or name == src:
            return dst + name[len(src) :]
    return name


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def is_diffusers_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd)


def from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    g, b = _invert(DIFFUSERS_GLOBAL), _invert(DIFFUSERS_BLOCK)
    # Longest names first so `attn1.to_out.0` wins over shorter matches.
    b = dict(sorted(b.items(), key=lambda kv: -len(kv[0])))
    return {_rename(k, g, b): v for k, v in sd.items()}


def to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    b = dict(sorted(DIFFUSERS_BLOCK.items(), key=lambda kv: -len(kv[0])))
    return {_rename(k, DIFFUSERS_GLOBAL, b): v for k, v in sd.items()}


def to_wan_layout(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> Wan names."""
    out = strip_wrapper_prefixes(sd)
    return from_diffusers(out) if is_diffusers_layout(out) else out


_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def merge_lora(
    base: dict[str, Tensor], lora: Mapping[str, Tensor], *, alpha: float | None = None
) -> dict[str, Tensor]:
    """Merge a PEFT LoRA state dict into `base` (Wan names) in place and return it.

    `alpha` defaults to the rank, i.e. scale 1 (LongLive: rank 256, alpha 256).
    """
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in strip_wrapper_prefixes(lora).items():
        m = _LORA.match(key)
        if m is None:
            raise ValueError(f"LoRA file has a key that is not lora_A/lora_B: {key!r}")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    problems = []
    for module, ab in sorted(pairs.items()):
        wkey = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: has only lora_{''.join(ab)}")
        elif wkey not in base:
            problems.append(f"{module}: no such weight in the base model")
        else:
            a, b = ab["A"].float(), ab["B"].float()
            w = base[wkey]
            if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
                problems.append(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
                                f"fit weight {tuple(w.shape)}")
                continue
            scale = (alpha if alpha is not None else a.shape[0]) / a.shape[0]
            base[wkey] = (w.float() + scale * (b @ a)).to(w.dtype)
    if problems:
        raise ValueError("cannot merge LoRA: " + "; ".join(problems))
    return base


def lora_state_dict(
    deltas: Mapping[str, tuple[Tensor, Tensor]], prefix: str = "base_model.model."
) -> dict[str, Tensor]:
    """PEFT-layout LoRA state dict from {module: (A [r, in], B [out, r])}."""
    out: dict[str, Tensor] = {}
    for module, (a, b) in deltas.items():
        out[f"{prefix}{module}.lora_A.weight"] = a
        out[f"{prefix}{module}.lora_B.weight"] = b
    return out


def lora_target_modules(num_layers: int) -> list[str]:
    """Every Linear inside the attention blocks, as LongLive targets them."""
    names = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
    return [f"blocks.{i}.{n}" for i in range(num_layers) for n in names]


__all__ = [
    "from_diffusers",
    "is_diffusers_layout",
    "lora_state_dict",
    "lora_target_modules",
    "merge_lora",
    "strip_wrapper_prefixes",
    "to_diffusers",
    "to_wan_layout",
]

