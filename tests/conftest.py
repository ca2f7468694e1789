from __future__ import annotations

import pytest
import torch

from rollcast.workers import CausalWanModel
from rollcast.workers.transformers_import import unshadow_hub_kernels
from tests.helpers import tiny_model

torch.set_num_threads(2)
# `python -m pytest` puts the checkout first on sys.path; test modules import transformers
# directly, so HF's `kernels` must be in place before they are collected.
unshadow_hub_kernels()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def model() -> CausalWanModel:
    return tiny_model()
