"""Text and video in, video frames out: the DiT's block runner joined to the text encoder and VAE.

`VideoPipeline` owns the shared parts (model, KV pool, text encoder with its prompt cache, VAE);
`VideoSession` owns one stream's per-session parts beyond the KV row: its VAE decode state and, for
video-to-video, its encode state, motion-aware noise controller and not-yet-encoded input frames.
Who runs which forward when is the caller's business (`generate` below runs one session straight
through; the engine batches many).

Frame bookkeeping (F latent frames per block): block 0 decodes to 1 + 4(F - 1) frames, every later
block to 4F. A v2v session needs that many input frames before each block can start.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from rollcast.workers.block_runner import BlockRunner
from rollcast.workers.checkpoint import CheckpointError
from rollcast.workers.model_files import ModelFiles, shipped_checkpoint
from rollcast.workers.noise_controller import MotionNoiseController, NoiseControllerConfig
from rollcast.workers.prompt_blend import PromptTransition, blend
from rollcast.workers.prompt_cache import PromptEmbeddingCache
from rollcast.workers.prompt_kv import PromptHandle
from rollcast.workers.stream_generator import WorkerSpec, build_runner
from rollcast.workers.stream_state import BlockInput, StreamState
from rollcast.workers.text_encoder import TextEncoder, TextEncoderConfig, UMT5TextEncoder
from rollcast.workers.tiny_text import WordTextEncoder
from rollcast.workers.vae import StreamingVAE, VaeSpec, video_frames
from rollcast.workers.video_file import to_pixels, to_uint8

# A prompt: plain text, or weighted texts blended in embedding space.
WeightedPrompt = Sequence[tuple[str, float]]


@dataclass(frozen=True)
class PipelineSpec:
    worker: WorkerSpec
    vae: str | None = None  # "wan" | "tiny"; default: the model config's
    prompt_cache_size: int = 64
    blend_method: str = "slerp"
    noise: NoiseControllerConfig = field(default_factory=NoiseControllerConfig)
    # Without a checkpoint, the `tiny` preset loads its shipped trained weights; True keeps the
    # seeded random weights instead (tests of the machinery, not of the model).
    synthetic_weights: bool = False

    @property
    def vae_kind(self) -> str:
        return self.vae or self.worker.config.default_vae


def build_text_encoder(spec: WorkerSpec, files: ModelFiles | None) -> TextEncoder:
    cfg = spec.config
    if files is not None and files.word_text_encoder is not None:
        enc = WordTextEncoder.load(files.word_text_encoder, device=spec.device, dtype=spec.dtype)
    elif files is not None and files.text_encoder is not None:
        weights, tokenizer = files.text()
        enc: TextEncoder = UMT5TextEncoder.from_wan_checkpoint(
            weights, tokenizer, device=spec.device, dtype=spec.dtype, text_len=cfg.text_len)
    else:
        enc = UMT5TextEncoder.synthetic(TextEncoderConfig.preset(cfg.text_encoder), seed=spec.seed,
                                        device=spec.device, dtype=spec.dtype)
    if (enc.text_dim, enc.text_len) != (cfg.text_dim, cfg.text_len):
        raise CheckpointError(f"text encoder gives [{enc.text_len}, {enc.text_dim}] embeddings, the model "
                              f"{cfg.name} expects [{cfg.text_len}, {cfg.text_dim}]")
    return enc


class VideoPipeline:
    def __init__(self, runner: BlockRunner, vae: StreamingVAE, text: TextEncoder, *,
                 spec: PipelineSpec) -> None:
        self.runner = runner
        self._rebuild_runner: Callable[[], BlockRunner] | None = None
        self.vae = vae
        self.text = text
        self.prompts = PromptEmbeddingCache(text, capacity=spec.prompt_cache_size)
        self.spec = spec
        self.config = runner.config
        self.fps = self.config.fps
        lh, lw = runner.latent_hw
        self.resolution = (lw * vae.spatial_stride, lh * vae.spatial_stride)  # (width, height)

    @classmethod
    def build(cls, spec: PipelineSpec,
              runner_builder: Callable[[WorkerSpec, VaeSpec], BlockRunner] = build_runner) -> VideoPipeline:
        """Every component from one model directory: the checkpoint's, else the shipped one of the
        `tiny` preset (unless `synthetic_weights`); random weights when there is neither.
        `runner_builder` makes the DiT's runner (a pipeline-parallel one splits it into stages and
        builds the same VAE where the blocks come out, to decode them there)."""
        w = spec.worker
        if spec.vae_kind not in ("wan", "tiny"):
            raise ValueError(f"unknown VAE {spec.vae_kind!r}; choose wan or tiny")
        files = None
        checkpoint = w.checkpoint
        if checkpoint is None and not spec.synthetic_weights and spec.vae_kind == "tiny":
            checkpoint = shipped_checkpoint(w.config)  # it holds the tiny VAE only
        if checkpoint is not None:
            if not Path(checkpoint).is_dir():
                raise CheckpointError(f"{checkpoint}: not a model directory (it must hold the DiT, "
                                      f"the VAE, the text encoder and its tokenizer)")
            files = ModelFiles.resolve(checkpoint)
            files.check_text()  # fail before the long loads if a part is missing
            files.vae(spec.vae_kind)
        vae_spec = VaeSpec(spec.vae_kind, w.config.vae_size,  # type: ignore[arg-type]
                           checkpoint=files.vae(spec.vae_kind) if files else None,
                           device=w.device, dtype=w.dtype, seed=w.seed)
        vae = vae_spec.build()
        if vae.z_dim != w.config.in_dim:
            raise CheckpointError(f"VAE latents have {vae.z_dim} channels, the model takes {w.config.in_dim}")
        text = build_text_encoder(w, files)
        worker = dataclasses.replace(w, checkpoint=files.dit if files else None)
        pipeline = cls(runner_builder(worker, vae_spec), vae, text, spec=spec)
        pipeline._rebuild_runner = functools.partial(runner_builder, worker, vae_spec)
        return pipeline

    def rebuild_runner(self) -> None:
        """Replace a runner whose stages are gone by a fresh one (every session on the old one
        must be closed: their cache rows lived there)."""
        if self._rebuild_runner is None:
            raise RuntimeError("this pipeline was not built by VideoPipeline.build: cannot rebuild")
        self.runner.shutdown()
        self.runner = self._rebuild_runner()

    def shutdown(self) -> None:
        """Stop the DiT's pipeline stages, if it has any (a local model needs nothing)."""
        self.runner.shutdown()

    # -- prompts --------------------------------------------------------------------------------

    def embed(self, prompt: str | WeightedPrompt) -> Tensor:
        """The text embedding [text_len, text_dim] of a prompt or a weighted blend of prompts."""
        if isinstance(prompt, str):
            return self.prompts.get(prompt)
        texts = [t for t, _ in prompt]
        embs = self.prompts.get_many(texts)
        return blend(list(embs), [w for _, w in prompt], self.spec.blend_method)  # type: ignore[arg-type]

    def prompt_kv(self, embedding: Tensor) -> PromptHandle:
        return self.runner.prompt_kv(embedding)

    # -- sessions -------------------------------------------------------------------------------

    def open(self, session_id: str, prompt: str | WeightedPrompt, *, seed: int,
             num_steps: int | None = None, v2v: bool = False) -> VideoSession:
        emb = self.embed(prompt)
        state = self.runner.open(session_id, self.prompt_kv(emb), seed=seed, num_steps=num_steps, v2v=v2v)
        return VideoSession(self, state, emb)

    def close(self, session: VideoSession) -> None:
        self.runner.close(session.state)
        session.release()


