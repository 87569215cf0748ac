"""The sharded runner and its ledger: resume without repeating or losing a shard."""

import json
from pathlib import Path

import pytest

from biogen.errors import BiogenError, ConfigError, LibraryError
from biogen.runtime import Ledger, RuntimeSpec, ray_session, run_shards, run_shards_on_actors, stream_shards
from biogen.runtime.ray_runtime import start_actors
from biogen.runtime.ledger import process_start as status_process_start
from biogen.runtime.status import format_status, job_status
from tests_support import run_biogen

CALLS = []


def write_square(root: str, i: int):
    CALLS.append(i)
    path = Path(root) / f"out-{i}.txt"
    path.write_text(str(i * i))
    return [path.name], {"value": i * i}


def fail_on_three(root: str, i: int):
    if i == 3:
        raise ValueError("bad shard")
    return write_square(root, i)


def shards(root, n):
    return ((f"s{i}", (str(root), i)) for i in range(n))


def test_inline_resume_skips_done_and_redoes_damaged(tmp_path, inline_rt):
    CALLS.clear()
    led = Ledger(tmp_path / "ledger.jsonl", "job-1")
    res = run_shards(write_square, shards(tmp_path, 5), ledger=led, spec=inline_rt, slots=1, desc="t")
    assert {k: v["value"] for k, v in res.items()} == {f"s{i}": i * i for i in range(5)}
    assert CALLS == [0, 1, 2, 3, 4]
    (tmp_path / "out-2.txt").write_text("tampered")
    (tmp_path / "out-4.txt").unlink()
    CALLS.clear()
    led2 = Ledger(tmp_path / "ledger.jsonl", "job-1")
    res2 = run_shards(write_square, shards(tmp_path, 6), ledger=led2, spec=inline_rt, slots=1, desc="t")
    assert CALLS == [2, 4, 5]
    assert res2["s2"]["value"] == 4 and (tmp_path / "out-2.txt").read_text() == "4"


def test_ledger_of_another_job_is_refused(tmp_path):
    Ledger(tmp_path / "ledger.jsonl", "job-1")
    with pytest.raises(LibraryError, match="interrupted job with other parameters.*delete .* to abandon it"):
        Ledger(tmp_path / "ledger.jsonl", "job-2")


def test_cut_ledger_line_is_ignored(tmp_path, inline_rt):
    led = Ledger(tmp_path / "ledger.jsonl", "j")
    run_shards(write_square, shards(tmp_path, 2), ledger=led, spec=inline_rt, slots=1, desc="t")
    with open(tmp_path / "ledger.jsonl", "a") as fh:
        fh.write('{"key": "s9", "outp')  # a kill in the middle of a write
    assert set(Ledger(tmp_path / "ledger.jsonl", "j").entries) == {"s0", "s1"}


@pytest.mark.ray
def test_ray_runner_two_workers_and_failure_keeps_finished(tmp_path, ray_rt):
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test module: not importable by workers
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    with ray_session(ray_rt) as slots:
        assert slots == 2
        res = run_shards(write_square, shards(tmp_path, 7), ledger=led, spec=ray_rt, slots=slots, desc="t")
        assert sorted(v["value"] for v in res.values()) == [i * i for i in range(7)]
        led_b = Ledger(tmp_path / "b" / "ledger.jsonl", "job")
        with pytest.raises(BiogenError, match="shard s3 failed.*bad shard.*rerun the same command"):
            run_shards(fail_on_three, shards(tmp_path / "b", 6), ledger=led_b, spec=ray_rt, slots=slots, desc="t")
    lines = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert lines[0] == {"job_key": "job"}
    assert sorted(x["key"] for x in lines if "outputs" in x) == [f"s{i}" for i in range(7)]
    assert [x["event"] for x in lines if "event" in x] == ["start", "plan"]
    assert "s3" not in led_b.entries
    failed = [e for e in led_b.events if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["key"] == "s3" and "bad shard" in failed[0]["error"]


class CountingWorker:
    """Keeps state across shards (as a model-holding actor does); dies once on a marked shard."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.loaded = 0
        self.seen = 0

    def run(self, i: int):
        import os

        marker = self.root / "died-once"
        if i == 4 and not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process is lost mid-shard
        self.seen += 1
        path = self.root / f"out-{i}.txt"
        path.write_text(str(i * i))
        return [path.name], {"value": i * i, "worker": id(self), "seen": self.seen, "pid": os.getpid()}


def test_actor_runner_inline_keeps_one_worker(tmp_path, inline_rt):
    (tmp_path / "died-once").write_text("x")  # inline: never kill the test process
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    res = run_shards_on_actors(CountingWorker, (str(tmp_path),), ((f"s{i}", (i,)) for i in range(5)), ledger=led, spec=inline_rt,
                               slots=1, desc="t")
    assert [res[f"s{i}"]["seen"] for i in range(5)] == [1, 2, 3, 4, 5]  # one worker, state kept
    assert len({r["worker"] for r in res.values()}) == 1


@pytest.mark.ray
def test_actor_runner_on_ray_replaces_a_lost_actor(tmp_path, ray_rt):
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    with ray_session(ray_rt) as slots:
        res = run_shards_on_actors(CountingWorker, (str(tmp_path),), ((f"s{i}", (i,)) for i in range(8)),
                                   ledger=led, spec=ray_rt, slots=slots, desc="t")
    assert sorted(v["value"] for v in res.values()) == [i * i for i in range(8)]
    assert (tmp_path / "died-once").exists()  # shard 4 killed its actor once and was retried on a new one
    assert max(v["seen"] for v in res.values()) >= 2  # actors keep their state across shards
    assert len({v["pid"] for v in res.values()}) >= 2
    lines = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert sorted(x["key"] for x in lines if "outputs" in x) == [f"s{i}" for i in range(8)]
    # the lost actor is on record: s4 and the shard queued behind it on the same actor, if any
    retries = [x for x in lines if x.get("event") == "retry"]
    assert "s4" in [r["key"] for r in retries] and len(retries) <= 2
    assert all("ActorDiedError" in r["error"] for r in retries)
    st = job_status(tmp_path / "ledger.jsonl")
    assert st.state == "running" and st.retries == [  # this process is the driver
        {k: r.get(k) for k in ("key", "phase", "error", "attempt", "t")} for r in retries]
    assert "s4" in format_status(st)


class BrokenWorker:
    def __init__(self, root: str):
        raise BiogenError("checkpoint model.ckpt is damaged; retrain it")

    def run(self, i: int):  # pragma: no cover - never reached
        return [], {}


@pytest.mark.ray
def test_actor_runner_constructor_error_is_reported_not_retried(tmp_path, ray_rt):
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    with ray_session(ray_rt) as slots, pytest.raises(BiogenError, match="workers could not start.*damaged; retrain"):
        run_shards_on_actors(BrokenWorker, (str(tmp_path),), ((f"s{i}", (i,)) for i in range(3)),
                             ledger=led, spec=ray_rt, slots=slots, desc="t")


class ImportCheckingWorker:
    """Reports whether its process had imported a module before the worker was built."""

    def __init__(self, module: str):
        import os
        import sys

        import tracemalloc

        self.had, self.pid, self.warmed = module in sys.modules, os.getpid(), tracemalloc.is_tracing()

    def run(self, i: int):
        return [], {"had": self.had, "pid": self.pid, "warmed": self.warmed}


@pytest.mark.ray
def test_actors_started_early_import_modules_and_run_the_shards(tmp_path, ray_rt):
    import sys

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    with ray_session(ray_rt) as slots:
        # a module nothing else imports, and a warm-up call whose effect the worker can see
        hosts = start_actors(ray_rt, slots, modules=["wave", "tracemalloc:start"])
        pids = set(ray.get([h.__ray_call__.remote(lambda self: __import__("os").getpid()) for h in hosts.handles]))
        res = run_shards_on_actors(ImportCheckingWorker, ("wave",), ((f"s{i}", (i,)) for i in range(6)),
                                   ledger=led, spec=ray_rt, slots=slots, desc="t", actors=hosts)
    assert sorted(res) == [f"s{i}" for i in range(6)]
    assert all(r["had"] for r in res.values())  # imported when the host started, before the worker
    assert all(r["warmed"] for r in res.values())  # and "module:function" called the function
    assert {r["pid"] for r in res.values()} <= pids  # the shards ran on the hosts started early


def mark_and_square(root: str, i: int):
    """A shard without a ledger: leaves a marker (so a test sees which shards ran); 3 fails."""
    (Path(root) / f"ran-{i}").write_text("x")
    if i == 3:
        raise ValueError("bad shard")
    return i * i


@pytest.fixture(params=["inline", "processes", pytest.param("ray", marks=pytest.mark.ray)])
def any_rt(request) -> RuntimeSpec:
    """Each runtime mode, on 2 slots (inline: 1)."""
    if request.param == "ray":
        import sys

        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test module: not importable by workers
        return request.getfixturevalue("ray_rt")
    return RuntimeSpec(mode=request.param, workers=2, progress=False)


def test_stream_shards_yields_every_value_and_raises_the_given_error(tmp_path, any_rt):
    ok = [(f"s{i}", (str(tmp_path), i)) for i in (0, 1, 2, 4, 5)]
    with ray_session(any_rt) as slots:
        got = dict(stream_shards(mark_and_square, iter(ok), spec=any_rt, slots=slots))
        assert got == {f"s{i}": i * i for i in (0, 1, 2, 4, 5)}  # no ledger: fn's values as they are
        bad = shards(tmp_path, 6)
        if any_rt.mode == "inline":  # inline raises the shard's own error (its traceback)
            with pytest.raises(ValueError, match="bad shard"):
                list(stream_shards(mark_and_square, bad, spec=any_rt, slots=slots, error=lambda k, e: BiogenError(k)))
        else:
            with pytest.raises(BiogenError, match=r"^custom s3: bad shard$"):
                list(stream_shards(mark_and_square, bad, spec=any_rt, slots=slots,
                                   error=lambda k, e: BiogenError(f"custom {k}: {getattr(e, 'cause', None) or e}")))


def test_closing_a_stream_stops_it_early(tmp_path, any_rt):
    """A consumer that has what it needs closes the stream: the shards in flight are
    cancelled and no other shard is submitted (substructure search's max_hits)."""
    from contextlib import closing

    n = 40
    with ray_session(any_rt) as slots:
        in_flight = 1 if any_rt.mode == "inline" else 2 * slots
        with closing(stream_shards(mark_and_square, ((f"s{i}", (str(tmp_path), i + 10)) for i in range(n)),
                                   spec=any_rt, slots=slots, total=n)) as results:
            key, value = next(results)
    assert value == int(key[1:]) ** 2 + 20 * int(key[1:]) + 100
    ran = list(tmp_path.glob("ran-*"))
    assert 1 <= len(ran) <= in_flight < n
    if any_rt.mode == "inline":  # lazily, one shard at a time
        assert [p.name for p in ran] == ["ran-10"]


def test_runtime_spec_validation():
    with pytest.raises(ConfigError, match="runtime.mode='cluster' is not valid; choose one of local, ray_cluster, processes, inline"):
        RuntimeSpec(mode="cluster")
    with pytest.raises(ConfigError, match="runtime.workers=0"):
        RuntimeSpec(workers=0)


def test_cluster_connect_failure_is_clear():
    from biogen.runtime.ray_runtime import _probe

    with pytest.raises(BiogenError, match="could not connect to the Ray cluster at runtime.address='127.0.0.1:1'"):
        _probe("127.0.0.1:1")


def test_status_phases_failures_and_states(tmp_path, inline_rt, monkeypatch):
    """biogen status reads the ledger: done/total and rows per phase, throughput, the failed
    shard with its error, and the state: running (driver alive), failed, stopped, complete."""
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    run_shards(write_square, shards(tmp_path, 3), ledger=led, spec=inline_rt, slots=1, desc="phase one", total=3)
    two = [(f"t{i}", (str(tmp_path), i)) for i in range(6)]
    with pytest.raises(ValueError, match="bad shard"):
        run_shards(fail_on_three, two, ledger=led, spec=inline_rt, slots=1, desc="phase two", total=6)
    st = job_status(tmp_path / "ledger.jsonl")
    assert [(p.name, p.done, p.total) for p in st.phases] == [("phase one", 3, 3), ("phase two", 3, 6)]
    assert st.state == "running" and st.exit_code == 3  # this test process is the driver, alive
    assert [f["key"] for f in st.failed] == ["t3"] and "bad shard" in st.failed[0]["error"]
    # the driver gone: failed (exit 1), with the command to resume
    import biogen.runtime.status as status

    monkeypatch.setattr(status, "_driver_alive", lambda *a: False)
    st = job_status(tmp_path / "ledger.jsonl")
    assert (st.state, st.exit_code) == ("failed", 1)
    text = format_status(st)
    assert "FAILED" in text and "t3  ValueError: bad shard" in text and "rerun the same command" in text
    # rerun with the shard fixed: a second driver session resumes and completes
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    run_shards(write_square, two, ledger=led, spec=inline_rt, slots=1, desc="phase two", total=6)
    st = job_status(tmp_path / "ledger.jsonl")
    assert (st.state, st.sessions, st.resumed_shards, st.failed) == ("stopped", 2, 6, [])
    assert st.exit_code == 4 and st.phases[1].done == 6
    led.complete()
    assert job_status(tmp_path / "ledger.jsonl").exit_code == 0


def test_status_of_a_running_job_has_throughput_and_eta(tmp_path, inline_rt):
    import time as _time

    led = Ledger(tmp_path / "ledger.jsonl", "job")

    def slow(root, i):
        _time.sleep(0.05)
        return [], {"rows": 100}

    run_shards(slow, shards(tmp_path, 4), ledger=led, spec=inline_rt, slots=1, desc="embed", total=10)
    st = job_status(tmp_path / "ledger.jsonl")
    ph = st.phases[0]
    assert (ph.done, ph.total, ph.rows) == (4, 10, 400)
    assert 100 < ph.rows_per_s < 4000 and ph.eta_s > 0  # 6 shards left at ~20 shards/s
    assert "ETA" in format_status(st)


def test_status_of_something_else_is_exit_2(tmp_path):
    p = run_biogen("status", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and "holds no biogen job" in p.stderr


def _ledger_lines(path, *lines):
    path.mkdir()
    path = path / "ledger.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [{"job_key": "j"}, *lines]) + "\n")
    return path


def test_status_judges_the_latest_session_and_knows_a_reused_pid(tmp_path):
    import os
    import socket
    import time as _time

    now = _time.time()
    host = socket.gethostname()
    # session 1 failed on s3; session 2 runs on a compute node (not checkable from here), active
    led = _ledger_lines(tmp_path / "a",
                        {"event": "start", "t": now - 600, "host": "login1", "pid": 1},
                        {"event": "failed", "t": now - 590, "key": "s3", "error": "ValueError: bad"},
                        {"event": "start", "t": now - 60, "host": "node7", "pid": 2, "resumed": 2},
                        {"key": "s3", "outputs": [], "sha256": "", "result": {}, "t": now - 5})
    st = job_status(led)
    assert (st.state, st.failed) == ("running", [])
    # a finished screen run again: the old `complete` does not make the new run complete
    led = _ledger_lines(tmp_path / "b",
                        {"event": "start", "t": now - 600, "host": host, "pid": 1},
                        {"event": "complete", "t": now - 500},
                        {"event": "start", "t": now - 10, "host": host, "pid": os.getpid(),
                         "pid_start": status_process_start(os.getpid())})
    assert job_status(led).state == "running"
    # this process's pid but another start time: the driver is gone, the pid reused
    led = _ledger_lines(tmp_path / "c",
                        {"event": "start", "t": now - 10, "host": host, "pid": os.getpid(), "pid_start": "x:1"})
    st = job_status(led)
    assert st.state == "stopped" and st.driver["alive"] is False


def test_rays_token_auth_notice_is_kept_out_of_the_terminal(caplog):
    """Ray's "token authentication is enabled" notice on every local start goes to the debug
    log; its other authentication messages still reach the user."""
    import logging

    from biogen.runtime.ray_runtime import RAY_AUTH_LOGGER, _quiet_token_notice

    _quiet_token_notice()
    _quiet_token_notice()  # idempotent: one filter
    logger = logging.getLogger(RAY_AUTH_LOGGER)
    assert sum(type(f).__name__ == "_TokenAuthNotice" for f in logger.filters) == 1
    with caplog.at_level(logging.DEBUG):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    texts = [r.getMessage() for r in caplog.records if r.name == RAY_AUTH_LOGGER]
    assert texts == ["Token authentication is disabled for this Ray cluster. Anyone with network access ..."]


def _no_driver_hashing(*args, **kwargs):
    raise AssertionError("the driver hashed a shard's outputs")


@pytest.mark.parametrize("actors", [False, True], ids=["tasks", "actors"])
def test_outputs_are_hashed_where_they_were_written_and_resume_checks_a_stat(tmp_path, any_rt, actors,
                                                                               monkeypatch):
    """Ray and processes: the worker hashes its outputs (the driver reads no shard data); a
    rerun skips a shard whose files keep their recorded size and mtime, without re-reading
    them, and redoes one rewritten with the same size; a ledger entry without a stat (an
    older ledger) is checked by its hash."""
    import os

    from biogen.files import hash_files
    from biogen.runtime import ledger as ledger_mod

    def run(n):
        led = Ledger(tmp_path / "ledger.jsonl", "job")
        with ray_session(any_rt) as slots:
            if actors:
                return led, run_shards_on_actors(CountingWorker, (str(tmp_path),),
                                                 ((f"s{i}", (i,)) for i in range(n)), ledger=led, spec=any_rt,
                                                 slots=slots, desc="t")
            return led, run_shards(write_square, shards(tmp_path, n), ledger=led, spec=any_rt, slots=slots, desc="t")

    (tmp_path / "died-once").write_text("x")  # CountingWorker: no lost worker here
    if any_rt.mode != "inline":
        monkeypatch.setattr(ledger_mod, "hash_files", _no_driver_hashing)  # workers import their own copy
    led, res = run(4)
    assert {k: v["value"] for k, v in res.items()} == {f"s{i}": i * i for i in range(4)}
    monkeypatch.setattr(ledger_mod, "hash_files", _no_driver_hashing)  # a resume by stat reads nothing
    led_again, again = run(4)
    assert again == res and len(led_again.entries) == 4
    assert [json.loads(x).get("key") for x in (tmp_path / "ledger.jsonl").read_text().splitlines()].count("s0") == 1
    for i in range(4):
        entry = led.entries[f"s{i}"]
        assert entry["sha256"] == hash_files(tmp_path, [f"out-{i}.txt"])
        st = (tmp_path / f"out-{i}.txt").stat()
        assert entry["stat"] == [[st.st_size, st.st_mtime_ns]]
    (tmp_path / "out-1.txt").write_text("9")  # rewritten with the same size: a new mtime
    os.utime(tmp_path / "out-1.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    old = next(e for e in map(json.loads, lines) if e.get("key") == "s3")
    del old["stat"]  # s3 as an older ledger wrote it: no stat, checked by its hash
    (tmp_path / "ledger.jsonl").write_text("\n".join(lines + [json.dumps(old)]) + "\n")
    monkeypatch.setattr(ledger_mod, "hash_files", hash_files)
    led2, res2 = run(5)
    assert {k: v["value"] for k, v in res2.items()} == {f"s{i}": i * i for i in range(5)}
    redone = sorted(k for k, e in led2.entries.items() if e["t"] > led.entries.get(k, {"t": 0})["t"])
    assert redone == ["s1", "s4"] and (tmp_path / "out-1.txt").read_text() == "1"


def test_a_short_write_is_a_full_disk():
    """numpy's np.save on a full device raises ``OSError("1600 requested and 1008 written")``
    without an errno (seen on a full tmpfs): it gets the full-disk message, not a shard bug's."""
    import errno

    from biogen.runtime.ledger import is_storage_error, storage_error
    from biogen.runtime.ray_runtime import _shard_error

    short = OSError("1600 requested and 1008 written")
    assert is_storage_error(short) and is_storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_storage_error(OSError("something else")) and not is_storage_error(ValueError("1 requested and 0 written"))
    assert "no space left on the device (a short write" in str(storage_error(Path("x.npy"), short))
    msg = str(_shard_error("map-000015", short))
    assert msg.startswith("shard map-000015: could not write the output directory: no space left on the device")
    assert "rerun the same command to resume" in msg
