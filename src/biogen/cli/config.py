"""From a composed Hydra config to the typed objects the jobs take (one route for every CLI job)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from biogen.errors import ConfigError


def typed(cls, cfg: DictConfig, key: str):
    """``cls(**cfg)`` for a dataclass config node; unknown or missing keys fail naming ``key`` and the valid keys."""
    data = OmegaConf.to_container(cfg, resolve=True)
    try:
        return cls(**data)
    except TypeError as exc:
        valid = ", ".join(cls.__dataclass_fields__)
        raise ConfigError(f"invalid {key} settings {data} ({exc}); valid keys: {valid}") from None


def inputs(value) -> list[str] | str:
    """An ``input=`` value: a list of paths, or one path or glob."""
    return list(value) if OmegaConf.is_list(value) else str(value)
