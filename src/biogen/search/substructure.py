"""Substructure search over a library: SMARTS query, pattern-fingerprint prefilter, exact match.

    from biogen.search.substructure import substructure_search
    res = substructure_search("mylib", "c1ccccc1C(=O)N", max_hits=100)
    res.table            # pyarrow.Table: hit_id, smiles, shard, row (library order)
    print(res.summary())  # rows screened, prefilter candidates, matches, time, cache use

How it works, per shard (one Ray task each; serially in-process with ``runtime.mode=inline``):

1. Prefilter: RDKit pattern fingerprints (``Chem.PatternFingerprint``, 2048 bits, packed
   to 32 little-endian ``uint64`` words as in ``biogen.chem.fingerprints``) of every
   molecule of the shard, computed from its stored canonical SMILES. A row can contain
   the query only if every bit of the query's pattern fingerprint is set in the row's:
   ``(row & q) == q``. The test is vectorized over the whole shard.
2. Exact match: ``mol.HasSubstructMatch(query, useChirality=...)`` on the candidates
   only, parsed again from their canonical SMILES.

The pattern fingerprints of a shard are cached on disk, so only the first search of a
shard pays for them (about 0.2 ms a molecule); later searches load one ``.npy`` file::

    <cache dir>/<shard name>-<meta sha256[:16]>-rdkit<RDKit version>-2048.npy

``meta sha256`` is the shard's ``meta.parquet`` hash recorded in the manifest, so a
rebuilt shard or another RDKit gets a new file name and an old file is never used for
it; a file with the right name is still checked (dtype and shape) before it is used,
and recomputed when it does not fit. Files are written atomically (``atomic_path``).
Cache dir: ``cache_dir`` when given, else ``<library>/cache/pattern_fp/`` when that can
be written, else ``$XDG_CACHE_HOME/biogen/pattern_fp/<library dir name>`` (``~/.cache``
when ``XDG_CACHE_HOME`` is unset); the library's own cache dir is still read first, so
a cache prepared once beside a read-only shared library is used by everyone. Old cache
files of shards that no longer exist are not removed (delete the directory at will).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rdkit import Chem, DataStructs, rdBase
from tqdm.auto import tqdm

from biogen.chem.fingerprints import pack_bits
from biogen.chem.pipeline import capture_rdkit_errors
from biogen.errors import BiogenError, ConfigError, InputError
from biogen.files import atomic_path
from biogen.library.store import Library
from biogen.runtime.ray_runtime import RuntimeSpec, ray_session, stream_shards

log = logging.getLogger(__name__)

PATTERN_FP_BITS = 2048
PATTERN_FP_WORDS = PATTERN_FP_BITS // 64
RESULT_SCHEMA = pa.schema([("hit_id", pa.string()), ("smiles", pa.string()),
                           ("shard", pa.string()), ("row", pa.int64())])
_EXAMPLE = "c1ccccc1C(=O)N"


# ---------------------------------------------------------------------------- query
def compile_query(smarts: str) -> Chem.Mol:
    """Parse a SMARTS pattern into an RDKit query molecule.

    A plain SMILES is valid SMARTS too (``CC(=O)O``), though SMARTS semantics apply
    (``C`` is an aliphatic carbon with any H count). Raises ``InputError`` naming the
    pattern and RDKit's message when it cannot be parsed or is empty.
    """
    if not isinstance(smarts, str):
        raise InputError(f"substructure query must be a SMARTS string, got {type(smarts).__name__} "
                         f"{smarts!r}; e.g. {_EXAMPLE}")
    text = smarts.strip()
    if not text:
        raise InputError(f"substructure query is empty ({smarts!r}); the query must be a SMARTS "
                         f"pattern, e.g. {_EXAMPLE}")
    messages = capture_rdkit_errors()
    messages.take()
    query = Chem.MolFromSmarts(text)
    raw = list(messages.messages)
    messages.take()
    if query is None:
        detail = _parse_error_reason(raw, text)
        raise InputError(
            f"substructure query {text!r} is not valid SMARTS (RDKit: {detail or 'could not parse it'}); "
            f"the query must be a SMARTS pattern, e.g. {_EXAMPLE}"
        )
    if query.GetNumAtoms() == 0:
        raise InputError(f"substructure query {text!r} has no atoms; the query must be a SMARTS "
                         f"pattern, e.g. {_EXAMPLE}")
    return query


def _parse_error_reason(messages: list[str], text: str) -> str:
    """RDKit's SMARTS parse messages without the echo of the input and the caret line."""
    keep = []
    for m in messages:
        m = m.removeprefix("SMARTS Parse Error:").strip().rstrip(":").strip()
        if m and m != text and not set(m) <= set("~^ ") and not m.startswith("Failed parsing SMARTS"):
            keep.append(m)
    return "; ".join(keep) or "; ".join(messages)


