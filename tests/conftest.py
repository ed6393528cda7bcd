import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "comfyui: needs COMFYUI_DIR pointing to a ComfyUI checkout")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
