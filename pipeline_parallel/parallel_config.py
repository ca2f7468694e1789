"""How a worker's DiT is split: the number of stages, where they run, which layers each holds."""

from __future__ import annotations

from dataclasses import dataclass

from rollcast.pipeline_parallel.partition import check_split, even_ranges
from rollcast.pipeline_parallel.stage_group import EXECUTORS, StageExecutor, start_pipeline
from rollcast.workers.block_runner import BlockRunner
from rollcast.workers.stream_generator import WorkerSpec, build_runner, runner_over
from rollcast.workers.vae import VaeSpec


@dataclass(frozen=True)
class ParallelConfig:
    stages: int = 1
    executor: StageExecutor = "local"  # stages as threads of this process; "mp": one process each;
    # "ray": one Ray actor each, a placement group per pipeline
    layer_ranges: tuple[range, ...] | None = None  # None: StreamDiffusionV2's even split
    rebalance: bool = True  # move layers online when measured stage times say so
    # Finished blocks are decoded where x0 comes out: on the last stage, or on a stage of its own.
    decode_stage: bool = False
    ray_address: str | None = None  # the Ray cluster to join ("auto", ray://...); None: a local one
    ray_resources: tuple[str, ...] = ()  # per rank, a custom Ray resource to place it by (GPU type)

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"stages must be at least 1, got {self.stages}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}; choose one of {list(EXECUTORS)}")
        if self.decode_stage and not self.staged:
            raise ValueError("a decode stage needs a staged pipeline (--stages 2 or more, or --executor "
                             "mp or ray)")
        if (self.ray_address is not None or self.ray_resources) and self.executor != "ray":
            raise ValueError(f"--address and --ray-resources are for --executor ray, not {self.executor}")
        if self.ray_resources and len(self.ray_resources) != self.stages + self.decode_stage:
            raise ValueError(f"--ray-resources names {len(self.ray_resources)} resources for "
                             f"{self.stages + self.decode_stage} pipeline ranks")
        if self.layer_ranges is not None and len(self.layer_ranges) != self.stages:
            raise ValueError(f"{len(self.layer_ranges)} layer ranges for {self.stages} stages")

    @property
    def staged(self) -> bool:
        """Whether the layers run on stage workers rather than in the driver's own forward."""
        return self.stages > 1 or self.executor != "local"

    def ranges(self, num_layers: int) -> list[range]:
        if self.stages > num_layers:
            raise ValueError(f"{self.stages} stages for a model of {num_layers} layers: each stage "
                             f"needs at least one")
        ranges = list(self.layer_ranges) if self.layer_ranges else even_ranges(num_layers, self.stages)
        check_split(ranges, num_layers)
        return ranges

    def build_runner(self, spec: WorkerSpec, vae: VaeSpec | None = None) -> BlockRunner:
        """The block runner of a worker: all layers in this process, or a driver over stages
        (which decode finished blocks with `vae` when it is given)."""
        if not self.staged:
            return build_runner(spec)
        ray = None
        if self.executor == "ray":
            from rollcast.pipeline_parallel.ray_stages import RayConfig  # Ray loads slowly

            ray = RayConfig(address=self.ray_address, stage_resources=self.ray_resources)
        dit = start_pipeline(spec, self.ranges(spec.config.num_layers), self.executor, vae=vae,
                             decode_stage=self.decode_stage, ray=ray, auto_rebalance=self.rebalance)
        return runner_over(spec, dit)


def parse_ranges(text: str) -> tuple[range, ...]:
    """'0-9,10-29' (inclusive layer numbers per stage) -> (range(0, 10), range(10, 30))."""
    out = []
    for part in text.split(","):
        try:
            a, b = (int(v) for v in part.split("-"))
        except ValueError:
            raise ValueError(f"layer ranges look like 0-9,10-29 (first-last per stage), "
                             f"got {text!r}") from None
        out.append(range(a, b + 1))
    return tuple(out)
