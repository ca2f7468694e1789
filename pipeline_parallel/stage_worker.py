"""One pipeline stage: a contiguous range of the DiT's layers and the KV caches of those layers.

A stage serves a loop of messages from the rank before it in the ring and passes each on to the
rank after it (the driver is rank 0, stage i is rank i + 1; the last stage sends back to rank 0,
or to the decode stage when there is one: `decode_stage.py`):

- `forward`: the first stage embeds the latents (patch + time embedding); every stage runs its
  layers against its own KV cache rows, using the forward's `KVWrite` (rows, frames, RoPE
  positions) sent along as host tensors; the last stage runs the head, takes the sampler's step
  to x0 = x - σ·v (the latents x travel along; they are small) and decodes the samples that
  finish a block, unless a decode stage does. Each stage adds its compute seconds to `stage_s`.
- `open_row` / `release_row`: a session took or gave back a cache row (the driver chose it); the
  decoding rank starts or drops that row's VAE decode stream.
- `prompt` / `drop_prompt`: a prompt's text embedding, from which each stage computes the
  cross-attention K/V of its own layers, keyed by the driver's prompt id; and their end.
- `rebalance`: new layer ranges; after passing the message on, the stage sends the weights and
  KV caches of layers it gives away straight to their new owner and receives the ones it gains
  (tag `MOVE_TAG`), then acknowledges from the last stage.
- `ping` (start-up) and `stop`: passed on; the last stage answers.

A forward that raises inside a stage becomes an `error` message carrying the text, passed on to
the driver, which fails that micro-batch's sessions; the stage keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from rollcast.pipeline_parallel.decode_stage import decode_outputs
from rollcast.pipeline_parallel.ring_messages import (
    ANSWERED,
    MOVE_TAG,
    RING_TAG,
    encode_text,
    ranges_of,
)
from rollcast.pipeline_parallel.transport import Transport
from rollcast.workers.causal_wan import WanBlock
from rollcast.workers.frame_decoder import FrameDecoder
from rollcast.workers.prompt_kv import PromptBatch, PromptKV
from rollcast.workers.sampler import FlowMatchSampler
from rollcast.workers.stream_generator import WorkerSpec, build_model, build_pool
from rollcast.workers.vae import VaeSpec


def owner(ranges: list[range], layer: int) -> int:
    return next(i for i, r in enumerate(ranges) if layer in r)


@dataclass(frozen=True)
class StageSpec:
    """What a stage builds: the worker's model and cache settings, the plan, and its place."""

    worker: WorkerSpec
    ranges: tuple[range, ...]
    index: int
    vae: VaeSpec | None = None  # decode finished blocks in the pipeline (else the driver does)
    vae_stage: bool = False  # ... on a dedicated decode stage after the last DiT stage

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == len(self.ranges) - 1

    @property
    def decodes(self) -> bool:
        """This stage decodes what comes out of the head."""
        return self.last and self.vae is not None and not self.vae_stage

    @property
    def ends_ring(self) -> bool:
        """This stage sends its replies to the driver (no decode stage after it)."""
        return self.last and not self.vae_stage