def query_fingerprint(query: Chem.Mol) -> np.ndarray:
    """Packed pattern fingerprint of a query molecule: ``(PATTERN_FP_WORDS,)`` ``<u8``.

    ``Chem.PatternFingerprint`` accepts query molecules: it sets bits only for the parts
    of the query it can reason about (complex or recursive atoms and bonds set no
    specific bits), so the bits it sets are a subset of any matching molecule's bits.
    """
    return _pack([Chem.PatternFingerprint(query, fpSize=PATTERN_FP_BITS)])[0]


def pattern_fingerprints(smiles: Sequence[str]) -> np.ndarray:
    """Packed pattern fingerprints of molecules given as SMILES: ``N x PATTERN_FP_WORDS`` ``<u8``.

    A SMILES RDKit cannot parse (never expected for a library's stored canonical SMILES)
    gets all bits set, so it always reaches the exact match, which then skips it.
    """
    capture_rdkit_errors()  # RDKit warnings off; errors collected, not printed
    fps = []
    for smi in smiles:
        mol = Chem.MolFromSmiles(smi) if smi else None
        fps.append(None if mol is None else Chem.PatternFingerprint(mol, fpSize=PATTERN_FP_BITS))
    return _pack(fps)


def _pack(fps: list) -> np.ndarray:
    bits = np.ones((len(fps), PATTERN_FP_BITS), dtype=np.uint8)
    for i, fp in enumerate(fps):
        if fp is not None:
            DataStructs.ConvertToNumpyArray(fp, bits[i])
    if not len(fps):
        return np.zeros((0, PATTERN_FP_WORDS), dtype="<u8")
    return pack_bits(bits)


def prefilter(fps: np.ndarray, query_fp: np.ndarray) -> np.ndarray:
    """Rows (ascending ``int64``) whose fingerprint holds every bit of ``query_fp``."""
    words = np.flatnonzero(query_fp)  # only the words the query sets: less memory traffic
    if not len(words):
        return np.arange(fps.shape[0], dtype=np.int64)
    q = query_fp[words]
    return np.flatnonzero(np.all((fps[:, words] & q) == q, axis=1)).astype(np.int64)


# ---------------------------------------------------------------------------- cache
def cache_file_name(shard_name: str, meta_sha256: str) -> str:
    """``<shard>-<meta sha256[:16]>-rdkit<version>-2048.npy``."""
    return f"{shard_name}-{meta_sha256[:16]}-rdkit{rdBase.rdkitVersion}-{PATTERN_FP_BITS}.npy"


