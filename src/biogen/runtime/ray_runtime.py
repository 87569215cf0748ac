"""Ray start/connect and the sharded-job runner every biogen job uses.

Local Ray by default (dashboard off, usage stats off; Ray's token authentication is left
as Ray configures it); ``mode=ray_cluster`` connects to a running cluster
(``address=auto`` or ``host:port``). ``mode=processes`` runs shards on a pool of local
processes without Ray (one machine; ``biogen.runtime.processes``). ``mode=inline`` runs
shards in this process without Ray, for debugging and profiling only.

Every mode runs shards through one loop (``_stream``): ``stream_shards`` yields each
shard's value as it finishes and stops early, cancelling the rest, when closed (a search
that wants only the first hits); ``run_shards`` and ``run_shards_on_actors`` run a whole
job with a resume ledger.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from biogen.errors import BiogenError, ConfigError
from biogen.runtime.ledger import HashingCall, Ledger, is_storage_error, storage_error

log = logging.getLogger(__name__)
MODES = ("local", "ray_cluster", "processes", "inline")
NO_RAY = ("processes", "inline")  # modes that never import Ray


@dataclass(frozen=True)
class RuntimeSpec:
    """Where shards run (config group ``runtime``).

    workers: CPUs of the local Ray instance, or processes of ``mode=processes`` (``None``:
    all cores); for a cluster, the number of shards kept in flight per available CPU is
    taken from the cluster.
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
        "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN) in this shell too"
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


_SHUTDOWN: threading.Thread | None = None
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _TokenAuthNotice(logging.Filter):
    """Ray warns "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled
    to opt out" on every local start: biogen keeps token auth on and manages the token, so
    the notice only worries users. It is logged once at debug level instead; Ray's other
    authentication messages (a disabled cluster, a missing token) still reach the terminal."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Token authentication is enabled"):
            if not _TokenAuthNotice.seen:
                _TokenAuthNotice.seen = True
                log.debug("Ray token authentication is on (biogen leaves Ray's default)")
            return False
        return True


def _quiet_token_notice() -> None:
    logger = logging.getLogger(RAY_AUTH_LOGGER)
    if not any(isinstance(f, _TokenAuthNotice) for f in logger.filters):
        logger.addFilter(_TokenAuthNotice())


def wait_for_ray_shutdown() -> None:
    """Wait until a Ray instance that ``ray_session(..., shutdown_in_background=True)`` is
    stopping has stopped (a no-op when none is)."""
    global _SHUTDOWN
    if _SHUTDOWN is not None:
        _SHUTDOWN.join()
        _SHUTDOWN = None


@contextmanager
def ray_session(spec: RuntimeSpec, *, shutdown_in_background: bool = False) -> Iterator[int]:
    """Start or join Ray for the duration of a job; yields the number of parallel slots.

    A Ray session already initialized by the caller (a notebook, the test suite) is reused
    and left running. ``shutdown_in_background``: a Ray instance this call started is
    stopped in a thread (about 1.5 s locally) while the caller goes on with work that no
    longer needs Ray; the caller must call ``wait_for_ray_shutdown()`` before it returns.
    """
    global _SHUTDOWN
    if spec.mode == "inline":
        yield 1
        return
    if spec.mode == "processes":
        yield spec.workers or len(os.sched_getaffinity(0))
        return
    import ray

    wait_for_ray_shutdown()  # an earlier job's instance may still be stopping
    owned = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        _quiet_token_notice()
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
        if owned and shutdown_in_background:
            # not a daemon: interpreter exit waits for it (before Ray's own atexit shutdown)
            _SHUTDOWN = threading.Thread(target=ray.shutdown, name="ray-shutdown")
            _SHUTDOWN.start()
        elif owned:
            ray.shutdown()


def _shard_error(key: str, exc: Exception) -> BiogenError:
    if getattr(exc, "actor_init_failed", False):  # the worker's constructor raised: its last traceback line
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return BiogenError(f"the workers could not start (shard {key}): {lines[-1] if lines else exc}")
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the task's own error
    if isinstance(cause, WorkerInitError):  # the worker's constructor raised inside its host actor
        return BiogenError(f"the workers could not start (shard {key}): {cause}")
    if is_storage_error(cause):
        err = storage_error(Path(cause.filename or "the output directory"), cause)
        return type(err)(f"shard {key}: {err}")
    return BiogenError(f"shard {key} failed: {type(cause).__name__}: {cause}. Finished shards are "
                       "kept; rerun the same command to resume.")


def _lost(exc: Exception) -> bool:
    """A failure of the machinery (a worker process or node died, an object was lost), not of
    the shard's own code: worth running the shard again elsewhere."""
    from ray.exceptions import (
        NodeDiedError, ObjectLostError, OutOfMemoryError, RayActorError, WorkerCrashedError,
    )

    if isinstance(exc, RayActorError):
        return not exc.actor_init_failed  # a constructor that fails fails again: not retried
    return isinstance(exc, (WorkerCrashedError, NodeDiedError, ObjectLostError, OutOfMemoryError))


