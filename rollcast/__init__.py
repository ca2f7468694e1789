"""rollcast: SLO-aware serving of streaming causal video diffusion.

The subpackages live in the repository's top-level folders (see pyproject.toml):
`rollcast.workers` (model, caches, sampler, checkpoints), `rollcast.scheduler`,
`rollcast.server`, `rollcast.pipeline_parallel`, `rollcast.kernels`, `rollcast.loadgen`.
"""

__version__ = "0.1.0"