def _writable_dir(path: Path) -> bool:
    """Create ``path`` if needed and prove a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/biogen/pattern_fp`` (``~/.cache/biogen/pattern_fp`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "biogen" / "pattern_fp"


def resolve_cache_dirs(library: Library, cache_dir: str | Path | None = None) -> tuple[list[Path], Path | None]:
    """``(dirs to read cache files from, in order; dir to write new ones to or None)``."""
    if cache_dir is not None:
        d = Path(cache_dir).expanduser().resolve()
        if _writable_dir(d):
            log.info("pattern fingerprint cache: %s", d)
            return [d], d
        log.warning("pattern fingerprint cache_dir=%s cannot be written; existing cache files in it "
                    "are used, missing ones are computed for this search only (choose a writable "
                    "cache_dir to keep them)", d)
        return [d], None
    own = library.path.resolve() / "cache" / "pattern_fp"
    if _writable_dir(own):
        log.info("pattern fingerprint cache: %s", own)
        return [own], own
    user = user_cache_root() / library.path.resolve().name
    if _writable_dir(user):
        log.warning("library cache dir %s cannot be written; caching pattern fingerprints in %s "
                    "instead (cache files already in the library's cache dir are still used)", own, user)
        return [own, user], user
    log.warning("neither %s nor %s can be written; pattern fingerprints are computed for this "
                "search only (pass cache_dir=... to keep them)", own, user)
    return [own, user], None


def _load_cached(path: Path, n_rows: int) -> np.ndarray | None:
    """The cached fingerprints at ``path`` if present and of the expected dtype and shape."""
    if not path.is_file():
        return None
    try:
        fps = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable pattern fingerprint cache %s (%s); recomputing", path, exc)
        return None
    if fps.dtype != np.dtype("<u8") or fps.shape != (n_rows, PATTERN_FP_WORDS):
        log.warning("ignoring pattern fingerprint cache %s: dtype %s shape %s, expected <u8 %s; "
                    "recomputing", path, fps.dtype, fps.shape, (n_rows, PATTERN_FP_WORDS))
        return None
    return fps


def shard_pattern_fingerprints(smiles: Sequence[str], file_name: str, read_dirs: Sequence[str | Path],
                               write_dir: str | Path | None) -> tuple[np.ndarray, str]:
    """Pattern fingerprints of one shard from the cache, or computed (and cached).

    Returns ``(fps, how)`` with ``how`` one of ``"cached"`` (loaded), ``"computed"``
    (and written to ``write_dir``), ``"uncached"`` (computed, not written).
    """
    for d in read_dirs:
        fps = _load_cached(Path(d) / file_name, len(smiles))
        if fps is not None:
            return fps, "cached"
    fps = pattern_fingerprints(smiles)
    if write_dir is None:
        return fps, "uncached"
    target = Path(write_dir) / file_name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            np.save(tmp, fps)
    except OSError as exc:  # disk full, permissions changed, a concurrent writer: search still exact
        log.warning("could not write pattern fingerprint cache %s (%s); continuing without it", target, exc)
        return fps, "uncached"
    return fps, "computed"


# ---------------------------------------------------------------------------- one shard
@dataclass(frozen=True)
class ShardTask:
    """Everything one shard's search needs (plain data: shipped to a Ray worker)."""

    index: int
    path: str
    name: str
    meta_sha256: str
    smarts: str
    use_chirality: bool
    limit: int | None
    read_dirs: tuple[str, ...]
    write_dir: str | None


