"""GPU tier: every test here is skipped unless CUDA is available."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tests/gpu runs on GPU machines only)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
