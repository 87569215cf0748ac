"""device=auto|cpu|cuda (gpu: the old word): the one place that decides where work runs."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from biogen import device as dev
from biogen.device import cluster_device, device_word, resolve_device, resolve_engine
from biogen.errors import ConfigError


def test_words_and_the_old_spelling(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "a GPU")
    monkeypatch.setattr(dev, "_warned", set())
    assert [resolve_device(d) for d in ("auto", "cpu", "cuda", "CUDA", "cuda:1")] == ["cuda", "cpu", "cuda", "cuda",
                                                                                    "cuda:1"]
    with caplog.at_level(logging.WARNING):
        assert resolve_device("gpu") == resolve_device("gpu") == "cuda"
    assert caplog.text.count("device=gpu is deprecated: write device=cuda") == 1  # once
    with pytest.raises(ConfigError, match="device=cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    for word in ("cuda", "gpu"):
        with pytest.raises(ConfigError, match=f"device={word} but torch .* sees no CUDA device.*use device=cpu"):
            resolve_device(word)


def test_cluster_decision_without_ray_is_this_machines(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed (an offline GPU node)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cluster_device("auto") == "cpu"


def test_engine_words(monkeypatch):
    from biogen.search import cuda

    monkeypatch.setattr(cuda, "cuda_available", lambda: (False, "cupy not installed"))
    assert [resolve_engine(e) for e in ("auto", "cpu", "cuda", "gpu")] == ["cpu", "cpu", "cuda", "cuda"]
    with pytest.raises(ConfigError, match="engine=cuda:1: choose the GPU with the index's device argument"):
        resolve_engine("cuda:1")


def test_unknown_word_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"device='tpu' is not valid; choose one of auto, cpu, cuda \(or cuda:N"):
        device_word("tpu")
    with pytest.raises(ConfigError, match="engine='cpus' is not valid"):
        resolve_engine("cpus")
