"""From a composed Hydra config to the typed objects the jobs take: one route for every CLI job.

Every pluggable role is a config node with a ``_target_`` (a typed dataclass or a factory),
made by Hydra's ``instantiate`` through :func:`from_config`: the runtime, the reader, the
standardizer, the featurizer, the screen's library source, target, stages, fusion and
selection, the training data, the model and the trainer. A config group swaps the class;
an override sets its fields (``runtime=inline``, ``reader.format=csv``).
"""

from __future__ import annotations

import dataclasses
import inspect

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from biogen.errors import BiogenError, ConfigError


def from_config(node: DictConfig, key: str, **kwargs):
    """The object ``node`` describes (``instantiate`` of its ``_target_``, containers as plain
    Python); ``kwargs`` are passed to the target too. A node without ``_target_``, unknown or
    missing fields fail naming ``key`` and the fields the target takes."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"config node {key} has no _target_ (the class it configures); choose it from its "
                          f"config group (e.g. {key}=<name>; see --help)")
    valid = _fields(str(node._target_))
    unknown = [] if valid is None else sorted(str(k) for k in node if k != "_target_" and k not in valid
                                               and k not in kwargs)
    if unknown:
        raise ConfigError(f"unknown {key} key(s) {unknown}; valid keys: {', '.join(valid)}")
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, BiogenError):  # the target's own validation: its message names the fix
            raise cause from None
        data = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items() if k != "_target_"}
        raise ConfigError(f"invalid {key} settings {data} ({cause or exc})"
                          + (f"; valid keys: {', '.join(valid)}" if valid else "")) from None


def _fields(target: str) -> list[str] | None:
    """The keys a target takes: a dataclass's fields, else its signature's named parameters."""
    try:
        obj = get_object(target)
    except Exception as exc:  # an import error or a typo in _target_
        raise ConfigError(f"_target_ {target!r} cannot be loaded ({exc})") from None
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    params = inspect.signature(obj).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None  # takes any key: the target checks them itself
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def inputs(value) -> list[str] | str:
    """An ``input=`` value: a list of paths, or one path or glob."""
    return list(value) if OmegaConf.is_list(value) else str(value)
