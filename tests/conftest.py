import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an sm_90 GPU and the built extension")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