def search_shard(task: ShardTask) -> dict:
    """Search one shard; a pure function of ``task`` (besides the cache file it may write).

    Returns a dict: ``index``, ``name``, ``rows`` (matching rows, ascending), ``ids``,
    ``smiles`` (of those rows), ``n_rows``, ``n_candidates`` (rows passing the prefilter),
    ``n_checked`` (candidates given to ``HasSubstructMatch``), ``n_unparsable``,
    ``complete`` (False when it stopped at ``limit`` matches), ``cache``, ``seconds``.
    """
    t0 = time.perf_counter()
    query = compile_query(task.smarts)
    meta = pq.read_table(Path(task.path) / "meta.parquet", columns=["id", "smiles"])
    smiles = meta.column("smiles").to_pylist()
    fps, how = shard_pattern_fingerprints(smiles, cache_file_name(task.name, task.meta_sha256),
                                          task.read_dirs, task.write_dir)
    candidates = prefilter(fps, query_fingerprint(query))
    rows: list[int] = []
    n_checked = n_bad = 0
    complete = True
    for r in candidates.tolist():
        if task.limit is not None and len(rows) >= task.limit:
            complete = False
            break
        n_checked += 1
        mol = Chem.MolFromSmiles(smiles[r]) if smiles[r] else None
        if mol is None:
            n_bad += 1
            continue
        if mol.HasSubstructMatch(query, useChirality=task.use_chirality):
            rows.append(r)
    ids = meta.column("id").take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    return {"index": task.index, "name": task.name, "rows": rows, "ids": ids,
            "smiles": [smiles[r] for r in rows], "n_rows": len(smiles),
            "n_candidates": int(len(candidates)), "n_checked": n_checked, "n_unparsable": n_bad,
            "complete": complete, "cache": how, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- the search
@dataclass
class SubstructureResult:
    """Hits and statistics of one ``substructure_search``.

    table: ``hit_id`` string, ``smiles`` string, ``shard`` string, ``row`` int64 (row in
        that shard's ``meta.parquet``), in library order (shard order, then row).
    complete: True when every row of the library was checked, so ``table`` holds every
        match; False when ``max_hits`` stopped the search (more matches may exist).
    n_library: rows in the library. n_screened: rows of the shards searched (the
        prefilter ran on all of them). n_candidates: of those, rows passing the
        prefilter. n_checked: candidates given to the exact match (fewer than
        n_candidates when a shard stopped at ``max_hits``). n_matches: matches found in
        the shards searched (>= ``len(table)``). Statistics cover the shards whose
        results were used; shards cancelled or discarded after ``max_hits`` are not counted.
    cache: how the shards searched got their pattern fingerprints
        (``{"cached": n, "computed": n, "uncached": n}``); cache_dir: where new cache
        files were written (None: not written).
    """

    table: pa.Table
    smarts: str
    n_library: int
    n_shards: int
    n_shards_searched: int
    n_screened: int
    n_candidates: int
    n_checked: int
    n_matches: int
    n_unparsable: int
    complete: bool
    seconds: float
    cache: dict[str, int] = field(default_factory=dict)
    cache_dir: str | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def selectivity(self) -> float:
        """Fraction of screened rows that passed the prefilter (lower is better)."""
        return self.n_candidates / self.n_screened if self.n_screened else 0.0

    def summary(self) -> str:
        more = "" if self.complete else " (stopped at max_hits; more matches may exist)"
        return (f"substructure {self.smarts!r}: {len(self)} hits{more}; screened {self.n_screened} of "
                f"{self.n_library} molecules in {self.n_shards_searched}/{self.n_shards} shards, "
                f"{self.n_candidates} passed the prefilter ({100 * self.selectivity:.1f}%), "
                f"{self.n_matches} matched, {self.seconds:.2f}s; pattern fingerprints "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.cache.items())))


def _meta_sha256(library: Library, i: int) -> str:
    entry = library.manifest["shards"][i]
    sha = entry.get("files", {}).get("meta.parquet", {}).get("sha256")
    if not sha:
        from biogen.files import sha256_file

        sha = sha256_file(library.shards[i].path / "meta.parquet")
    return sha