class VideoSession:
    """One stream's VAE states, v2v input buffer and prompt transition, beside its StreamState."""

    def __init__(self, pipeline: VideoPipeline, state: StreamState, embedding: Tensor) -> None:
        self.pipeline = pipeline
        self.state = state
        self.embedding = embedding
        self.transition: PromptTransition | None = None
        self._transition_block = 0
        vae = pipeline.vae
        self.decode_state = vae.decode_state()
        self.frames_out = 0
        self.blocks_in = 0
        self.encode_state = vae.encode_state() if state.v2v else None
        self.controller = MotionNoiseController(pipeline.spec.noise) if state.v2v else None
        # Input frames (uint8 [t, H, W, 3] pieces) not yet encoded. `add_frames` may be called from
        # any thread; the lock guards only this buffer, encoding runs outside it.
        self._inbox: deque[np.ndarray] = deque()
        self._inbox_frames = 0
        self._inbox_lock = threading.Lock()
        self._last_frame: Tensor | None = None  # the last input frame encoded so far

    @property
    def frames_per_block(self) -> int:
        return self.pipeline.runner.frames_per_block

    def block_frames(self, block: int) -> int:
        """Video frames block `block` decodes to (and, for v2v, consumes)."""
        f = self.frames_per_block
        return video_frames(f) if block == 0 else 4 * f

    # -- prompt changes -------------------------------------------------------------------------

    def set_prompt(self, prompt: str | WeightedPrompt, *, transition_blocks: int = 0) -> None:
        """Change the prompt from the next block on: at once, or blended over `transition_blocks`
        blocks (the next block gets the first blend step, `before_block` advances it)."""
        target = self.pipeline.embed(prompt)
        if transition_blocks > 0:
            self.transition = PromptTransition(self.embedding, target, transition_blocks,
                                               self.pipeline.spec.blend_method)  # type: ignore[arg-type]
            self._transition_block = -1
        else:
            self.transition = None
            self._apply(target)

    def before_block(self) -> None:
        """Call once per block, after the previous block's latents came out and before the new
        block's first step: advances a running prompt transition by one block."""
        if self.transition is None:
            return
        self._transition_block += 1
        self._apply(self.transition.at(self._transition_block))
        if self.transition.done(self._transition_block):
            self.transition = None

    def _apply(self, embedding: Tensor) -> None:
        self.embedding = embedding
        self.pipeline.runner.set_prompt(self.state, self.pipeline.prompt_kv(embedding))

    # -- video-to-video input -------------------------------------------------------------------

    def push_frames(self, frames: np.ndarray) -> int:
        """Add input frames (uint8 [T, H, W, 3] at the model's resolution); encodes every complete
        block's worth and queues it. Returns the number of blocks queued by this call. Runs the VAE:
        call it on the thread that runs the model (others use `add_frames`)."""
        self.add_frames(frames)
        return self.encode_input()

    def add_frames(self, frames: np.ndarray) -> int:
        """Buffer input frames without encoding them (any thread, cheap: one copy). Returns the
        number of frames buffered and not yet encoded."""
        if self.encode_state is None or self.controller is None:
            raise ValueError("push_frames on a text-to-video session")
        w, h = self.pipeline.resolution
        if frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise ValueError(f"input frames must be [T, {h}, {w}, 3], got {tuple(frames.shape)}")
        piece = np.array(frames, dtype=np.uint8, copy=True)  # the caller may reuse its buffer
        with self._inbox_lock:
            if len(piece):
                self._inbox.append(piece)
                self._inbox_frames += len(piece)
            return self._inbox_frames

    @property
    def buffered_frames(self) -> int:
        """Input frames buffered and not yet encoded."""
        with self._inbox_lock:
            return self._inbox_frames

    def input_ready(self) -> bool:
        """Whether the next block can start as far as input goes: always for text-to-video; for
        v2v when its input is encoded already or enough frames are buffered to encode it, or the
        current block is under way (any thread)."""
        st = self.state
        if not st.v2v or st.in_block or st.recache_pending or st.inputs:
            return True
        return self.buffered_frames >= self.block_frames(self.blocks_in)

    def encode_input(self, max_blocks: int | None = None) -> int:
        """Encode buffered frames into queued block inputs, one complete block at a time (at most
        `max_blocks`); returns how many blocks were queued."""
        queued = 0
        while max_blocks is None or queued < max_blocks:
            n = self.block_frames(self.blocks_in)
            with self._inbox_lock:
                if self._inbox_frames < n:
                    break
                chunk = self._take(n)
            self._encode_block(to_pixels(chunk, self.pipeline.runner.device)[None])
            queued += 1
        return queued

    def _take(self, n: int) -> np.ndarray:
        """The first n buffered frames (the caller holds the inbox lock and checked there are n)."""
        pieces, got = [], 0
        while got < n:
            piece = self._inbox.popleft()
            if got + len(piece) > n:
                piece, rest = piece[: n - got], piece[n - got:]
                self._inbox.appendleft(rest)
            pieces.append(piece)
            got += len(piece)
        self._inbox_frames -= n
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _encode_block(self, chunk: Tensor) -> None:
        vae = self.pipeline.vae
        assert self.controller is not None
        scale, t0 = self.controller.update(chunk, self._last_frame)
        self._last_frame = chunk[:, :, -1:]
        z = vae.encode_chunk(chunk.to(vae.dtype), self.encode_state)[0]
        self.pipeline.runner.add_input(self.state, BlockInput(z, scale, t0))
        self.blocks_in += 1

    # -- output ---------------------------------------------------------------------------------

    def decode(self, x0: Tensor, lane: StreamState | None = None) -> np.ndarray:
        """A finished block's clean latents [C, F, h, w] → its video frames, uint8 [T, H, W, 3].
        A staged DiT may have decoded them already, on the stream state that finished the block
        (`lane`, default the session's own): those frames are taken instead."""
        source = lane or self.state
        frames, source.decoded = source.decoded, None
        if frames is None:
            vae = self.pipeline.vae
            frames = to_uint8(vae.decode_chunk(x0[None].to(vae.dtype), self.decode_state)[0])
        self.frames_out += len(frames)
        return frames

    def release(self) -> None:
        self.decode_state = self.encode_state = self._last_frame = None
        with self._inbox_lock:
            self._inbox.clear()
            self._inbox_frames = 0


