"""The one place that decides where model work runs (cpu or gpu)."""

from __future__ import annotations

import logging

from biogen.errors import ConfigError

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "gpu")  # "cuda" is read as "gpu" everywhere


def _word(device: str) -> str:
    device = str(device)
    if device == "cuda":
        return "gpu"
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is not valid; choose one of {', '.join(DEVICES)} (cuda = gpu)")
    return device


def resolve_accelerator(device: str) -> str:
    """``auto`` -> ``gpu`` when torch sees a CUDA device, else ``cpu`` (logged);
    ``gpu`` (or ``cuda``) without CUDA is refused with the fix."""
    device = _word(device)
    if device == "cpu":
        return "cpu"
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "gpu" and not has_cuda:
        raise ConfigError("device=gpu but torch sees no CUDA device (CPU build of torch, or no GPU); "
                          "use device=cpu or install a CUDA build of torch")
    choice = "gpu" if has_cuda else "cpu"
    if device == "auto":
        log.info("device=auto: %s (%s)", choice,
                 torch.cuda.get_device_name(0) if has_cuda else "torch sees no CUDA device")
    return choice


def cluster_accelerator(device: str) -> str:
    """``gpu`` or ``cpu`` for work that runs on the nodes of a Ray cluster, decided by the
    cluster's GPUs, not the driver's (a login or head node often has none). Call it inside
    a Ray session; ``gpu`` on a cluster without GPUs is refused with the fix, ``auto`` falls
    back to the CPU (logged). Without a Ray session (or without Ray) it is ``resolve_accelerator``."""
    device = _word(device)
    if device == "cpu":
        return "cpu"
    try:
        import ray
    except ImportError:
        return resolve_accelerator(device)
    if not ray.is_initialized():
        return resolve_accelerator(device)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if device == "gpu" and gpus <= 0:
        raise ConfigError("device=gpu but no node of the Ray cluster has a GPU (the Ray nodes were started "
                          "without GPUs, or CUDA_VISIBLE_DEVICES hides them); use device=auto (falls back to "
                          "the CPU) or device=cpu, or start the Ray workers on GPU nodes with --num-gpus")
    choice = "gpu" if gpus > 0 else "cpu"
    if device == "auto":
        log.info("device=auto: %s (%g GPU(s) in the Ray cluster)", choice, gpus)
    return choice


def torch_device(device: str, cluster: bool = False) -> str:
    """``cuda`` or ``cpu`` for a job's torch workers from device=auto|cpu|gpu (``cuda`` is read
    as ``gpu``): by the Ray cluster's GPUs when the workers run on a cluster (call it inside
    the session), else by what torch sees on this machine."""
    choice = cluster_accelerator(device) if cluster else resolve_accelerator(device)
    return "cuda" if choice == "gpu" else "cpu"
