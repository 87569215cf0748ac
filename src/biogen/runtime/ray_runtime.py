"""Ray start/connect and the sharded-job runner every biogen job uses.

Local Ray by default (dashboard off, usage stats off; Ray's token authentication is left
as Ray configures it); ``mode=ray_cluster`` connects to a running cluster
(``address=auto`` or ``host:port``). ``mode=inline`` runs shards in this process without
Ray, for debugging and profiling only.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm.auto import tqdm

from biogen.errors import BiogenError, ConfigError
from biogen.runtime.ledger import Ledger

log = logging.getLogger(__name__)
MODES = ("local", "ray_cluster", "inline")


@dataclass(frozen=True)
class RuntimeSpec:
    """Where shards run (config group ``runtime``).

    workers: CPUs of the local Ray instance (``None``: all cores); for a cluster, the
    number of shards kept in flight per available CPU is taken from the cluster.
    """

    mode: str = "local"
    address: str | None = None
    workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"runtime.mode={self.mode!r} is not valid; choose one of {', '.join(MODES)}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"runtime.workers={self.workers} must be >= 1 (or null for all cores)")


def _connect_error(address: str, exc: Exception) -> BiogenError:
    return BiogenError(
        f"could not connect to the Ray cluster at runtime.address={address!r} ({exc}); "
        "start it with `ray start --head` (see slurm/) or use runtime=local. A cluster "
        "with token authentication needs RAY_AUTH_MODE=token and its token "
        "(~/.ray/auth_token or RAY_AUTH_TOKEN) in this shell too"
    )


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable head node: ``ray.init`` itself retries for minutes."""
    if address == "auto" or address.startswith("ray://") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise _connect_error(address, exc) from None


@contextmanager
def ray_session(spec: RuntimeSpec) -> Iterator[int]:
    """Start or join Ray for the duration of a job; yields the number of parallel slots.

    A Ray session already initialized by the caller (a notebook, the test suite) is reused
    and left running.
    """
    if spec.mode == "inline":
        yield 1
        return
    import ray

    owned = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        if spec.mode == "local":
            # address="local": always a fresh instance, never a cluster some other job left running
            ray.init(address="local", num_cpus=spec.workers or len(os.sched_getaffinity(0)), **kwargs)
        else:
            address = spec.address or "auto"
            _probe(address)
            try:
                ray.init(address=address, **kwargs)
            except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError...
                raise _connect_error(address, exc) from exc
        owned = True
    try:
        slots = int(ray.available_resources().get("CPU", 1)) or 1
        if spec.mode == "local" and spec.workers:
            slots = min(slots, spec.workers)
        yield max(slots, 1)
    finally:
        if owned:
            ray.shutdown()


def run_shards(
    fn: Callable[..., tuple[list[str], dict]],
    shards: Iterable[tuple[str, tuple]],
    *,
    ledger: Ledger,
    spec: RuntimeSpec,
    slots: int,
    desc: str,
    total: int | None = None,
) -> dict[str, dict]:
    """Run ``fn(*args) -> (output relpaths, result)`` for each ``(key, args)`` not yet done.

    Shards are streamed: at most ``2 * slots`` are in flight, so an input larger than
    memory is never materialized. Each finished shard is recorded in the ledger at once.
    Returns ``{key: result}`` for all shards, finished now or before.
    """
    results: dict[str, dict] = {}
    bar = tqdm(total=total, desc=desc, unit="shard", disable=not spec.progress, leave=True,
               dynamic_ncols=True)
    try:
        if spec.mode == "inline":
            for key, args in shards:
                prev = ledger.done(key)
                if prev is None:
                    outputs, prev = fn(*args)
                    ledger.record(key, outputs, prev)
                results[key] = prev
                bar.update(1)
            return results

        import ray

        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        pending: dict = {}

        def collect(block: bool) -> None:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
            for ref in ready:
                key = pending.pop(ref)
                try:
                    outputs, result = ray.get(ref)
                except Exception as exc:
                    for other in pending:
                        ray.cancel(other)
                    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the task's own error
                    raise BiogenError(
                        f"shard {key} failed: {type(cause).__name__}: {cause}. Finished shards are "
                        "kept; rerun the same command to resume."
                    ) from exc
                ledger.record(key, outputs, result)
                results[key] = result
                bar.update(1)

        for key, args in shards:
            prev = ledger.done(key)
            if prev is not None:
                results[key] = prev
                bar.update(1)
                continue
            while len(pending) >= 2 * slots:
                collect(block=True)
            pending[remote.remote(*args)] = key
        while pending:
            collect(block=True)
        return results
    finally:
        bar.close()
