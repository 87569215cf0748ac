"""The streaming screen: fusion, ranking, selection and enrichment with a driver that never
holds a whole-library column (its memory is O(shards + actives + a top-K piece), not O(rows)).

After the score round (``shards/<name>.arrow``, as the in-memory screen) rounds of Ray tasks
run through one entry point (``run_step``), each ledgered like the score round (a rerun of
the same command resumes; keys carry a digest of the fusion, labels and knobs, files live in
``streaming/<digest>/``):

1. stats (per shard): the funnel's counts, the shard's labelled actives (the label key set
   is broadcast and matched with ``pc.is_in``, as the in-memory screen does) with their
   null-model properties, per-scorer moments (count, mean, M2 of the non-NaN scores of the
   molecules that passed the filters: merged with Chan's formula for zscore fusion) and,
   for rank fusion of several scorers, each scorer's sorted run (values + rows) and a
   small sample of it (``run_sample`` values: ~``SAMPLE_PER_BUCKET`` per bucket over all
   shards, so the driver's sample grows with the buckets, not with the shards).
2. rank <scorer> (per bucket, rank fusion of several scorers only): a sample sort. The
   driver picks bucket boundaries from the shards' samples; a bucket task gathers its value
   range from every shard's run (``np.searchsorted`` on memory maps), computes average
   ranks exactly as ``metrics.average_ranks`` with the bucket's global offset (equal values
   never straddle buckets) and writes them as ONE file per bucket (ranks in shard order,
   with each shard's start offset): a shard reads its slice of each bucket's file.
3. fuse (per shard): the fused score (``weighted_fusion`` over the reassembled fractional
   ranks: the same float operations, so bit for bit the in-memory value; z-scores from the
   merged moments, equal to ~1e-12), the sorted run of ``-fused`` and the actives' values.
4. order (per bucket): the same sample sort on ``-fused`` with stable ties in (shard, row)
   order: every row's 1-based rank in ``best_first`` order.
5. final (per shard): ``scores/<shard>.parquet`` (the columns of scores.parquet), the
   shard's tie counts at the actives' distinct values (``metrics.TieCounts``: the screen's
   and the null model's orderings) and a seeded sample for the report.
6. top K (per shard): the rows ranked in (lo, hi] with a 128-bit key of each one's
   scaffold (exact: ranks are global; no merge is needed), no string. The selection's walk
   (scaffold cap: ``selection.CapWalk``) reads them in pieces of ``ranks_per_round`` ranks
   and keeps its pool only, so the driver's memory does not grow with the depth of the
   walk; while the pool is short and rows remain, the next round fetches the ranks after
   the last (by the walk's fill rate, at least 2x further). MaxMin then reads the
   pool's fingerprints, and the driver reads SMILES and scaffolds of the hits only.

The driver folds each round's results as they arrive (``run_shards(..., reduce=...)``:
the funnel's sums, the moments, the run samples, the labelled actives and their values,
summed tie counts) and keeps no per-shard result list; the ledger keeps each result on
disk and, in memory, only its offset (``runtime.ledger.Entries``).

``biogen.screen.pipeline`` picks this path with ``streaming`` (auto: above ``AUTO_ROWS``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq

from biogen.chem.scaffolds import murcko_scaffolds
from biogen.errors import ConfigError, CorruptLibraryError
from biogen.files import atomic_path, json_digest
from biogen.runtime import Ledger, RuntimeSpec, run_shards
from biogen.screen.metrics import (EnrichmentMetrics, NullModel, TieCounts, distinct_values, pick_null_model,
                                   property_ranking, tie_counts, weighted_fusion)
from biogen.screen.selection import CapWalk, SelectionSpec, pick_from_pool, scaffold_keys

log = logging.getLogger(__name__)
AUTO_ROWS = 2_000_000          # streaming=auto: streaming above this many library rows
ROWS_PER_BUCKET = 4_000_000    # sample sort: values per bucket task (default bucket count)
RUN_SAMPLE = 64                # at most, values each shard's sorted run offers for the bucket boundaries
SAMPLE_PER_BUCKET = 512        # sample values per bucket over all shards (boundaries within ~1/512 of a bucket)
REPORT_SAMPLE = 20_000         # rows (all shards) behind the report's histograms and property plot
FUSED = "_fused"               # the run of -fused scores (the screen's order)


@dataclass(frozen=True)
class StreamingSpec:
    """Top-level screen setting ``streaming``: auto (streaming when the library has more than
    ``AUTO_ROWS`` rows) | true | false. Test knobs (Python API only): ``buckets``, the sample
    sort's bucket count (default: one per ``ROWS_PER_BUCKET`` molecules that pass the
    filters); ``candidates``, the first K of the selection (default 4 * selection.top_m);
    ``tasks_per_round``, the tasks of a per-shard round at most (``group_size``);
    ``ranks_per_round``, the ranks the selection's walk holds at once (a top-K round's range
    is read in pieces of that many: ~100 bytes each in the driver)."""

    mode: str = "auto"
    buckets: int | None = None
    candidates: int | None = None
    tasks_per_round: int = 2048
    ranks_per_round: int = 262_144

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "true", "false"):
            raise ConfigError(f"streaming={self.mode!r} is not valid; choose auto, true or false")
        for name in ("buckets", "candidates", "tasks_per_round", "ranks_per_round"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"streaming {name}={v} must be >= 1")

    @classmethod
    def of(cls, setting: "StreamingSpec | bool | str | None") -> "StreamingSpec":
        if isinstance(setting, StreamingSpec):
            return setting
        if setting is None:
            return cls()
        if isinstance(setting, bool):
            return cls("true" if setting else "false")
        return cls(str(setting).lower())

    def applies(self, rows: int) -> bool:
        return self.mode == "true" or (self.mode == "auto" and rows > AUTO_ROWS)


# ----------------------------------------------------------------------------- the tasks

@dataclass(frozen=True)
class StreamingScreen:
    """What every task of a streaming screen needs (small and of a size independent of the
    library's: sent with each task; a task finds shard ``i``'s name in the library's manifest,
    read once per worker process). n_shards/n_rows: the library's; used: the scorers in the
    fusion with their weights; key/labels: the dedupe-key column and the label key set (None:
    no labels); run_sample: the values each shard's sorted run offers for the bucket
    boundaries (``run_sample``)."""

    run_dir: str
    library: str
    n_shards: int
    n_rows: int
    filters: tuple[str, ...]
    scorers: tuple[str, ...]
    used: tuple[tuple[str, float], ...]
    method: str
    key: str | None
    labels: tuple[str, ...] | None
    null_props: tuple[str, ...]
    report_props: tuple[str, ...]
    tag: str
    run_sample: int = RUN_SAMPLE

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / "streaming" / self.tag

    @property
    def fractional(self) -> bool:
        """Rank fusion of several scorers: global fractional ranks are needed."""
        return self.method == "rank" and len(self.used) > 1

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.run_dir))

    def _shard(self, i: int):
        return _open_library(self.library).shards[i]

    def _scores(self, i: int) -> tuple[pa.Table, np.ndarray, list[int]]:
        """The shard's score table, its alive mask and the alive count after each filter."""
        t = feather.read_table(Path(self.run_dir) / f"shards/{self._shard(i).name}.arrow", memory_map=True)
        alive = np.ones(t.num_rows, dtype=bool)
        after = []
        for f in self.filters:
            alive &= t.column(f"{f}_pass").to_numpy(zero_copy_only=False).astype(bool) if t.num_rows else alive
            after.append(int(alive.sum()))
        return t, alive, after

    def _labels(self, i: int, meta: pa.Table | None = None) -> np.ndarray:
        """The shard's rows whose dedupe key is a label key (``meta``: its metadata, if read)."""
        col = (meta if meta is not None else self._shard(i).metadata([self.key])).column(self.key)
        return pc.is_in(col, value_set=pa.array(sorted(self.labels))).to_numpy(zero_copy_only=False).astype(bool)

    def _write_run(self, name: str, i: int, values: np.ndarray, rows: np.ndarray) -> tuple[list[str], list[float]]:
        """Sorted run (ascending, NaN last, ties in row order) of a shard's values, and a sample."""
        order = np.argsort(values, kind="stable")
        out = []
        for suffix, arr in (("val", values[order]), ("idx", rows[order].astype(np.int64))):
            out.append(self._write(self.root / "runs" / name / f"{i:06d}.{suffix}.npy", arr))
        v = values[order]
        m = len(v) - int(np.isnan(v).sum())
        pick = (np.unique(np.linspace(0, m - 1, min(m, self.run_sample)).astype(np.int64)) if m
                else np.zeros(0, np.int64))
        return out, v[pick].tolist()

    def _run(self, name: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.root / "runs" / name
        return np.load(d / f"{i:06d}.val.npy", mmap_mode="r"), np.load(d / f"{i:06d}.idx.npy", mmap_mode="r")

    def _bucket(self, name: str, j: int) -> tuple[Path, Path]:
        """Bucket ``j``'s ranks (shard after shard) and each shard's start in them (n_shards + 1)."""
        d = self.root / "ranks" / name
        return d / f"b{j:05d}.npy", d / f"b{j:05d}.starts.npy"

    def _assemble(self, name: str, i: int, bounds: list[float], n: int, fill) -> np.ndarray:
        """A shard's ranks from its slice of each bucket file, in row order (``fill`` where it
        has no value)."""
        val, idx = self._run(name, i)
        out = np.full(n, fill, dtype=np.float64 if isinstance(fill, float) else np.int64)
        for j in range(len(bounds) + 1):
            lo, hi = _cut(val, bounds, j)
            if hi > lo:
                ranks, starts = (np.load(f, mmap_mode="r") for f in self._bucket(name, j))
                a, b = int(starts[i]), int(starts[i + 1])
                if b - a != hi - lo:
                    raise CorruptLibraryError(f"streaming screen: bucket {j} of {name} holds {b - a} values of shard "
                                              f"{i}, its run {hi - lo}; delete {self.root} and rerun")
                out[np.asarray(idx[lo:hi])] = ranks[a:b]
        return out

    # ------------------------------------------------------------- round 1: stats
    def stats(self, i: int) -> tuple[list[str], dict]:
        t, alive, after = self._scores(i)
        rows = np.flatnonzero(alive)
        res: dict = {"rows": t.num_rows, "after": after, "alive": len(rows), "samples": {}, "moments": {}}
        outputs: list[str] = []
        for name, _ in self.used if len(self.used) > 1 else ():
            v = _column(t, name)[alive]
            if self.fractional:
                files, res["samples"][name] = self._write_run(name, i, v, rows)
                outputs += files
            else:  # zscore fusion
                res["moments"][name] = _moments(v)
        if self.labels is not None:
            lab = self._labels(i)
            act = np.flatnonzero(lab)
            keep = np.ones(len(lab), dtype=bool)
            res["actives_after"] = []
            for f in self.filters:
                keep &= t.column(f"{f}_pass").to_numpy(zero_copy_only=False).astype(bool)
                res["actives_after"].append(int((lab & keep).sum()))
            props = self._shard(i).metadata(list(self.null_props)) if self.null_props else None
            res.update(actives=act.tolist(), actives_alive=alive[act].tolist(),
                       active_props={c: props.column(c).take(pa.array(act, pa.int64())).to_numpy(
                           zero_copy_only=False).astype(np.float64).tolist() for c in self.null_props})
        return outputs, res

    # ------------------------------------------------------------- rounds 2 and 4: bucket ranks
    def bucket_ranks(self, name: str, j: int, bounds: list[float], n_alive: int, average: bool
                     ) -> tuple[list[str], dict]:
        """Bucket ``j`` of run ``name``: average ranks / ``n_alive`` (fractional ranks) or
        1-based positions (stable: ties in shard, row order), in one file (shard after shard,
        each shard's start beside it: two files per bucket, whatever the shard count)."""
        pieces, offset = [], 0
        for i in range(self.n_shards):
            val, _ = self._run(name, i)
            lo, hi = _cut(val, bounds, j)
            offset += lo  # values of this shard in the buckets below
            pieces.append(np.asarray(val[lo:hi]))
        x = np.concatenate(pieces) if pieces else np.zeros(0)
        if average:
            ranks = _average_ranks(x, offset) / max(n_alive, 1)  # as fractional_ranks
        else:
            ranks = np.empty(len(x), dtype=np.int64)
            ranks[np.argsort(x, kind="stable")] = offset + np.arange(1, len(x) + 1)
        starts = np.zeros(self.n_shards + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=starts[1:])
        files = self._bucket(name, j)
        return [self._write(files[0], ranks), self._write(files[1], starts)], {"rows": len(x)}

    # ------------------------------------------------------------- round 3: fuse
    def fuse(self, i: int, bounds: dict, moments: dict, actives: list[int]) -> tuple[list[str], dict]:
        t, alive, _ = self._scores(i)
        n = t.num_rows
        if len(self.used) == 1:  # fuse_scores: the scorer's own score
            fused_alive = np.asarray(_column(t, self.used[0][0])[alive], dtype=np.float64)
        else:
            if self.fractional:
                parts = [self._assemble(k, i, bounds.get(k, []), n, np.nan)[alive] for k, _ in self.used]
            else:
                parts = [_zscore(_column(t, k)[alive], *moments[k]) for k, _ in self.used]
            fused_alive = weighted_fusion(parts, [w for _, w in self.used], self.method, lambda f, xs: xs)
        fused = np.full(n, np.nan)
        fused[alive] = fused_alive
        fused_file = self._write(self.root / "fused" / f"{i:06d}.npy", fused)
        files, sample = self._write_run(FUSED, i, -fused_alive, np.flatnonzero(alive))
        ranked = np.where(alive, fused, -np.inf)
        return [fused_file, *files], {"rows": n, "sample": sample,
                                            "active_values": ranked[np.asarray(actives, np.int64)].tolist()}

    # ------------------------------------------------------------- round 5: final
    def final(self, i: int, bounds: list[float], values_file: str, sample: int) -> tuple[list[str], dict]:
        """``values_file``: the actives' distinct values per ordering (``write_values``), one
        file for every task rather than a copy in each task's arguments."""
        t, alive, _ = self._scores(i)
        n = t.num_rows
        fused = np.load(self.root / "fused" / f"{i:06d}.npy")
        rank = self._assemble(FUSED, i, bounds, n, -1)
        shard = self._shard(i)
        wanted = ["id", *([self.key] if self.labels is not None else []), *self.null_props, *self.report_props]
        meta = shard.metadata(list(dict.fromkeys(wanted)))
        if meta.num_rows != n:
            raise CorruptLibraryError(f"shard {shard.name} of the library at {self.library} has {meta.num_rows} rows "
                                      f"of metadata but {n} fingerprints; run `biogen library verify` on it")
        out = [self._write(self.root / "rank" / f"{i:06d}.npy", rank)]
        table = t.append_column("passed_filters", pa.array(alive)).append_column(
            "score", pa.array(fused, mask=~alive)).append_column("rank", pa.array(rank, mask=rank < 0))
        table = table.add_column(2, "id", meta.column("id").combine_chunks())
        if self.labels is not None:
            table = table.append_column("label", pa.array(self._labels(i, meta)))
        path = Path(self.run_dir) / "scores" / f"{shard.name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        out.append(self._rel(path))
        counts = {}
        with np.load(Path(self.run_dir) / values_file) as values:
            values = {k: values[k] for k in values.files}
        for key, v in values.items():  # "screen", or "<prop>|<high_first>" for the null model
            if key == "screen":
                scores = np.where(alive, fused, -np.inf)
            else:
                prop, high = key.split("|")
                scores = property_ranking(meta.column(prop).to_numpy(zero_copy_only=False), high == "1", alive)
            g, e = tie_counts(scores, np.asarray(v, dtype=np.float64))
            counts[key] = [g.tolist(), e.tolist()]
        out.append(self._sample(i, t, alive, fused, meta, sample))
        return out, {"rows": n, "counts": counts}

    def _write(self, path: Path, arr: np.ndarray) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr)
        return self._rel(path)

    def _sample(self, i: int, t: pa.Table, alive: np.ndarray, fused: np.ndarray, meta: pa.Table, size: int) -> str:
        """A seeded sample of the shard's rows for the report: ``alive``, ``fused``, each scorer's
        score (``score:<name>``) and the report's properties (``prop:<name>``)."""
        rng = np.random.default_rng([0, i])
        take = np.sort(rng.choice(t.num_rows, size=min(size, t.num_rows), replace=False))
        cols = {"alive": pa.array(alive[take]), "fused": pa.array(fused[take])}
        cols.update({f"score:{k}": pa.array(_column(t, k)[take]) for k in self.scorers})
        cols.update({f"prop:{c}": pa.array(meta.column(c).to_numpy(zero_copy_only=False).astype(np.float64)[take])
                     for c in self.report_props})
        path = self.root / "sample" / f"{i:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(cols), tmp)
        return self._rel(path)

    # ------------------------------------------------------------- round 6: top K
    def top(self, i: int, lo: int, hi: int) -> tuple[list[str], dict]:
        """The shard's rows ranked in (lo, hi], in one file of int64 columns: rank, row and
        the 128-bit key of the row's scaffold (``selection.scaffold_keys``; stored scaffolds,
        or computed here from the canonical SMILES), so that the driver's walk reads no
        strings. No file when the shard has no such row."""
        rank = np.load(self.root / "rank" / f"{i:06d}.npy", mmap_mode="r")
        rows = np.flatnonzero((rank > lo) & (rank <= hi))
        if not len(rows):
            return [], {"rows": 0, "top": None}
        shard = self._shard(i)
        take = pa.array(rows, pa.int64())
        if "scaffold" in _open_library(self.library).manifest.get("descriptors", []):
            scaffolds = shard.metadata(["scaffold"]).column("scaffold").take(take).to_pylist()
        else:  # library SMILES are RDKit's canonical ones: the fast scaffold path applies
            scaffolds = murcko_scaffolds(shard.metadata(["smiles"]).column("smiles").take(take).to_pylist(),
                                         canonical=True)
        table = np.column_stack([np.asarray(rank[rows], dtype=np.int64), rows.astype(np.int64),
                                 scaffold_keys(scaffolds).view(np.int64)])
        path = self._write(self.root / "top" / f"{lo}-{hi}" / f"{i:06d}.npy", table)
        return [path], {"rows": len(rows), "top": path}

    def batch(self, steps: tuple[tuple, ...]) -> tuple[list[str], dict]:
        """Several tasks of a round in one (``group_size``): each step with its arguments, in
        order; their outputs together and their results as a list."""
        outputs, results = [], []
        for step, *args in steps:
            out, r = run_step(self, step, *args)
            outputs += out
            results.append(r)
        return outputs, {"rows": sum(int(r.get("rows", 0)) for r in results), "results": results}