class StageWorker:
    def __init__(self, spec: StageSpec) -> None:
        w = spec.worker
        self.spec = spec
        self.ranges = list(spec.ranges)
        self.index = spec.index
        self.model = build_model(w, self.ranges[self.index])
        self.pool = build_pool(w, self.model.layers)
        self.device = torch.device(w.device)
        self.prompts: dict[int, tuple[Tensor, PromptKV]] = {}  # id -> (embedding, K/V of our layers)
        self._clock = StageClock(self.device)
        self.decoder = FrameDecoder(spec.vae.build(w.device)) if spec.decodes else None  # type: ignore[union-attr]

    # -- the loop -------------------------------------------------------------------------------

    def serve(self, transport: Transport) -> None:
        """Handle messages until `stop` (exceptions from the transport end the loop: the driver
        sees this rank fail)."""
        prev = 0 if self.index == 0 else self.index
        nxt = 0 if self.spec.ends_ring else self.index + 2
        while True:
            kind, msg = transport.recv(prev, tag=RING_TAG)
            if kind == "rebalance":
                if not self.spec.last:  # pass it on first: the next stage may be sending to us
                    transport.send(nxt, kind, {"ranges": msg["ranges"].clone()}, tag=RING_TAG)
                self.rebalance(ranges_of(msg["ranges"]), transport)
                if self.spec.last:
                    transport.send(nxt, "rebalanced", {"ranges": msg["ranges"].clone()}, tag=RING_TAG)
                continue
            # Received tensors live in buffers the next receive may overwrite while an asynchronous
            # send of them is still under way: whatever is passed on is a copy.
            out_kind, out = self.handle(kind, msg)
            if out_kind is not None and (not self.spec.ends_ring or out_kind in ANSWERED):
                transport.send(nxt, out_kind, out, tag=RING_TAG)
            if kind == "stop":
                return

    def handle(self, kind: str, msg: Mapping[str, Tensor]) -> tuple[str | None, Mapping[str, Tensor]]:
        """One ring message; returns what to pass on (kind None: nothing)."""
        if kind == "forward":
            try:
                return self.forward(msg)
            except (RuntimeError, ValueError, KeyError, IndexError) as e:
                return "error", {"text": encode_text(f"stage {self.index}: {type(e).__name__}: {e}")}
        if kind == "open_row":
            self.pool.allocate(int(msg["row"]))
            if self.decoder is not None:
                self.decoder.open(int(msg["row"]))
        elif kind == "release_row":
            self.pool.release(int(msg["row"]))
            if self.decoder is not None:
                self.decoder.release(int(msg["row"]))
        elif kind == "prompt":
            emb = msg["embedding"].clone()  # kept (rebalances recompute K/V from it) and passed on
            pid = msg["id"].clone()
            self.prompts[int(pid)] = (emb, self.model.prompt_kv(emb.to(self.device)))
            return kind, {"id": pid, "embedding": emb}
        elif kind == "drop_prompt":
            for i in msg["ids"].tolist():
                self.prompts.pop(i, None)
        elif kind == "ping":
            return ("pong" if self.spec.last else "ping"), {}
        elif kind == "stop":
            return ("stopped" if self.spec.last else "stop"), {}
        elif kind != "error":  # an error is an earlier stage's failed forward: passed on
            return "error", {"text": encode_text(f"stage {self.index}: unknown message {kind!r}")}
        return kind, {k: t.clone() for k, t in msg.items()}

    # -- forward --------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, msg: Mapping[str, Tensor]) -> tuple[str, dict[str, Tensor]]:
        self._clock.start()
        model, dev = self.model, self.device
        meta = {k: msg[k].clone() for k in ("rows", "frames", "rope", "new_block", "prompt_ids", "grid",
                                            "x", "sigma", "decode")}
        grid = tuple(meta["grid"].tolist())
        kv = self.pool.batch(
            rows=meta["rows"].tolist(), frames=meta["frames"].tolist(),
            rope_positions=meta["rope"].tolist(), new_block=meta["new_block"].tolist(),
            grid_hw=(grid[1], grid[2]), rope=model.rope,
        )
        prompts = PromptBatch.stack([self.prompts[i][1] for i in meta["prompt_ids"].tolist()])
        if self.spec.first:
            h, e, e0, _ = model.embed(meta["x"].to(dev), msg["t"].to(dev))
        else:
            h, e, e0 = msg["h"].to(dev), msg["e"].to(dev).clone(), msg["e0"].to(dev).clone()
        h = model.run_layers(h, e0, prompts, kv.attend)
        stage_s = msg["stage_s"].clone()
        if self.spec.last:  # the head, then the sampler's x0 (and the decode, if it is ours)
            v = model.unpatchify(model.head(h, e), grid)  # type: ignore[arg-type]
            x = meta["x"].to(dev)
            x0 = FlowMatchSampler.to_x0(x, v.to(x.dtype), meta["sigma"].to(dev).view(-1, 1, 1, 1, 1))
            stage_s[self.index] = self._clock.stop()
            if self.decoder is not None:
                return "forward", {"x0": x0, "stage_s": stage_s,
                                   **decode_outputs(self.decoder, x0, meta["decode"].tolist())}
            return "forward", {"x0": x0, "stage_s": stage_s, "decode": meta["decode"]}
        stage_s[self.index] = self._clock.stop()
        return "forward", {**meta, "h": h, "e": e, "e0": e0, "stage_s": stage_s}

    # -- rebalance ------------------------------------------------------------------------------

    def rebalance(self, ranges: list[range], transport: Transport) -> None:
        """Take the layer ranges `ranges`: send away the layers (weights and KV caches) whose
        owner changes, receive the ones gained, rebuild the cache pool and the prompts' K/V."""
        if len(ranges) != len(self.ranges):
            raise ValueError(f"a plan of {len(ranges)} stages for a pipeline of {len(self.ranges)}")
        old, new = self.ranges[self.index], ranges[self.index]
        for layer in old:
            if layer not in new:
                # Moves go through host memory: rare, and NCCL allows one tag per pair (the ring's).
                payload = {f"w.{k}": t.cpu() for k, t in self.model.blocks[str(layer)].state_dict().items()}
                payload.update({f"kv.{k}": t.cpu() for k, t in self.pool.export_layer(layer).items()})
                transport.send(owner(ranges, layer) + 1, "layer", payload, tag=MOVE_TAG)
        imported: dict[int, dict[str, Tensor]] = {}
        for layer in new:
            if layer in old:
                continue
            _, payload = transport.recv(owner(self.ranges, layer) + 1, tag=MOVE_TAG)
            block = WanBlock(self.model.config).to(device=self.device, dtype=self.model.dtype)
            block.load_state_dict({k[2:]: t.clone() for k, t in payload.items() if k.startswith("w.")})
            self.model.blocks[str(layer)] = block.eval().requires_grad_(False)
            imported[layer] = {k[3:]: t.to(self.device, copy=True) for k, t in payload.items()
                               if k.startswith("kv.")}
        self.pool.relayer(new, imported)
        for layer in old:
            if layer not in new:
                del self.model.blocks[str(layer)]
        self.model.layers = new
        self.ranges = list(ranges)
        for pid, (emb, _) in self.prompts.items():
            self.prompts[pid] = (emb, self.model.prompt_kv(emb.to(self.device)))


class StageClock:
    """Compute seconds of one forward on this stage. On CUDA it records events and reports the
    latest finished pair (possibly the previous forward's), so timing never syncs the host."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._t0 = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._last = 0.0

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((ev, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self._t0
        self._pending[-1][1].record()
        while self._pending and self._pending[0][1].query():
            a, b = self._pending.pop(0)
            self._last = a.elapsed_time(b) / 1000.0
        return self._last
