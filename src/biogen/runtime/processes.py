"""Shards on a pool of local processes, without Ray (``runtime.mode=processes``).

For one machine where Ray is not installed or not wanted (an air-gapped GPU node that
was given a small offline bundle, a batch job that has a node to itself): the same
ledger, resume and progress bar as the Ray runtime, on ``workers`` processes of this
machine. Processes are *spawned* (a fresh interpreter each: safe beside the driver's
threads and CUDA context). A worker that keeps state (a model, a device-resident
index) is built once per process and runs every shard that process gets.

As under Ray with ``num_cpus=1``, each process gets ``OMP_NUM_THREADS=1`` unless the
caller set it, so that N processes do not each start a thread per core.

What Ray adds and this mode does not: other nodes, and retries of shards whose worker
died. A process that dies (killed, out of memory) fails the job; finished shards stay in
the ledger and a rerun of the same command resumes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger(__name__)
THREAD_ENV = {"OMP_NUM_THREADS": "1"}

_WORKER = None  # this process's worker object (actor-style jobs)
_WORKER_ERROR = "the worker was never initialized"


def _init_process(env: dict[str, str], payload: bytes | None) -> None:
    """Set the thread environment, then (actor-style jobs) build the worker. The worker's
    class and arguments arrive pickled, so that their imports happen after the environment
    is set. A constructor's error is kept and raised by every shard (``WorkerInitError``)."""
    global _WORKER, _WORKER_ERROR
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if payload is None:
        return
    try:
        worker_cls, args = pickle.loads(payload)
        _WORKER = worker_cls(*args)
    except Exception as exc:
        log.error("the worker could not start", exc_info=True)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        _WORKER_ERROR = f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _run_worker(*args):
    from biogen.runtime.ray_runtime import WorkerInitError

    if _WORKER is None:
        raise WorkerInitError(_WORKER_ERROR)
    return _WORKER.run(*args)


def stream_in_processes(fn: Callable | None, shards: Iterable[tuple[str, tuple]], *, slots: int,
                        worker: tuple[type, tuple] | None = None, **loop) -> Iterator[tuple[str, object]]:
    """Run each shard on a pool of ``slots`` processes; yield ``(key, value)`` as each finishes.

    ``fn(*args)`` for task-style jobs, or ``worker=(cls, args)`` for actor-style ones
    (``cls(*args).run(*shard args)`` in each process). At most ``2 * slots`` shards are in
    flight, so the shard list is streamed. ``loop``: ``ledger``, ``phase``, ``error`` of
    the runtime's one loop (``ray_runtime._stream``). The first shard that raises fails the
    job; it, or closing the iterator, cancels the shards not yet started.
    """
    from biogen.runtime.ray_runtime import FUTURES, _stream

    env = {k: v for k, v in THREAD_ENV.items() if k not in os.environ}
    payload = pickle.dumps(worker) if worker is not None else None
    call = _run_worker if worker is not None else fn
    if loop.get("ledger") is not None:  # the outputs are hashed in the process that wrote them
        from biogen.runtime.ledger import HashingCall

        call = HashingCall(call, loop["ledger"].root)
    pool = ProcessPoolExecutor(max(1, slots), mp_context=mp.get_context("spawn"), initializer=_init_process,
                               initargs=(env, payload))
    try:
        yield from _stream(lambda args: (pool.submit(call, *args), None), shards, handles=FUTURES,
                           capacity=2 * max(1, slots), **loop)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
