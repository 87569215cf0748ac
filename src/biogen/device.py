"""The one place that decides where model work runs (cpu or gpu)."""

from __future__ import annotations

import logging

from biogen.errors import ConfigError

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "gpu")


def resolve_accelerator(device: str) -> str:
    """``auto`` -> ``gpu`` when torch sees a CUDA device, else ``cpu`` (logged);
    ``gpu`` without CUDA is refused with the fix."""
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is not valid; choose one of {', '.join(DEVICES)}")
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