STEPS = ("stats", "bucket_ranks", "fuse", "final", "top", "batch")


def _open_library(path: str):
    """The library a task reads, opened once per worker process (its manifest lists every
    shard) while its manifest is unchanged."""
    st = (Path(path) / "manifest.json").stat()
    return _open_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int, size: int):
    from biogen.library.store import Library

    return Library.open(path)


def run_step(job: StreamingScreen, step: str, *args) -> tuple[list[str], dict]:
    """One task of a streaming screen (a Ray task): a ``StreamingScreen`` method with its arguments."""
    if step not in STEPS:
        raise ValueError(f"unknown streaming screen step {step!r}")
    return getattr(job, step)(*args)


def _column(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False)


def _cut(val: np.ndarray, bounds: list[float], j: int) -> tuple[int, int]:
    """Positions [lo, hi) of bucket ``j`` (values in [bounds[j-1], bounds[j])) in a sorted run."""
    lo = 0 if j == 0 else int(np.searchsorted(val, bounds[j - 1], "left"))
    hi = len(val) if j == len(bounds) else int(np.searchsorted(val, bounds[j], "left"))
    return lo, hi


def _average_ranks(x: np.ndarray, offset: int) -> np.ndarray:
    """``metrics.average_ranks`` of a bucket whose values follow ``offset`` smaller ones: the
    same integer starts and ends (shifted by the offset), the same float formula."""
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    order = np.argsort(x)
    xs = x[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(xs[1:], xs[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)
    mean_rank = ((starts + offset) + (ends + offset) + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(first) - 1]
    ranks[np.isnan(x)] = np.nan
    return ranks


def _moments(v: np.ndarray) -> list:
    """(count, mean, M2) of the non-NaN values (as nanmean/nanstd see them), any finite value."""
    m = v[~np.isnan(v)]
    mean = float(m.mean()) if len(m) else 0.0
    return [len(m), mean, float(((m - mean) ** 2).sum()) if len(m) else 0.0, bool(np.isfinite(v).any())]


def merge_moments(parts: list[list]) -> tuple[float, float]:
    """(mean, sd) over every shard from their (count, mean, M2, any finite): Chan et al.'s
    pairwise update; sd 0 when no value is finite (as ``metrics.zscores``)."""
    n, mean, m2, finite = 0, 0.0, 0.0, False
    for c, mu, q, f in parts:
        finite |= bool(f)
        if c == 0:
            continue
        if n == 0:
            n, mean, m2 = c, mu, q
            continue
        d = mu - mean
        tot = n + c
        mean, m2, n = mean + d * c / tot, m2 + q + d * d * n * c / tot, tot
    return mean, (math.sqrt(m2 / n) if finite and n else 0.0)


def _zscore(x: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return (x - mean) / sd if sd > 0 else np.where(np.isnan(x), np.nan, 0.0)


def bucket_bounds(samples: list[list[float]], buckets: int) -> list[float]:
    """Up to ``buckets - 1`` increasing boundaries from the shards' samples (NaN left out)."""
    parts = [np.asarray(part, dtype=np.float64).ravel() for part in samples if part is not None]
    s = np.sort(np.concatenate(parts)) if parts else np.zeros(0)
    s = s[~np.isnan(s)]
    if buckets <= 1 or not len(s):
        return []
    return np.unique(s[(np.arange(1, buckets) * len(s)) // buckets]).tolist()


# ----------------------------------------------------------------------------- the driver

@dataclass
class Candidates:
    """Rows of the global ranking (rank order: a top-K piece, or the selection's pool): their
    1-based ranks, shards, rows and scaffold keys (``selection.scaffold_keys``: [K, 2] uint64)."""

    rank: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    key: np.ndarray

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 2), np.uint64))

    def __len__(self) -> int:
        return len(self.rank)

    def take(self, idx: np.ndarray) -> "Candidates":
        return Candidates(self.rank[idx], self.shard[idx], self.row[idx], self.key[idx])

    def extend(self, more: "Candidates") -> "Candidates":
        """These candidates, then ``more`` (all ranked below them)."""
        return Candidates(*(np.concatenate([a, b]) for a, b in zip(
            (self.rank, self.shard, self.row, self.key), (more.rank, more.shard, more.row, more.key))))


class CandidateRows:
    """SMILES, scaffolds (stored, or computed from the SMILES), fingerprints and metadata of
    candidate rows (the hits, in practice), read from their shards only, each value once."""

    def __init__(self, library, cands: Candidates, stored_scaffolds: bool):
        self.library, self.cands, self.stored = library, cands, stored_scaffolds
        self._cache: dict[tuple[str, int], object] = {}

    def column(self, name: str, idx) -> list:
        idx = [int(i) for i in np.asarray(idx).tolist()]
        missing: dict[int, list[int]] = {}
        for i in dict.fromkeys(idx):
            if (name, i) not in self._cache:
                missing.setdefault(int(self.cands.shard[i]), []).append(i)
        def read(s: int) -> list:  # in threads: pyarrow reads without the GIL
            col = self.library.shards[s].metadata([name]).column(name)
            return col.take(pa.array(self.cands.row[missing[s]], pa.int64())).to_pylist()

        with ThreadPoolExecutor(min(8, max(1, len(missing)))) as pool:
            for s, vals in zip(missing, pool.map(read, missing)):
                self._cache.update({(name, i): v for i, v in zip(missing[s], vals)})
        return [self._cache[(name, i)] for i in idx]

    def scaffolds(self, idx) -> list[str]:
        if self.stored:
            return self.column("scaffold", idx)
        # library SMILES are RDKit's canonical ones: the fast scaffold path applies
        return murcko_scaffolds(self.column("smiles", idx), canonical=True)

    def fingerprints(self, idx) -> np.ndarray:
        return np.stack([self.library.shards[int(self.cands.shard[i])].fingerprints[int(self.cands.row[i])]
                         for i in np.asarray(idx)])


@dataclass
class StreamedEnrichment:
    """The enrichment from tie counts: metrics, null model, the counts (report curves) and
    the actives through the funnel."""

    metrics: EnrichmentMetrics
    null: NullModel | None
    counts: TieCounts
    null_counts: TieCounts | None
    actives_in_library: int
    actives_passing_filters: int
    actives_after_filter: dict[str, int]


@dataclass
class Streamed:
    """What the streaming rounds leave for the outputs: funnel (library and filters), the
    molecules that passed, the hits (candidate positions in rank order) with their rows,
    the labels' share (None without labels) and the report's sample."""

    job: StreamingScreen
    funnel: list[tuple[str, int]]
    alive: int
    cands: Candidates
    rows: CandidateRows
    chosen: np.ndarray
    scaffolds: list[str]
    active_keys: set[tuple[int, int]] | None
    enrichment: StreamedEnrichment | None
    sample: pa.Table | None


def run_sample(n_shards: int, buckets: int) -> int:
    """The values each shard's sorted run offers for the bucket boundaries: ``SAMPLE_PER_BUCKET``
    per bucket over all shards (at least 4 and at most ``RUN_SAMPLE`` per shard), so that the
    driver's samples stay ~512 per bucket, not 64 per shard. Only the buckets' balance depends
    on it, never a rank."""
    return int(min(RUN_SAMPLE, max(4, -(-SAMPLE_PER_BUCKET * buckets // max(n_shards, 1)))))


def make_job(run_dir: Path, lib, filters: list[str], scorers: list[str], used: dict[str, float], method: str,
             key: str, label_set: set | None, null_props: list[str], report_props: list[str],
             spec: StreamingSpec) -> StreamingScreen:
    labels = tuple(sorted(label_set)) if label_set else None
    n_shards, n_rows = len(lib.shards), int(lib.n_rows)
    sample = run_sample(n_shards, spec.buckets or max(1, -(-n_rows // ROWS_PER_BUCKET)))
    tag = json_digest({"used": list(used.items()), "method": method, "labels": labels, "key": key,
                       "null": null_props, "report": report_props, "buckets": spec.buckets, "sample": sample})[:12]
    return StreamingScreen(str(run_dir), str(lib.path), n_shards, n_rows, tuple(filters), tuple(scorers),
                           tuple(used.items()), method, key if labels else None, labels,
                           tuple(null_props) if labels else (), tuple(report_props), tag, sample)


def group_size(n_tasks: int, tasks_per_round: int) -> int:
    """Shards per task of a per-shard round: one, up to ``tasks_per_round`` shards; beyond, as
    many consecutive shards as keep the round at that many tasks. The driver's cost is per
    task (submit, wait, ledger record: ~3 ms), so 100,000 shards cost it ~2,000 tasks a
    round, not 100,000. It depends on the task count and ``tasks_per_round`` only, so a rerun
    with the same settings finds its ledger keys (another ``tasks_per_round`` reruns the
    rounds: correct, not reused)."""
    return max(1, -(-n_tasks // tasks_per_round))


def group_tasks(tasks: list[tuple[str, tuple]], tasks_per_round: int) -> list[tuple[str, list[tuple]]]:
    """``(key, args)`` tasks as ``(group key, [args, ...])``: consecutive tasks together
    (``group_size``), a group keyed ``<first key>+<others>`` (the task's own key when
    there is no grouping, so small jobs keep their ledger keys)."""
    g = group_size(len(tasks), tasks_per_round)
    groups = [tasks[a:a + g] for a in range(0, len(tasks), g)]
    return [(grp[0][0] + (f"+{len(grp) - 1}" if g > 1 else ""), [a for _, a in grp]) for grp in groups]


class _Rounds:
    """Runs one round's tasks (ledgered, with a progress bar), consecutive tasks together in
    one Ray task when there are more than ``tasks_per_round`` (``group_size``). Without
    ``take``, returns the results in task order (the bucket rounds: one per bucket); with
    it, hands each result to ``take(task index, result)`` as it arrives and keeps none (the
    per-shard rounds: the driver keeps what the tallies keep)."""

    def __init__(self, job: StreamingScreen, ledger: Ledger, runtime: RuntimeSpec, slots: int,
                 tasks_per_round: int = StreamingSpec.tasks_per_round):
        self.job, self.ledger, self.runtime, self.slots = job, ledger, runtime, slots
        self.tasks_per_round = tasks_per_round

    def __call__(self, desc: str, tasks: list[tuple[str, tuple]], take: Callable | None = None) -> list[dict]:
        if not tasks:
            return []
        groups = group_tasks(tasks, self.tasks_per_round)
        g = group_size(len(tasks), self.tasks_per_round)
        keys = [f"stream-{self.job.tag}-{k}" for k, _ in groups]
        args = [grp[0] if g == 1 else ("batch", tuple(grp)) for _, grp in groups]
        kw = dict(ledger=self.ledger, spec=self.runtime, slots=self.slots, desc=f"screen: {desc}", total=len(groups))
        work = ((k, (self.job, *a)) for k, a in zip(keys, args))
        where = {k: i * g for i, k in enumerate(keys)}
        results: list[dict] = [] if take is not None else [{}] * len(tasks)

        def fold(key: str, result: dict) -> None:
            for j, r in enumerate(result["results"] if g > 1 else [result]):
                if take is None:
                    results[where[key] + j] = r
                else:
                    take(where[key] + j, r)

        run_shards(run_step, work, **kw, reduce=fold)
        return results


class _StatsTally:
    """What the driver keeps of the stats round: the funnel's sums, each scorer's run sample
    (``run_sample`` values per shard) and moments (4 numbers per shard), and the labelled
    actives of the shards that have any."""

    def __init__(self, job: StreamingScreen):
        self.alive, self.after = 0, np.zeros(len(job.filters), dtype=np.int64)
        self.samples: dict[str, list] = {k: [None] * job.n_shards for k, _ in job.used}
        self.moments = {k: np.zeros((job.n_shards, 4)) for k, _ in job.used}
        self.actives: dict[int, dict] = {}
        self.actives_after = np.zeros(len(job.filters), dtype=np.int64)

    def __call__(self, i: int, r: dict) -> None:
        self.alive += r["alive"]
        self.after += np.asarray(r["after"], dtype=np.int64)
        for k, v in r["samples"].items():
            self.samples[k][i] = np.asarray(v, dtype=np.float64)
        for k, m in r["moments"].items():
            self.moments[k][i] = m
        if "actives" in r:
            self.actives_after += np.asarray(r["actives_after"], dtype=np.int64)
            if r["actives"]:
                self.actives[i] = {"rows": r["actives"], "alive": r["actives_alive"], "props": r["active_props"]}

    def merged_moments(self, k: str) -> tuple[float, float]:
        return merge_moments([[int(c), mu, q, bool(f)] for c, mu, q, f in self.moments[k].tolist()])

    def rows(self, i: int) -> list[int]:
        return self.actives[i]["rows"] if i in self.actives else []

    def n_actives(self) -> int:
        return sum(len(a["rows"]) for a in self.actives.values())

    def alive_flags(self) -> np.ndarray:
        """Whether each active passed the filters (shard order)."""
        return np.asarray([x for i in sorted(self.actives) for x in self.actives[i]["alive"]], dtype=bool)

    def prop(self, c: str) -> np.ndarray:
        return np.asarray([x for i in sorted(self.actives) for x in self.actives[i]["props"][c]], dtype=np.float64)

    def keys(self) -> set[tuple[int, int]]:
        return {(i, a) for i, r in self.actives.items() for a in r["rows"]}


class _FusedTally:
    """The fuse round's run samples and the actives' fused values (by shard)."""

    def __init__(self, job: StreamingScreen):
        self.samples: list = [None] * job.n_shards
        self.active_values: dict[int, list[float]] = {}

    def __call__(self, i: int, r: dict) -> None:
        self.samples[i] = np.asarray(r["sample"], dtype=np.float64)
        if r["active_values"]:
            self.active_values[i] = r["active_values"]

    def values(self) -> np.ndarray:
        return np.asarray([v for i in sorted(self.active_values) for v in self.active_values[i]], dtype=np.float64)


class _CountsTally:
    """The final round's tie counts, summed as they arrive (integers: any order)."""

    def __init__(self):
        self.counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, i: int, r: dict) -> None:
        for key, (g, e) in r["counts"].items():
            g, e = np.asarray(g, dtype=np.int64), np.asarray(e, dtype=np.int64)
            if key in self.counts:
                g, e = g + self.counts[key][0], e + self.counts[key][1]
            self.counts[key] = (g, e)

    def of(self, key: str, values: np.ndarray, active_values: np.ndarray, n: int) -> TieCounts:
        g, e = self.counts.get(key, (np.zeros(len(values), np.int64),) * 2)
        return TieCounts.of(values, g, e, active_values, n)


def _rank_rounds(job: StreamingScreen, rounds: "_Rounds", stats: _StatsTally, buckets: int
                 ) -> dict[str, list[float]]:
    """Rank fusion of several scorers: each scorer's global fractional ranks (sample sort)."""
    bounds: dict[str, list[float]] = {}
    if job.fractional and stats.alive:
        for name, _ in job.used:
            bounds[name] = bucket_bounds(stats.samples[name], buckets)
            rounds(f"rank {name}", [(f"rank-{name}-b{j:05d}",
                                     ("bucket_ranks", name, j, bounds[name], stats.alive, True))
                                    for j in range(len(bounds[name]) + 1)])
    return bounds


def run_streaming(job: StreamingScreen, library, selection: SelectionSpec, spec: StreamingSpec, ledger: Ledger,
                  runtime: RuntimeSpec, slots: int, report: bool) -> Streamed:
    """Every round after the score round, then the selection (see the module docstring)."""
    rounds = _Rounds(job, ledger, runtime, slots, spec.tasks_per_round)
    shards = range(job.n_shards)
    stats = _StatsTally(job)
    rounds("stats", [(f"stats-{i:06d}", ("stats", i)) for i in shards], stats)
    n_alive = stats.alive
    funnel = [("library", job.n_rows)] + [(f, int(stats.after[k])) for k, f in enumerate(job.filters)]
    buckets = spec.buckets or max(1, -(-n_alive // ROWS_PER_BUCKET))
    bounds = _rank_rounds(job, rounds, stats, buckets)
    moments = ({k: stats.merged_moments(k) for k, _ in job.used}
               if job.method == "zscore" and len(job.used) > 1 else {})
    fused = _FusedTally(job)
    rounds("fuse", [(f"fuse-{i:06d}", ("fuse", i, bounds, moments, stats.rows(i))) for i in shards], fused)
    order_bounds = bucket_bounds(fused.samples, buckets)
    if n_alive:
        rounds("order", [(f"order-b{j:05d}", ("bucket_ranks", FUSED, j, order_bounds, n_alive, False))
                         for j in range(len(order_bounds) + 1)])
    values = _active_values(job, stats, fused)
    values_file = job.root / "active_values.npz"
    values_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(values_file) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **values)
    sizes = _sample_sizes(library, REPORT_SAMPLE if report else 0)
    final = _CountsTally()
    rounds("final", [(f"final-{i:06d}", ("final", i, order_bounds, job._rel(values_file), sizes[i]))
                     for i in shards], final)
    enrichment = _enrichment(job, stats, fused, values, final)
    cands, rows, chosen, scaffolds = _select(job, library, selection, spec, n_alive, rounds)
    sample = _read_sample(job) if report else None
    return Streamed(job, funnel, n_alive, cands, rows, chosen, scaffolds,
                    stats.keys() if job.labels is not None else None, enrichment, sample)


def _read_sample(job: StreamingScreen, block: int = 256) -> pa.Table | None:
    """The report's sample from every shard's file, combined ``block`` files at a time: a
    table per file held for all 100,000 shards would cost the driver ~13 KB each (measured:
    +126 MB for 10,000 two-row files at once, +6 MB in blocks of 256)."""
    parts = [pa.concat_tables([pq.read_table(job.root / "sample" / f"{i:06d}.parquet")
                               for i in range(a, min(a + block, job.n_shards))]).combine_chunks()
             for a in range(0, job.n_shards, block)]
    return pa.concat_tables(parts).combine_chunks() if parts else None


def hit_values(st: Streamed, scorers: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The hits' fused scores and each scorer's score (hit order), read from their shards only."""
    job, chosen = st.job, st.chosen
    fused = np.full(len(chosen), np.nan)
    cols = {k: np.full(len(chosen), np.nan) for k in scorers}
    shard, row = st.cands.shard[chosen], st.cands.row[chosen]
    for i in np.unique(shard).tolist():
        at = np.flatnonzero(shard == i)
        fused[at] = np.load(job.root / "fused" / f"{i:06d}.npy", mmap_mode="r")[row[at]]
        t = feather.read_table(Path(job.run_dir) / f"shards/{st.rows.library.shards[i].name}.arrow", memory_map=True)
        part = t.take(pa.array(row[at], pa.int64()))
        for k in scorers:
            cols[k][at] = _column(part, k)
    return fused, cols


def _sample_sizes(library, total: int) -> list[int]:
    n = max(library.n_rows, 1)
    return [min(s.rows, -(-min(total, n) * s.rows // n)) for s in library.shards]


def _active_values(job: StreamingScreen, stats: _StatsTally, fused: _FusedTally) -> dict[str, np.ndarray]:
    """The distinct values the actives hold in each ordering: the screen's, and each null-model
    property's both ways round (key ``<prop>|1`` high first, ``<prop>|0`` low first)."""
    if job.labels is None:
        return {}
    out = {"screen": distinct_values(fused.values())}
    alive = stats.alive_flags()
    for c in job.null_props:
        v = stats.prop(c)
        for high in (True, False):
            out[f"{c}|{int(high)}"] = distinct_values(property_ranking(v, high, alive))
    return out


def _enrichment(job: StreamingScreen, stats: _StatsTally, fused: _FusedTally, values: dict[str, np.ndarray],
                final: _CountsTally) -> StreamedEnrichment | None:
    """The screen's metrics and the null model's from the summed tie counts (None: no labels,
    or the labels lack a class)."""
    if job.labels is None:
        return None
    n = job.n_rows
    p = stats.n_actives()
    if p == 0 or p == n:
        return None
    counts = final.of("screen", values["screen"], fused.values(), n)
    alive = stats.alive_flags()
    options, null_counts = [], {}
    for c in job.null_props:
        v = stats.prop(c)
        for high in (True, False):
            key = f"{c}|{int(high)}"
            null_counts[key] = final.of(key, values[key], property_ranking(v, high, alive), n)
            options.append((c, high, EnrichmentMetrics.from_counts(null_counts[key])))
    null = pick_null_model(options)
    after = {f: int(stats.actives_after[k]) for k, f in enumerate(job.filters)}
    return StreamedEnrichment(EnrichmentMetrics.from_counts(counts), null, counts,
                              None if null is None else null_counts[f"{null.prop}|{int(null.high_first)}"],
                              p, int(alive.sum()), after)


def _candidates(job: StreamingScreen, lo: int, hi: int, rounds: Callable, piece: int) -> Iterator[Candidates]:
    """The rows ranked in (lo, hi], in rank order, in pieces of at most ``piece`` ranks: one
    top-K round writes each shard's rows in the range to a file; the driver keeps a flag
    per shard (a file or none) and, for each piece, reads the files and places each row by
    its rank (ranks are 1..n without gaps: no list of the candidates, no sort, no string)."""
    has = np.zeros(job.n_shards, dtype=bool)

    def take(i: int, r: dict) -> None:
        has[i] = bool(r.get("top"))

    rounds(f"top {lo + 1:,}-{hi:,}", [(f"top{lo}-{hi}-{i:06d}", ("top", i, lo, hi)) for i in range(job.n_shards)],
           take)
    folder = job.root / "top" / f"{lo}-{hi}"
    for a in range(lo, hi, piece):
        b = min(a + piece, hi)
        out = Candidates(np.arange(a + 1, b + 1, dtype=np.int64), np.full(b - a, -1, np.int32),
                         np.zeros(b - a, np.int32), np.zeros((b - a, 2), np.uint64))
        for i in np.flatnonzero(has).tolist():
            path = folder / f"{i:06d}.npy"
            t = np.load(path)
            t = t[(t[:, 0] > a) & (t[:, 0] <= b)]
            at = t[:, 0] - (a + 1)
            if len(at) and (at.min() < 0 or at.max() >= b - a):
                raise CorruptLibraryError(f"streaming screen: {path} holds ranks outside {lo + 1}-{hi}; delete "
                                          f"{job.root} and rerun")
            out.shard[at], out.row[at], out.key[at] = i, t[:, 1], t[:, 2:].view(np.uint64)
        if (out.shard < 0).any():
            raise CorruptLibraryError(f"streaming screen: the top-K round found {int((out.shard >= 0).sum())} of "
                                      f"the {b - a} rows ranked {a + 1}-{b}; delete {job.root} and rerun")
        yield out


def grow_factor(found: int, want: int) -> int:
    """How much further down the ranking the next top-K round reaches when the walk found
    ``found`` of ``want`` in the first K ranks: by that fill rate, with a margin (1.5x), at
    least 2x and at most 64x (a library of near-duplicates, whose scaffold cap fills slowly,
    needs few rounds, not one per doubling: 8,000 -> 512,000 -> 1,024,000 ranks at 100M
    generated rows)."""
    return int(min(64, max(2, math.ceil(1.5 * want / max(found, 1)))))


def _select(job: StreamingScreen, library, selection: SelectionSpec, spec: StreamingSpec, n_alive: int,
            rounds: Callable) -> tuple[Candidates, CandidateRows, np.ndarray, list[str]]:
    """``select_hits`` over the global ranking, fetched from the top by top-K rounds. The walk
    (scaffold cap: ``CapWalk``) runs on the scaffold keys of each piece of a round's range
    (at most ``ranks_per_round`` ranks: the driver's memory does not grow with the depth of
    the walk) and keeps the candidates that join its pool, nothing else; once the pool holds
    ``want``, ``pick_from_pool`` ends the selection on it: the same result as
    ``select_hits``, and the driver reads scaffold strings for the hits only. The first
    round's range is the first K ranks; while the pool is short and rows remain, the next
    reaches ``grow_factor`` times further (the walk's fill rate, at least 2x). Returns the
    pool as the candidates."""
    want = selection.top_m if selection.diversity == "maxmin" else selection.n
    walk = CapWalk(selection)
    pool = Candidates.empty()
    lo, hi = 0, min(spec.candidates or 4 * selection.top_m, n_alive)
    while lo < hi:
        for piece in _candidates(job, lo, hi, rounds, spec.ranks_per_round):
            pool = pool.extend(piece.take(walk.feed(piece.key)))
            if walk.full:
                break
        if walk.full or hi >= n_alive:
            break
        lo, hi = hi, min(hi * grow_factor(walk.taken, want), n_alive)
        log.info("the selection's walk found %d of %d in the best %d rows; fetching ranks %d-%d",
                 walk.taken, want, lo, lo + 1, hi)
    rows = CandidateRows(library, pool, "scaffold" in library.manifest.get("descriptors", []))
    if not len(pool):
        return pool, rows, np.zeros(0, dtype=np.int64), []
    return (pool, rows, *pick_from_pool(list(range(len(pool))), {}, rows.scaffolds, rows.fingerprints, selection))