def _why(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


@dataclass(frozen=True)
class Handles:
    """How a runner waits on, reads and cancels the shards it submitted: Ray object refs
    (``ray_handles()``) or ``concurrent.futures`` futures (``FUTURES``, runtime=processes)."""

    ready: Callable[[list], list]  # handles in flight -> those finished (at least one; blocks)
    get: Callable  # handle -> the shard's return value (raises the shard's error)
    cancel: Callable  # handle -> None
    lost: Callable[[Exception], bool]  # was the worker lost (worth a retry), not the shard's code?


def ray_handles() -> Handles:
    import ray

    return Handles(lambda p: ray.wait(p, num_returns=1, timeout=None)[0], ray.get, ray.cancel, _lost)


def _future_result(fut):
    return fut.result()


def _future_cancel(fut) -> None:
    fut.cancel()


def _ready_futures(pending: list) -> list:
    from concurrent.futures import FIRST_COMPLETED, wait

    return list(wait(pending, return_when=FIRST_COMPLETED)[0])


FUTURES = Handles(_ready_futures, _future_result, _future_cancel, lambda exc: False)


def _run_now(fn: Callable, args: tuple) -> Future:
    """Run ``fn(*args)`` here and now; its value or error in a finished future (runtime=inline:
    the same loop as the other modes then reads it through ``FUTURES``)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as exc:
        fut.set_exception(exc)
    return fut


def _stream(submit: Callable, shards: Iterable[tuple[str, tuple]], *, handles: Handles, capacity: int,
            ledger: Ledger | None = None, phase: str = "", error: Callable[[str, Exception], Exception] = _shard_error,
            release: Callable = lambda token: None, retry: Callable | None = None, max_tries: int = 3
            ) -> Iterator[tuple[str, object]]:
    """The one loop of every runner: submit ``(key, args)`` shards in order with at most
    ``capacity`` in flight; yield ``(key, value)`` as each finishes (completion order).

    ``submit(args) -> (handle, token)``; ``release(token)`` once the shard's value is read.
    With a ``ledger``, a shard's value is ``(output relpaths, result)``: each is recorded
    and ``(key, result)`` yielded; a shard the ledger holds is yielded from it, not run.
    A shard whose worker or node was lost (``handles.lost``) is resubmitted through
    ``retry(token, args, exc) -> (handle, token)`` up to ``max_tries`` times (logged, and a
    ``retry`` event in the ledger); any other error raises ``error(key, exc)`` (a ``failed``
    event). An error, or closing the generator (``contextlib.closing``: how a consumer
    stops early), cancels the shards in flight and leaves the rest unsubmitted.
    """
    pending: dict = {}
    queue = iter(shards)
    try:
        while True:
            while len(pending) < capacity:
                item = next(queue, None)
                if item is None:
                    break
                key, args = item
                prev = ledger.done(key) if ledger is not None else None
                if prev is not None:
                    yield key, prev
                    continue
                handle, token = submit(args)
                pending[handle] = (key, token, args, 0)
            if not pending:
                return
            for handle in handles.ready(list(pending)):
                key, token, args, tries = pending.pop(handle)
                try:
                    value = handles.get(handle)
                except Exception as exc:
                    if retry is not None and tries < max_tries and handles.lost(exc):
                        log.warning("shard %s: %s; running it again", key, _why(exc))
                        if ledger is not None:
                            ledger.event("retry", key=key, phase=phase, error=_why(exc), attempt=tries + 1)
                        try:
                            handle, token = retry(token, args, exc)
                        except BiogenError as err:  # nowhere left to run it (every worker lost)
                            if ledger is not None:
                                ledger.event("failed", key=key, phase=phase, error=str(err))
                            raise
                        pending[handle] = (key, token, args, tries + 1)
                        continue
                    err = error(key, exc)
                    if ledger is not None:
                        ledger.event("failed", key=key, phase=phase, error=_why(exc) if err is exc else str(err))
                    if err is exc:
                        raise
                    raise err from exc
                release(token)
                if ledger is not None:
                    outputs, value = value
                    ledger.record(key, outputs, value, phase=phase)
                yield key, value
    finally:
        for handle in pending:
            handles.cancel(handle)


def _inline_error(error: Callable[[str, Exception], Exception]) -> Callable[[str, Exception], Exception]:
    """runtime=inline raises a shard's own error as it is (its traceback for debugging); a
    full disk gets the same message as in the other modes."""
    return lambda key, exc: (error(key, exc) if is_storage_error(exc)
                             else exc)


def stream_shards(
    fn: Callable,
    shards: Iterable[tuple[str, tuple]],
    *,
    spec: RuntimeSpec,
    slots: int,
    total: int | None = None,
    ledger: Ledger | None = None,
    phase: str = "",
    error: Callable[[str, Exception], Exception] = _shard_error,
    max_tries: int = 3,
) -> Iterator[tuple[str, object]]:
    """Run ``fn(*args)`` for each ``(key, args)`` where ``spec`` says; yield ``(key, value)``
    as each shard finishes (completion order; one after another, lazily, in runtime=inline).

    At most ``2 * slots`` shards are in flight (``slots`` from ``ray_session``), so
    ``shards`` is streamed. To stop early, close the iterator (``with
    contextlib.closing(stream_shards(...)) as results:``): shards in flight are cancelled
    and the rest never start. Call it inside ``ray_session(spec)``.

    ledger: record each finished shard (``fn`` then returns ``(output relpaths, result)``
        and ``(key, result)`` is yielded; shards already done are yielded from the ledger).
    error: the exception raised when shard ``key`` fails with ``exc`` (default: names the
        shard and says how to resume); runtime=inline raises the shard's own error.
    max_tries: runs of a shard again after its Ray worker or node was lost (``processes``
        and ``inline`` do not retry).
    """
    kw = dict(ledger=ledger, phase=phase, error=error)
    if spec.mode == "inline":
        return _stream(lambda args: (_run_now(fn, args), None), shards, handles=FUTURES, capacity=1,
                       **{**kw, "error": _inline_error(error)})
    if spec.mode == "processes":
        from biogen.runtime.processes import stream_in_processes

        return stream_in_processes(fn, shards, slots=_pool_size(slots, total), **kw)
    import ray

    # Ray's own retries are off: the loop retries a shard whose worker or node was lost
    # itself, so that the loss is logged (and recorded in the ledger for `biogen status`)
    remote = ray.remote(num_cpus=1, max_retries=0)(_call)
    call = fn if ledger is None else HashingCall(fn, ledger.root)  # outputs hashed in the task
    return _stream(lambda args: (remote.remote(call, *args), None), shards, handles=ray_handles(),
                   capacity=2 * slots, retry=lambda token, args, exc: (remote.remote(call, *args), None),
                   max_tries=max_tries, **kw)


def _call(fn: Callable, *args):
    """A Ray task that runs ``fn(*args)`` (``fn`` a function or a picklable callable)."""
    return fn(*args)


def _collect(results: Iterator[tuple[str, object]], bar, reduce=None) -> dict[str, dict]:
    """Every ``(key, result)`` of a stream, in a dict; the bar counts them.

    With ``reduce``, each pair goes to ``reduce(key, result)`` as it arrives and nothing
    is kept (the dict returned is empty): a driver folding results keeps no per-shard list.
    """
    out: dict[str, dict] = {}
    for key, result in results:
        if reduce is None:
            out[key] = result
        else:
            reduce(key, result)
        bar.update(1)
    return out


@contextmanager
def _phase(ledger: Ledger, desc: str, total: int | None, spec: RuntimeSpec):
    """The progress bar of one phase, and its ``plan`` event in the ledger."""
    ledger.event("plan", phase=desc, total=total)
    with tqdm(total=total, desc=desc, unit="shard", disable=not spec.progress, leave=True,
              dynamic_ncols=True) as bar:
        yield bar


def _pool_size(slots: int, total: int | None) -> int:
    """Processes worth starting: no more than there are shards (when known)."""
    return max(1, min(slots, total) if total else slots)


def run_shards(
    fn: Callable[..., tuple[list[str], dict]],
    shards: Iterable[tuple[str, tuple]],
    *,
    ledger: Ledger,
    spec: RuntimeSpec,
    slots: int,
    desc: str,
    total: int | None = None,
    reduce: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Run ``fn(*args) -> (output relpaths, result)`` for each ``(key, args)`` not yet done.

    Shards are streamed: at most ``2 * slots`` are in flight, so an input larger than
    memory is never materialized. Each finished shard is recorded in the ledger at once.
    Returns ``{key: result}`` for all shards, finished now or before; with ``reduce``,
    each ``(key, result)`` is handed to it instead and an empty dict is returned.
    """
    with _phase(ledger, desc, total, spec) as bar:
        return _collect(stream_shards(fn, shards, spec=spec, slots=slots, total=total, ledger=ledger, phase=desc),
                        bar, reduce)


def run_shards_on_actors(
    worker_cls: type,
    worker_args: tuple,
    shards: Iterable[tuple[str, tuple]],
    *,
    ledger: Ledger,
    spec: RuntimeSpec,
    slots: int,
    desc: str,
    total: int | None = None,
    num_gpus: float = 0.0,
    actors: ActorHosts | None = None,
    reduce: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Like ``run_shards`` (``reduce`` too), on ``slots`` actors of ``worker_cls(*worker_args)`` that keep
    their state (a model, a device-resident index) across shards; each actor's
    ``run(*args) -> (output relpaths, result)`` handles one shard at a time.

    ``actors``: host actors started earlier with ``start_actors`` (their processes and
    imports ready while the driver prepared ``worker_args``); else they are started here.

    Actors take 1 CPU and ``num_gpus`` GPUs each (a fraction when there are more actors
    than GPUs, so that they share them instead of waiting); when an actor dies (its process or node
    is lost) a new one replaces it if the cluster has room (else the job goes on with the
    actors left) and its shards run again (up to three times each); an error raised by the
    shard's own code fails the job (finished shards stay in the ledger).
    Inline mode builds one worker in this process; ``processes`` mode one per process.
    """
    with _phase(ledger, desc, total, spec) as bar:
        if spec.mode == "inline":
            worker = worker_cls(*worker_args)
            return _collect(stream_shards(worker.run, shards, spec=spec, slots=1, ledger=ledger, phase=desc), bar,
                            reduce)
        if spec.mode == "processes":
            from biogen.runtime.processes import stream_in_processes

            return _collect(stream_in_processes(None, shards, slots=_pool_size(slots, total), ledger=ledger,
                                                phase=desc, worker=(worker_cls, worker_args)), bar, reduce)
        import ray

        hosts = actors if actors is not None else start_actors(spec, slots, num_gpus=num_gpus)
        shared = [ray.put(a) for a in worker_args]  # one copy in the object store for all actors
        actors = list(hosts.handles)

        def configure(actor):
            actor.init.remote(worker_cls, *shared)  # runs before any shard sent to it (actor order)
            return actor

        for a in actors:
            configure(a)
        load = [0] * len(actors)  # shards queued or running per actor
        generation = [0] * len(actors)  # bumped when an actor is replaced

        root = str(ledger.root)  # the actors hash the outputs they wrote (ledger.OutputRecord)

        def submit(args):
            # two shards per actor in flight: the next one is queued on the actor while the
            # driver records the last in the ledger (an fsync), so actors never wait on it
            a = min(range(len(actors)), key=load.__getitem__)
            load[a] += 1
            return actors[a].run_recorded.remote(root, *args), (a, generation[a])

        def release(token):
            load[token[0]] -= 1

        dead = [False] * len(actors)  # slots whose actor was lost and could not be replaced

        def can_place(num_gpus: float, wait_s: float = 10.0) -> bool:
            """Room for one more actor? A lost actor's CPU/GPU comes back a moment after its
            death on a live node, never when its node is gone: wait a little, then decide."""
            deadline = time.monotonic() + wait_s
            while True:
                free = ray.available_resources()
                if free.get("CPU", 0) >= 1 and free.get("GPU", 0) >= num_gpus:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.5)

        def retry(token, args, exc):
            a, gen = token
            if gen == generation[a]:  # the first of this actor's lost shards decides its slot
                generation[a] += 1
                try:
                    ray.kill(actors[a])  # unreachable but maybe alive: free what it holds
                except Exception:
                    pass
                if can_place(hosts.num_gpus):
                    actors[a] = configure(hosts.new())
                else:  # its node is gone and the others are full: waiting would hang the job
                    dead[a] = True
                    load[a] = 1 << 30  # never chosen again
                    log.warning("worker slot %d lost with its node; going on with %d worker(s)", a,
                                dead.count(False))
            if dead[a]:
                live = [i for i in range(len(actors)) if not dead[i]]
                if not live:
                    raise BiogenError("every worker of this job was lost (nodes died); finished shards are "
                                      "kept: rerun the same command when the cluster has nodes again")
                a = min(live, key=load.__getitem__)
                load[a] += 1
            return actors[a].run_recorded.remote(root, *args), (a, generation[a])

        try:
            return _collect(_stream(submit, shards, handles=ray_handles(), capacity=2 * len(actors), ledger=ledger,
                                    phase=desc, release=release, retry=retry), bar, reduce)
        finally:
            for a in actors:
                ray.kill(a)


def _import_modules(modules: list[str]) -> None:
    """Import each module; ``"module:function"`` also calls ``function()`` (a warm-up: load
    JIT-compiled kernels, say). A warm-up that fails is logged, not raised: it only saves time."""
    import importlib

    for m in modules:
        name, _, fn = m.partition(":")
        mod = importlib.import_module(name)
        if fn:
            try:
                getattr(mod, fn)()
            except Exception:
                log.warning("warm-up %s failed", m, exc_info=True)


class WorkerInitError(BiogenError):
    """A worker's constructor raised inside its host actor (not retried: it would raise again)."""


class _Host:
    """A Ray actor that imports ``modules`` when it starts and later holds one worker object.

    Starting these before a job's set-up is finished takes the process start and the heavy
    imports (torch: seconds) off the critical path. Ray does not hand idle task workers to
    new actors, so warming task workers up would not help them.
    """

    def __init__(self, modules: list[str]):
        _import_modules(modules)
        self._worker = None
        self._error = "the worker was never initialized"

    def init(self, worker_cls: type, *args) -> None:
        """Build the worker. Its error is not raised here (nobody waits on this call, and Ray
        would print it as unhandled) but by every ``run``, which the driver does wait on."""
        try:
            self._worker = worker_cls(*args)
        except Exception as exc:
            log.error("%s could not start", worker_cls.__name__, exc_info=True)  # the traceback, in the worker log
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            self._error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"

    def run(self, *args):
        if self._worker is None:
            raise WorkerInitError(self._error)
        return self._worker.run(*args)

    def run_recorded(self, root: str, *args):
        """``run``, with the outputs (relative to ``root``) hashed here: ``(OutputRecord, result)``."""
        return HashingCall(self.run, root)(*args)


@dataclass
class ActorHosts:
    """Host actors for ``run_shards_on_actors`` and how to start one more like them."""

    cls: object  # the Ray actor class of _Host with these resources
    modules: list[str]
    num_gpus: float
    handles: list = field(default_factory=list)

    def new(self):
        return self.cls.remote(self.modules)


def start_actors(spec: RuntimeSpec, slots: int, *, modules: Iterable[str] = (), num_gpus: float = 0.0
                 ) -> ActorHosts | None:
    """Start ``slots`` host actors now (1 CPU and ``num_gpus`` GPUs each; a fraction when
    there are more actors than GPUs, so that they share them); each imports ``modules``
    in the background (``"module:function"`` also calls that warm-up function). Pass the
    result to ``run_shards_on_actors(..., actors=)``. None in the modes without Ray."""
    if spec.mode in NO_RAY:
        return None
    import ray

    n = max(1, slots)
    if num_gpus > 0:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus <= 0:
            raise BiogenError("this job asks for GPUs but the Ray cluster has none; use device=cpu "
                              "or start Ray workers on GPU nodes")
        num_gpus = min(num_gpus, gpus / n)
    hosts = ActorHosts(ray.remote(num_cpus=1, num_gpus=num_gpus)(_Host), list(modules), num_gpus)
    hosts.handles = [hosts.new() for _ in range(n)]
    return hosts
