"""Import transformers from inside a rollcast checkout without our `kernels/` folder shadowing HF's.

transformers (>= 5) depends on Hugging Face's `kernels` package and imports it while loading any
model class. rollcast's Triton kernels live in a top-level `kernels/` folder (installed as
`rollcast.kernels`, never as `kernels`), but `python -m ...` run from the checkout puts the
checkout first on `sys.path`, where that folder then answers `import kernels` and transformers
fails with "cannot import name ... from 'kernels'". `unshadow_hub_kernels` imports the installed
package once with the checkout left off the path, so `sys.modules["kernels"]` is the real one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

_OWN_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _shadows(entry: str) -> bool:
    """Whether this `sys.path` entry would resolve `import kernels` to rollcast's folder."""
    try:
        return (Path(entry or ".").resolve() / "kernels") == _OWN_KERNELS
    except OSError:
        return False


@functools.cache  # once per process: every lazy transformers import calls it
def unshadow_hub_kernels() -> None:
    """Make `kernels` in `sys.modules` the installed distribution, if ours would shadow it."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != _OWN_KERNELS:
        return
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not _shadows(entry)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        # Not installed (older transformers): transformers then finds no version for the folder
        # and treats hub kernels as unavailable, which is what we want.
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved
