"""``biogen status <output_dir>``: where a job stands, read from its ledger and manifest.

Works on the output directory of any ledgered job (library build/append, embed, screen,
evaluate), while it runs, after it stopped, or after it finished; it reads files only (no Ray,
no connection to the cluster), so an operator can run it from a login node.

State and exit code:

==========  ====  ==========================================================================
complete       0  the job finished (manifest committed, or the ledger's ``complete`` event)
failed         1  a shard's own error stopped the job (listed); fix it and rerun the command
running        3  the driver process is alive (checked when it runs on this host)
stopped        4  no driver is running and nothing failed: killed or lost; rerun to resume
==========  ====  ==========================================================================

Exit code 2: the path holds no biogen job.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from biogen.errors import BiogenError
from biogen.runtime.ledger import process_start, retries

EXIT = {"complete": 0, "failed": 1, "running": 3, "stopped": 4}


@dataclass
class Phase:
    name: str
    total: int | None = None  # planned shards (None: streamed, not known in advance)
    done: int = 0
    rows: int = 0
    rows_per_s: float | None = None  # during the latest driver session
    shards_per_s: float | None = None
    eta_s: float | None = None


@dataclass
class JobStatus:
    path: str
    job: str  # library build, library append, embed, screen, evaluate...
    state: str
    ledger: str | None = None
    command: str | None = None
    cwd: str | None = None
    driver: dict | None = None  # host, pid, alive (None: on another host, not checkable)
    started: float | None = None  # first driver session
    last_activity: float | None = None
    sessions: int = 0
    resumed_shards: int = 0
    phases: list[Phase] = field(default_factory=list)
    retries: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    rows: int | None = None  # rows of the finished output (library rows, embedded sequences)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT[self.state]

    def to_dict(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def _driver_alive(host: str | None, pid: int | None, pid_start: str | None = None) -> bool | None:
    """True/False when the driver ran on this host; None when it cannot be checked from here."""
    if host != socket.gethostname() or not pid:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    # the same pid but another start time: the pid was reused by another program
    return pid_start is None or process_start(pid) == pid_start


def _from_ledger(path: Path, ledger: Path, job: str, now: float) -> JobStatus:
    lines = _read_jsonl(ledger)
    entries = {e["key"]: e for e in lines[1:] if "key" in e and "outputs" in e}
    events = [e for e in lines[1:] if "event" in e]
    starts = [e for e in events if e["event"] == "start"]
    last = starts[-1] if starts else {}
    if job == "job" and last.get("command"):  # "biogen screen output=x" -> "screen"
        job = " ".join(w for w in last["command"].split()[1:3] if "=" not in w and not w.startswith("-")) or job
    st = JobStatus(path=str(path), job=job, state="stopped", ledger=str(ledger), command=last.get("command"),
                   cwd=last.get("cwd"), sessions=len(starts), resumed_shards=last.get("resumed", 0),
                   started=starts[0]["t"] if starts else None)
    times = [e["t"] for e in [*entries.values(), *events] if "t" in e]
    st.last_activity = max(times) if times else None
    session_t0 = last.get("t", 0.0)

    order: list[str] = []
    totals: dict[str, int | None] = {}
    for e in events:
        if e["event"] == "plan":
            if e["phase"] not in totals:
                order.append(e["phase"])
            totals[e["phase"]] = e.get("total")
    for e in entries.values():
        ph = e.get("phase", "shards")
        if ph not in totals:
            order.append(ph)
            totals[ph] = None
    for name in order:
        mine = [e for e in entries.values() if e.get("phase", "shards") == name]
        ph = Phase(name=name, total=totals[name], done=len(mine), rows=sum(e.get("rows", 0) for e in mine))
        recent = sorted(e["t"] for e in mine if e.get("t", 0) >= session_t0)
        if recent and recent[-1] > session_t0:
            span = recent[-1] - session_t0
            ph.shards_per_s = len(recent) / span
            ph.rows_per_s = sum(e.get("rows", 0) for e in mine if e.get("t", 0) >= session_t0) / span
        st.phases.append(ph)

    st.retries = retries(events)
    # failures and completion count for the latest driver session only (a rerun after a
    # failure, or of a finished job, is judged by what it does)
    current = [e for e in events if e.get("t", 0) >= session_t0]
    st.failed = [{k: e.get(k) for k in ("key", "phase", "error", "t")}
                 for e in current if e["event"] == "failed" and e.get("key") not in entries]
    alive = _driver_alive(last.get("host"), last.get("pid"), last.get("pid_start"))
    st.driver = {"host": last.get("host"), "pid": last.get("pid"), "alive": alive}
    if any(e["event"] == "complete" for e in current):
        st.state = "complete"
    elif alive or (alive is None and st.failed == []):
        # on another host: running unless the ledger went quiet for long (then: probably stopped)
        st.state = "running" if alive or (st.last_activity and now - st.last_activity < 600) else "stopped"
        if alive is None:
            st.notes.append(f"the driver runs on {last.get('host')}, not on this host: its process cannot be "
                            "checked from here; the state is judged by the ledger's last activity")
    elif st.failed:
        st.state = "failed"
    if st.state == "running" and st.phases:
        ph = st.phases[-1]
        if ph.total is not None and ph.shards_per_s:
            ph.eta_s = max(0, ph.total - ph.done) / ph.shards_per_s
    return st


def _library_status(path: Path, now: float) -> JobStatus:
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else None
    from biogen.library.manifest import committed_job_keys

    committed = committed_job_keys(manifest or {})
    work = path / "_work"
    for d in sorted(work.iterdir()) if work.is_dir() else []:
        ledger = d / "ledger.jsonl"
        if not ledger.is_file():
            continue
        lines = _read_jsonl(ledger)
        if lines and lines[0].get("job_key") in committed:
            continue  # finished; its work directory is removed by the next run
        action = d.name.partition("-")[2] or "build"
        return _from_ledger(path, ledger, f"library {action}", now)
    if manifest is None:
        raise BiogenError(f"{path} holds no library manifest and no unfinished job")
    h = manifest["history"][-1]
    st = JobStatus(path=str(path), job=f"library {h['action']}", state="complete", rows=manifest["n_rows"],
                   last_activity=None, sessions=h.get("run", {}).get("driver_sessions", 0),
                   resumed_shards=h.get("resumed_shard_steps", 0), retries=h.get("run", {}).get("retries", []))
    st.notes.append(f"{manifest['n_rows']:,} molecules in {len(manifest['shards'])} shards; last {h['action']} at "
                    f"{h['time']}: {h['records_read']:,} records read, {h['rows_added']:,} added, "
                    f"{h['duplicates']:,} duplicates, {h['rejected']:,} rejected, {h['seconds']:.1f} s")
    for model, e in sorted((manifest.get("embeddings") or {}).items()):
        run = e["runs"][-1] if e.get("runs") else {}
        st.notes.append(f"{model} embeddings: {len(e['shards'])} of {len(manifest['shards'])} shards, "
                        f"{e.get('n_failed', 0):,} molecules without a vector; last run {run.get('time')}: "
                        f"{run.get('rows', 0):,} rows in {run.get('seconds', 0):.1f} s on {run.get('device')}")
    return st


def _embed_status(path: Path, now: float) -> JobStatus:
    ledger = path / "_work" / "ledger.jsonl"
    if ledger.is_file():
        return _from_ledger(path, ledger, "embed", now)
    m = json.loads((path / "manifest.json").read_text())
    run = m.get("run", {})
    st = JobStatus(path=str(path), job="embed", state="complete", rows=m["n_sequences"],
                   sessions=run.get("driver_sessions", 0), resumed_shards=run.get("resumed_shards", 0),
                   retries=run.get("retries", []))
    st.notes.append(f"{m['n_sequences']:,} sequences ({m['n_ids']:,} ids) in {len(m['shards'])} shards, "
                    f"model {m['model'].get('name', '?')}, dim {m['dim']}")
    return st


def job_status(path: str | Path, now: float | None = None) -> JobStatus:
    """The status of the job whose output directory (or ledger file) is ``path``."""
    now = time.time() if now is None else now
    p = Path(path).absolute()
    if p.is_file() and p.name == "ledger.jsonl":
        return _from_ledger(p.parent, p, "job", now)
    if not p.is_dir():
        raise BiogenError(f"{p} does not exist; give the output directory of a biogen job "
                          "(the output= of library build, embed, screen, evaluate)")
    manifest = p / "manifest.json"
    fmt = json.loads(manifest.read_text()).get("format", "") if manifest.is_file() else ""
    if (p / "_work").is_dir() and any((p / "_work").glob("*/ledger.jsonl")) or "library" in fmt:
        return _library_status(p, now)
    if (p / "_work" / "ledger.jsonl").is_file() or "embed" in fmt:
        return _embed_status(p, now)
    if (p / "ledger.jsonl").is_file():
        return _from_ledger(p, p / "ledger.jsonl", "job", now)
    raise BiogenError(f"{p} holds no biogen job (no ledger.jsonl, _work/ or manifest.json); give the "
                      "output directory of a library build/append, embed, screen or evaluate job")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def format_status(st: JobStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    head = {"complete": "COMPLETE", "failed": "FAILED", "running": "RUNNING", "stopped": "STOPPED"}[st.state]
    lines = [f"{st.job} at {st.path}", f"  state:     {head} (exit code {st.exit_code})"]
    if st.driver and st.state != "complete":
        alive = {True: "running", False: "not running", None: "cannot be checked from this host"}[st.driver["alive"]]
        lines.append(f"  driver:    pid {st.driver['pid']} on {st.driver['host']} ({alive})")
    if st.command:
        lines.append(f"  command:   {st.command}" + (f"   (in {st.cwd})" if st.cwd else ""))
    if st.started:
        lines.append(f"  started:   {_when(st.started)}; {st.sessions} driver session(s)"
                     + (f", the latest resumed {st.resumed_shards} finished shard(s)" if st.resumed_shards else ""))
    elif st.sessions > 1 or st.resumed_shards:
        lines.append(f"  sessions:  {st.sessions} driver session(s); {st.resumed_shards} shard(s) resumed")
    if st.last_activity and st.state != "complete":
        lines.append(f"  last:      {_when(st.last_activity)} ({_hms(now - st.last_activity)} ago)")
    if st.rows is not None:
        lines.append(f"  rows:      {st.rows:,}")
    if st.phases:
        lines.append("  phases:")
        width = max(len(p.name) for p in st.phases)
        for p in st.phases:
            total = f"{p.total:,}" if p.total is not None else "?"
            row = f"    {p.name:<{width}}  {p.done:>6,}/{total:<6} shards  {p.rows:>12,} rows"
            if p.rows_per_s:
                row += f"  {p.rows_per_s:,.0f} rows/s"
            if p.eta_s is not None:
                row += f"  ETA {_hms(p.eta_s)}"
            lines.append(row)
    if st.retries:
        lines.append(f"  retries:   {len(st.retries)} shard run(s) lost with their worker or node, run again:")
        lines += [f"    {r['key']}  {r.get('error', '')}  ({_when(r.get('t'))})" for r in st.retries[-20:]]
    if st.failed:
        lines.append(f"  failed:    {len(st.failed)} shard(s):")
        lines += [f"    {f['key']}  {f.get('error', '')}" for f in st.failed]
    for note in st.notes:
        lines.append(f"  note:      {note}")
    if st.state in ("stopped", "failed"):
        lines.append("  resume:    rerun the same command" + (f": {st.command}" if st.command else "")
                     + "; finished shards are kept")
    return "\n".join(lines)
