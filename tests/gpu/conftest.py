"""GPU tests: they skip only when no CUDA GPU is visible, saying why."""

import pytest


@pytest.fixture(scope="module")
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU visible to PyTorch (torch {torch.__version__}, CUDA build: "
                    f"{torch.version.cuda or 'none'})")
