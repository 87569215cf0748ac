"""The one place that decides where work runs: ``device=auto|cpu|cuda`` for model work
(torch), ``engine=auto|cpu|cuda`` for similarity search (CuPy), the trainer's accelerator.

Every job, CLI and Python entry point passes the user's word through here:

- ``resolve_device("auto")`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"`` (logged);
  ``"cuda"`` without a GPU is refused with the fix; ``"cuda:N"`` names one GPU.
- ``cluster_device(...)`` decides by the GPUs of the Ray cluster the work will run on
  (a login or head node often has none).
- ``resolve_engine(...)`` decides the similarity engine by CuPy and a visible device.

``gpu`` is the old spelling of ``cuda``: still accepted, with a deprecation message once.
"""

from __future__ import annotations

import logging

from biogen.errors import ConfigError

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("auto", "cpu", "cuda")
OLD_SPELLINGS = {"gpu": "cuda"}
_warned: set[str] = set()


def device_word(device: object, key: str = "device") -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` from what the user wrote (``gpu`` accepted,
    with a deprecation message once per spelling); anything else is refused with the choices."""
    word = str(device).strip().lower()
    if word in OLD_SPELLINGS:
        new = OLD_SPELLINGS[word]
        if word not in _warned:
            _warned.add(word)
            log.warning("%s=%s is deprecated: write %s=%s (same meaning)", key, word, key, new)
        word = new
    if word in DEVICES or (word.startswith("cuda:") and word[5:].isdigit()):
        return word
    raise ConfigError(f"{key}={device!r} is not valid; choose one of {', '.join(DEVICES)} (or cuda:N for one GPU)")


def resolve_device(device: object = "auto", key: str = "device") -> str:
    """``cpu`` | ``cuda`` | ``cuda:N`` for work in this process, by what torch sees here
    (``key``: the setting's name in messages)."""
    word = device_word(device, key)
    if word == "cpu":
        return "cpu"
    import torch

    has_cuda = torch.cuda.is_available()
    if word == "auto":
        choice = "cuda" if has_cuda else "cpu"
        log.info("%s=auto: %s (%s)", key, choice,
                 torch.cuda.get_device_name(0) if has_cuda else "torch sees no CUDA device")
        return choice
    if not has_cuda:
        raise ConfigError(f"{key}={device} but torch {torch.__version__} sees no CUDA device (a CPU build of torch, "
                          f"or no GPU); use {key}=cpu, or install a CUDA build of torch on a machine with a GPU")
    if ":" in word and int(word[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={word}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return word


def cluster_device(device: object = "auto") -> str:
    """``cpu`` | ``cuda`` for work that runs on the nodes of a Ray cluster, decided by the
    cluster's GPUs, not the driver's. Call it inside a Ray session; ``cuda`` on a cluster
    without GPUs is refused with the fix, ``auto`` falls back to the CPU (logged). Without a
    Ray session (or without Ray) it is ``resolve_device``."""
    word = device_word(device)
    if word == "cpu":
        return "cpu"
    try:
        import ray
    except ImportError:
        return resolve_device(word)
    if not ray.is_initialized():
        return resolve_device(word)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if word != "auto" and gpus <= 0:
        raise ConfigError(f"device={word} but no node of the Ray cluster has a GPU (the Ray nodes were started "
                          "without GPUs, or CUDA_VISIBLE_DEVICES hides them); use device=auto (falls back to "
                          "the CPU) or device=cpu, or start the Ray workers on GPU nodes with --num-gpus")
    choice = "cuda" if gpus > 0 else "cpu"
    if word == "auto":
        log.info("device=auto: %s (%g GPU(s) in the Ray cluster)", choice, gpus)
    return choice


def resolve_engine(engine: object = "auto") -> str:
    """``cpu`` | ``cuda`` similarity engine; ``auto`` picks cuda when CuPy and a GPU are present (logged)."""
    word = device_word(engine, "engine")
    if word.startswith("cuda:"):
        raise ConfigError(f"engine={engine}: choose the GPU with the index's device argument; engine is "
                          f"one of {', '.join(ENGINES)}")
    if word != "auto":
        return word
    from biogen.search.cuda import cuda_available

    ok, why = cuda_available()
    choice = "cuda" if ok else "cpu"
    log.info("engine=auto: using %s (%s)", choice, "CuPy and a CUDA device found" if ok else why)
    return choice


def lightning_accelerator(device: str) -> str:
    """Lightning's name for a resolved device (it says ``gpu`` for CUDA)."""
    return "gpu" if device.startswith("cuda") else "cpu"