def substructure_search(
    library: Library | str | Path,
    smarts: str,
    *,
    max_hits: int | None = None,
    use_chirality: bool = False,
    runtime: RuntimeSpec | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SubstructureResult:
    """All library molecules that contain the SMARTS pattern ``smarts``, in library order.

    max_hits: return only the first ``max_hits`` matches in library order (shard order,
        then row). The result is exactly the first ``max_hits`` rows that a full search
        would return: each shard stops after ``max_hits`` matches of its own, and the
        search stops, cancelling the shards still running or queued, as soon as the
        shards finished *from the first one on, without a gap* hold ``max_hits``
        matches. Matches found by later shards that finished early are discarded.
        ``None``: every match.
    use_chirality: passed to ``HasSubstructMatch`` (``[C@H]`` in the query then must
        match the molecule's stereo; the prefilter ignores stereo).
    runtime: where shards run (default ``RuntimeSpec()``: local Ray); ``mode=processes`` on
        a pool of local processes without Ray; ``mode=inline`` one shard after another in
        this process.
    cache_dir: where pattern fingerprints are cached (see the module docstring).
    progress: show a progress bar over shards (also off when ``runtime.progress`` is False).

    Raises ``InputError`` for an invalid SMARTS (before any work starts) and
    ``LibraryError`` when ``library`` is not a library.
    """
    t0 = time.perf_counter()
    compile_query(smarts)  # fail fast, before Ray starts
    smarts = smarts.strip()
    if max_hits is not None and (isinstance(max_hits, bool) or not isinstance(max_hits, int) or max_hits < 1):
        raise ConfigError(f"max_hits={max_hits!r} is not valid; give a positive integer, or None for all matches")
    runtime = runtime or RuntimeSpec()
    lib = library if isinstance(library, Library) else Library.open(library)
    read_dirs, write_dir = resolve_cache_dirs(lib, cache_dir)
    tasks = [ShardTask(i, str(s.path), s.name, _meta_sha256(lib, i), smarts, bool(use_chirality), max_hits,
                       tuple(str(d) for d in read_dirs), None if write_dir is None else str(write_dir))
             for i, s in enumerate(lib.shards)]

    bar = tqdm(total=len(tasks), desc="substructure", unit="shard", dynamic_ncols=True,
               disable=not (progress and runtime.progress))
    done: dict[int, dict] = {}
    state = {"prefix": 0, "hits": 0}

    def accept(res: dict) -> bool:
        """Record a finished shard; True when the first ``max_hits`` are known."""
        done[res["index"]] = res
        bar.update(1)
        while state["prefix"] in done:
            state["hits"] += len(done[state["prefix"]]["rows"])
            state["prefix"] += 1
        bar.set_postfix(hits=sum(len(r["rows"]) for r in done.values()), refresh=False)
        return max_hits is not None and state["hits"] >= max_hits

    by_name = {t.name: t for t in tasks}
    try:
        # a shard whose Ray worker or node was lost runs again at most twice (max_tries=2), as before
        with ray_session(runtime) as slots, closing(stream_shards(
                search_shard, ((t.name, (t,)) for t in tasks), spec=runtime, slots=slots, total=len(tasks),
                error=lambda name, exc: _shard_failed(by_name[name], exc), max_tries=2)) as results:
            for _, res in results:
                if accept(res):
                    break  # closing the stream cancels the shards still running or queued
    finally:
        bar.close()

    used = [done[i] for i in range(state["prefix"])]  # the gap-free prefix; all shards when not stopped
    ids, smi, shard, row = [], [], [], []
    for res in used:
        ids += res["ids"]
        smi += res["smiles"]
        shard += [res["name"]] * len(res["rows"])
        row += res["rows"]
    n_matches = len(ids)
    if max_hits is not None:
        ids, smi, shard, row = ids[:max_hits], smi[:max_hits], shard[:max_hits], row[:max_hits]
    table = pa.table([pa.array(ids, pa.string()), pa.array(smi, pa.string()), pa.array(shard, pa.string()),
                      pa.array(row, pa.int64())], schema=RESULT_SCHEMA)
    cache: dict[str, int] = {}
    for res in used:
        cache[res["cache"]] = cache.get(res["cache"], 0) + 1
    n_bad = sum(r["n_unparsable"] for r in used)
    if n_bad:
        log.warning("%d library SMILES could not be parsed by RDKit and were skipped; check the "
                    "library with `biogen library verify`", n_bad)
    result = SubstructureResult(
        table=table, smarts=smarts, n_library=lib.n_rows, n_shards=len(tasks), n_shards_searched=len(used),
        n_screened=sum(r["n_rows"] for r in used), n_candidates=sum(r["n_candidates"] for r in used),
        n_checked=sum(r["n_checked"] for r in used), n_matches=n_matches, n_unparsable=n_bad,
        complete=len(used) == len(tasks) and all(r["complete"] for r in used) and n_matches == len(table),
        seconds=time.perf_counter() - t0, cache=cache, cache_dir=None if write_dir is None else str(write_dir),
    )
    log.info("%s", result.summary())
    return result


def _shard_failed(task: ShardTask, exc: Exception) -> BiogenError:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the task's error
    return BiogenError(f"substructure search of shard {task.name} ({task.path}) failed: "
                       f"{type(cause).__name__}: {cause}")
