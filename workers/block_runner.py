"""The model runner: executes one forward for a micro-batch of sessions' block-steps.

A block of F latent frames takes K denoising steps (one forward each), then, under the
Self-Forcing policy, a clean t=0 context pass that rewrites the block's K/V. Each call to `run`
advances every given session by exactly one forward; sessions at different blocks, steps and
stream positions batch together as long as their forwards have the same shape (`bucket`).
The caller (the engine) decides which sessions run together; this class owns the tensors.

Where the layers run is the `DiTForward`'s business (`dit_forward.py`): here, or across pipeline
stages. A forward is `launch`ed and later `complete`d, so a pipelined DiT can hold several
micro-batches in flight; `run` does both at once. Between its launch and its completion a session
must not be launched again (its next forward depends on this one's output).

Noise is drawn from each session's own generator, so a session's frames do not depend on what
it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rollcast.workers.causal_wan import CausalWanModel
from rollcast.workers.dit_forward import DiTForward, ForwardHandle, KVWrite, LocalDiT
from rollcast.workers.kv_cache import KVCachePool
from rollcast.workers.prompt_kv import PromptHandle, PromptRef
from rollcast.workers.sampler import FlowMatchSampler
from rollcast.workers.stream_state import BlockInput, StreamState, Work


@dataclass
class PendingRun:
    """A launched forward: its sessions, what each was doing, and the handle to its output."""

    states: list[StreamState]
    works: list[Work]
    timesteps: list[float]
    x: Tensor
    handle: ForwardHandle


class BlockRunner:
    def __init__(
        self,
        dit: DiTForward,
        sampler: FlowMatchSampler,
        *,
        latent_hw: tuple[int, int],
        frames_per_block: int | None = None,
    ) -> None:
        cfg = dit.config
        self.dit = dit
        self.config = cfg
        pool = dit.pool
        self.pool = pool
        self.policy = pool.policy
        self.sampler = sampler
        self.frames_per_block = frames_per_block or cfg.frames_per_block
        self.policy.validate_block(self.frames_per_block)
        h, w = latent_hw
        if h % cfg.patch_size[1] or w % cfg.patch_size[2]:
            raise ValueError(f"latent size {h}x{w} does not divide by the patch {cfg.patch_size}")
        self.latent_hw = latent_hw
        self.grid_hw = (h // cfg.patch_size[1], w // cfg.patch_size[2])
        if self.grid_hw[0] * self.grid_hw[1] != pool.tokens_per_frame:
            raise ValueError(f"KV pool holds {pool.tokens_per_frame} tokens per frame, latent "
                             f"{h}x{w} has {self.grid_hw[0] * self.grid_hw[1]}")
        self.block_shape = (cfg.in_dim, self.frames_per_block, h, w)
        self.device = pool.device

    @classmethod
    def local(cls, model: CausalWanModel, pool: KVCachePool, sampler: FlowMatchSampler, *,
              latent_hw: tuple[int, int], frames_per_block: int | None = None) -> BlockRunner:
        """A runner whose layers all run in this process."""
        return cls(LocalDiT(model, pool), sampler, latent_hw=latent_hw, frames_per_block=frames_per_block)

    @property
    def model(self) -> CausalWanModel | None:
        """The whole model when it runs in this process (None when it is split into stages)."""
        return getattr(self.dit, "model", None)

    def shutdown(self) -> None:
        """Stop the stages when the layers run elsewhere (nothing to do for a local model)."""
        self.dit.close()

    @property
    def depth(self) -> int:
        """Forwards that may be in flight at once."""
        return self.dit.depth

    def prompt_kv(self, embedding: Tensor) -> PromptHandle:
        """The runner's handle on a prompt's cross-attention K/V (text embedding [L, text_dim])."""
        return self.dit.prompt_kv(embedding)

    # -- session lifecycle --------------------------------------------------------------------

    def open(self, session_id: str, prompt: PromptHandle, *, seed: int,
             num_steps: int | None = None, v2v: bool = False) -> StreamState:
        timesteps = self.sampler.timesteps(num_steps)  # a bad step count raises before a row is taken
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        clean = None
        if self.policy.recache_on_prompt_switch or self.dit.remote:
            c, _, h, w = self.block_shape
            clean = torch.zeros(c, self.pool.capacity, h, w, device=self.device)
        row = self.pool.allocate()
        self.dit.opened(row)
        return StreamState(
            session_id=session_id, row=row, prompt=prompt, generator=gen,
            timesteps=timesteps,
            slot_rope=[0] * self.pool.capacity, clean=clean, v2v=v2v,
        )

    def close(self, state: StreamState) -> None:
        """Free the session's cache row; its tensors go with the state object."""
        if state.closed:
            return
        self.pool.release(state.row)
        self.dit.released(state.row)
        state.latent = state.clean = None
        state.closed = True

    def set_prompt(self, state: StreamState, prompt: PromptHandle) -> None:
        """Switch prompt at the next block boundary (re-caching first if the policy says so)."""
        state.pending_prompt = prompt
        if self._needs_recache(state):
            state.recache_pending = not state.in_block

    def add_input(self, state: StreamState, block: BlockInput) -> None:
        """Queue a v2v session's next block of encoded input."""
        if not state.v2v:
            raise ValueError(f"session {state.session_id} is text-to-video; it takes no input")
        if tuple(block.latents.shape) != self.block_shape:
            raise ValueError(f"input latents must be {self.block_shape}, got {tuple(block.latents.shape)}")
        if not 0 < block.noise_scale <= 1 or block.timestep <= 0:
            raise ValueError(f"bad v2v noise: scale {block.noise_scale}, timestep {block.timestep}")
        state.inputs.append(block)

    def set_num_steps(self, state: StreamState, num_steps: int) -> None:
        """Change the denoising steps (degradation/recovery) from the next block on."""
        state.pending_timesteps = self.sampler.timesteps(num_steps)

    def bucket(self, state: StreamState) -> tuple[str, int]:
        """Sessions whose forwards share a shape: (kind, latent frames in the forward)."""
        work = state.next_work
        if work is Work.RECACHE:
            return work.value, len(self._recache_frames(state))
        return "block", self.frames_per_block

    # -- one forward ------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, states: list[StreamState]) -> list[Tensor | None]:
        """One forward for every session; returns each finished block's clean latents x0
        [C, F, h, w] (None for sessions whose block is still in progress)."""
        if not states:
            return []
        return self.complete(self.launch(states))

    @torch.no_grad()
    def launch(self, states: list[StreamState]) -> PendingRun:
        """Start one forward for every session (new blocks draw their noise now)."""
        self._validate(states)
        if states[0].next_work is Work.RECACHE:
            return self._launch_recache(states)
        f = self.frames_per_block
        works = [s.next_work for s in states]
        new_block = [w is Work.DENOISE and s.step == 0 for s, w in zip(states, works, strict=True)]
        for s, is_new in zip(states, new_block, strict=True):
            if is_new:
                self._start_block(s)
        ts = [0.0 if w is Work.CONTEXT else s.timesteps[s.step]
              for s, w in zip(states, works, strict=True)]
        x = torch.stack([s.latent for s in states])  # type: ignore[misc]
        t = torch.tensor(ts, device=self.device)[:, None].expand(-1, f)
        write = KVWrite(
            rows=[s.row for s in states],
            frames=[list(range(s.frames_done, s.frames_done + f)) for s in states],
            rope_positions=[list(range(s.block_rope_start, s.block_rope_start + f)) for s in states],
            new_block=new_block, grid_hw=self.grid_hw,
        )
        sigma = torch.tensor([self.sampler.sigma(ti) for ti in ts], device=self.device)
        decode = [s.row if self._decodes_here(s, w) else -1 for s, w in zip(states, works, strict=True)]
        handle = self.dit.launch(x, t, [s.prompt for s in states], write, sigma, decode)
        return PendingRun(states, works, ts, x, handle)

    def _decodes_here(self, s: StreamState, work: Work) -> bool:
        """Whether this forward finishes the session's block and the DiT decodes it on the way."""
        return (self.dit.decodes and s.decode_output and work is Work.DENOISE
                and s.step + 1 == len(s.timesteps))

    @torch.no_grad()
    def complete(self, run: PendingRun) -> list[Tensor | None]:
        """Wait for a launched forward and advance its sessions (re-noise to the next step, or
        finish the block). Frames the DiT decoded on the way wait in each state's `decoded`."""
        out = run.handle.wait()
        if run.works[0] is Work.RECACHE:
            for s in run.states:
                s.recache_pending = False
            return [None] * len(run.states)
        for s, frames in zip(run.states, out.frames, strict=True):
            if frames is not None:
                s.decoded = frames
        return [self._advance(s, w, x0_i)
                for s, w, x0_i in zip(run.states, run.works, out.x0.unbind(0), strict=True)]

    def _validate(self, states: list[StreamState]) -> None:
        if not states:
            raise ValueError("a forward needs at least one session")
        closed = [s.session_id for s in states if s.closed]
        if closed:
            raise ValueError(f"sessions already closed: {closed}")
        waiting = [s.session_id for s in states if not s.ready]
        if waiting:
            raise ValueError(f"v2v sessions without input for their next block: {waiting}")
        buckets = {self.bucket(s) for s in states}
        if len(buckets) != 1:
            raise ValueError(f"sessions of different forward shapes in one batch: {buckets}")
        if len({s.row for s in states}) != len(states):
            raise ValueError("a session appears twice in one batch")

    def _start_block(self, s: StreamState) -> None:
        if s.pending_prompt is not None:
            s.prompt, s.pending_prompt = s.pending_prompt, None
        if s.pending_timesteps is not None:
            s.timesteps, s.pending_timesteps = s.pending_timesteps, None
        start = s.rope_next
        reset = self.policy.rope_reset_frames
        if reset is not None and start >= reset:
            start = self.pool.capacity - self.frames_per_block
        s.block_rope_start = start
        noise = torch.randn(self.block_shape, generator=s.generator, device=self.device)
        if s.v2v:
            # The input enters at σ = noise_scale; denoising starts at the controller's timestep.
            inp = s.inputs.popleft()
            s.latent = self.sampler.add_noise(inp.latents.to(noise.dtype), noise, inp.noise_scale)
            s.timesteps = [inp.timestep, *s.timesteps[1:]]
        else:
            s.latent = noise

    def _advance(self, s: StreamState, work: Work, x0: Tensor) -> Tensor | None:
        if work is Work.CONTEXT:
            self._finish_block(s, s.latent)  # type: ignore[arg-type]
            return None
        nxt = s.step + 1
        if nxt < len(s.timesteps):
            sigma = self.sampler.sigma(s.timesteps[nxt])
            noise = torch.randn(x0.shape, generator=s.generator, device=self.device)
            s.latent = self.sampler.add_noise(x0, noise, sigma)
            s.step = nxt
            return None
        if self.policy.context_pass:
            s.latent, s.step = x0, nxt
        else:
            self._finish_block(s, x0)
        return x0

    def _finish_block(self, s: StreamState, x0: Tensor) -> None:
        f = self.frames_per_block
        for i in range(f):
            slot = self.pool.slot_of(s.frames_done + i)
            s.slot_rope[slot] = s.block_rope_start + i
            if s.clean is not None:
                s.clean[:, slot] = x0[:, i]
        s.frames_done += f
        s.rope_next = s.block_rope_start + f
        s.step, s.latent = 0, None
        if s.pending_prompt is not None and self._needs_recache(s):
            s.recache_pending = True

    # -- LongLive re-cache ----------------------------------------------------------------

    def _needs_recache(self, s: StreamState) -> bool:
        """A prompt switch re-caches only frames it would rewrite: right after the first block
        (only the kept sink cached) there are none, and the new prompt simply starts the next block."""
        return self.policy.recache_on_prompt_switch and bool(self._recache_frames(s))

    def _recache_frames(self, s: StreamState) -> list[int]:
        n = s.frames_done
        sink, window = self.policy.sink_frames, self.policy.window_frames
        recent = list(range(max(sink, n - window), n))
        if self.policy.keep_sink_on_recache:
            return recent
        return list(range(min(sink, n))) + recent

    def _launch_recache(self, states: list[StreamState]) -> PendingRun:
        """One t=0 forward over each session's cached frames with its new prompt, rewriting their
        K/V (the frames attend to the sink and to each other); its output is not used."""
        frames = [self._recache_frames(s) for s in states]
        for s in states:
            if s.pending_prompt is not None:
                s.prompt, s.pending_prompt = s.pending_prompt, None
        latents = [self._clean_latents(s, fs) for s, fs in zip(states, frames, strict=True)]
        return self._launch_clean(states, frames, latents, decode=False)

    def _clean_latents(self, s: StreamState, frames: list[int]) -> tuple[Tensor, list[int]]:
        """The clean latents [C, n, h, w] of cached frames and their RoPE positions."""
        slots = [self.pool.slot_of(fr) for fr in frames]
        return s.clean[:, slots], [s.slot_rope[i] for i in slots]  # type: ignore[index]

    def _launch_clean(self, states: list[StreamState], frames: list[list[int]],
                      latents: list[tuple[Tensor, list[int]]], *, decode: bool) -> PendingRun:
        """A t=0 forward over clean latents of the given frames (with their RoPE positions),
        rewriting their K/V; with `decode`, a decoding DiT also runs them through each row's VAE
        decode stream."""
        x = torch.stack([lat for lat, _ in latents])
        t = torch.zeros(x.shape[0], x.shape[2], device=self.device)
        write = KVWrite(rows=[s.row for s in states], frames=frames, rope_positions=[r for _, r in latents],
                        new_block=[False] * len(states), grid_hw=self.grid_hw)
        rows = [s.row if decode and self.dit.decodes else -1 for s in states]
        handle = self.dit.launch(x, t, [s.prompt for s in states], write,
                                 torch.zeros(len(states), device=self.device), rows)
        return PendingRun(states, [Work.RECACHE] * len(states), [0.0] * len(states), x, handle)

    # -- a rebuilt pipeline -----------------------------------------------------------------------

    @torch.no_grad()
    def resume(self, s: StreamState, prompts: dict[int, PromptHandle]) -> None:
        """Carry a session over from a lost pipeline: the same cache row on this runner's DiT, its
        prompts re-sent (`prompts` maps old prompt ids to new handles, shared across sessions),
        and its cache re-filled by one t=0 forward over the clean latents of every cached frame.
        The K/V come out close to, not equal to, the lost ones (those frames attended causally
        when first cached). A decoding DiT's fresh VAE stream is warmed on the same latents, so
        the next block decodes as a continuation."""
        if s.frames_done and s.clean is None:
            raise ValueError(f"session {s.session_id} kept no clean latents to re-fill its cache from")
        self.pool.allocate(s.row)
        self.dit.opened(s.row)
        s.prompt = self._carry_prompt(s.prompt, prompts)
        if s.pending_prompt is not None:
            s.pending_prompt = self._carry_prompt(s.pending_prompt, prompts)
        frames, latents = self._refill(s)
        if frames:
            recache = s.recache_pending  # a LongLive re-cache still due stays due
            self.complete(self._launch_clean([s], [frames], [latents], decode=True))
            s.recache_pending = recache

    def _carry_prompt(self, old: PromptHandle, prompts: dict[int, PromptHandle]) -> PromptHandle:
        if not isinstance(old, PromptRef):
            return old  # K/V computed in this process: still valid
        if old.prompt_id not in prompts:
            if old.embedding is None:
                raise ValueError("a prompt reference without its embedding cannot be re-sent")
            prompts[old.prompt_id] = self.prompt_kv(old.embedding)
        return prompts[old.prompt_id]

    def _refill(self, s: StreamState) -> tuple[list[int], tuple[Tensor, list[int]]]:
        """What re-fills a session's cache: every cached frame (sink and window) and, when its
        finished block still awaits the context pass, that block's x0 too, since it was decoded
        already (the context pass then writes those frames again, as it would have)."""
        n, f = s.frames_done, self.frames_per_block
        pending = s.next_work is Work.CONTEXT
        total = n + (f if pending else 0)
        sink, window = self.policy.sink_frames, self.policy.window_frames
        frames = list(range(min(sink, n))) + list(range(max(sink, total - window), n))
        clean, rope = self._clean_latents(s, frames)
        if pending:
            frames += list(range(n, total))
            clean = torch.cat([clean, s.latent], dim=1)  # type: ignore[list-item]
            rope = rope + list(range(s.block_rope_start, s.block_rope_start + f))
        return frames, (clean, rope)