def run_block(runner: BlockRunner, state: StreamState) -> Tensor:
    """Run one session's forwards until its current block's clean latents come out (the previous
    block's pending context pass, if any, runs first)."""
    while True:
        (x0,) = runner.run([state])
        if x0 is not None:
            return x0


def generate(
    pipeline: VideoPipeline,
    prompt: str | WeightedPrompt,
    *,
    frames: int,
    seed: int,
    num_steps: int | None = None,
    input_frames: np.ndarray | None = None,
    switches: Sequence[tuple[int, str]] = (),
    transition_blocks: int = 0,
    on_frames: Callable[[np.ndarray], None],
) -> int:
    """Generate exactly `frames` frames for one session, handing them to `on_frames` block by block.

    Blocks come in whole units, so the last block may decode past `frames`; the surplus is cut.
    For v2v the input is padded by repeating its last frame up to the block boundary.
    `switches` are (frame, prompt) changes: each takes effect at the first block that starts at or
    after its frame, at once or over `transition_blocks` blocks.
    Returns the number of frames emitted (always `frames`).
    """
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    v2v = input_frames is not None
    pending = sorted(switches, key=lambda s: s[0])
    session = pipeline.open("generate", prompt, seed=seed, num_steps=num_steps, v2v=v2v)
    try:
        emitted, block, used = 0, 0, 0
        while emitted < frames:
            if input_frames is not None:
                need = session.block_frames(block)
                chunk = input_frames[used:used + need]
                if len(chunk) < need:  # past the end: repeat the last input frame
                    pad = np.repeat(input_frames[-1:], need - len(chunk), axis=0)
                    chunk = np.concatenate([chunk, pad])
                used += need
                session.push_frames(chunk)
            while pending and pending[0][0] <= emitted:
                session.set_prompt(pending.pop(0)[1], transition_blocks=transition_blocks)
            session.before_block()
            out = session.decode(run_block(pipeline.runner, session.state))
            take = out[: frames - emitted]
            on_frames(take)
            emitted += len(take)
            block += 1
        return emitted
    finally:
        pipeline.close(session)
