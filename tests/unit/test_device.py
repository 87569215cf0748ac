"""device=auto|cpu|gpu (cuda = gpu): the one place that decides where model work runs."""

from __future__ import annotations

import pytest
import torch

from biogen.device import cluster_accelerator, resolve_accelerator, torch_device
from biogen.errors import ConfigError


def test_words_and_the_cuda_alias(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "a GPU")
    assert [resolve_accelerator(d) for d in ("auto", "cpu", "gpu", "cuda")] == ["gpu", "cpu", "gpu", "gpu"]
    assert [torch_device(d) for d in ("auto", "cpu", "gpu", "cuda")] == ["cuda", "cpu", "cuda", "cuda"]

def test_cluster_decision_without_ray_is_this_machines(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed (an offline GPU node)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cluster_accelerator("auto") == "cpu"


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_accelerator("auto") == "cpu" and torch_device("auto") == "cpu"
    for word in ("gpu", "cuda"):
        with pytest.raises(ConfigError, match="torch sees no CUDA device.*use device=cpu"):
            resolve_accelerator(word)


def test_unknown_word_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"device='tpu' is not valid; choose one of auto, cpu, gpu \(cuda = gpu\)"):
        resolve_accelerator("tpu")
    with pytest.raises(ConfigError, match="device='cuda:1' is not valid"):
        torch_device("cuda:1")
