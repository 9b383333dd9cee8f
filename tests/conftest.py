import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    # a recipe's end-to-end run (tests/test_recipe_*.py, the reproduce scripts) is marked `recipe`: CI's second
    # pass, on other kernels, deselects them (they assert records and files, not numbers that kernels change)
    for item in items:
        if item.path.name.startswith("test_recipe_") or item.path.name == "test_model_card.py":
            item.add_marker(pytest.mark.recipe)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one thread avoids thread-pool overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
