"""Where the map phase's chunks come from (library build and append).

Two readers, one contract, chosen once in ``open_chunks`` by ``reader.parallel``: chunk
``i`` is input records ``[i*size, (i+1)*size)`` in input order across all input files,
so the parts, and the library, are the same byte for byte either way.

- ``DriverChunks``: the driver reads every record (``iter_records``, ~2.5 µs of its CPU
  per record: 42 minutes for a billion) and ships each chunk as a ``RecordBatch``.
- ``TaskChunks``: the tasks read. A counting round of tasks (``biogen.chem.ranges``)
  counts the records of each byte range (files that cannot be cut are read whole by one
  task each, into the work directory); the driver turns the counts into ``ChunkPlan`` s
  and each map task reads its own records. The driver sees plans and counts, never records.

The counting round is ledgered (keys ``count-<file>-<start>-<end>``, ``spill-<file>``),
like the map phase (``map-<part>``, the same keys for both readers): a rerun resumes
from where the last one stopped, under either setting.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from biogen.chem.ranges import (
    SPANS, ChunkPlan, CountedRange, SpilledFile, WholeFile, count_unit, counted, plan_chunks, plan_units, unsplittable,
)
from biogen.chem.readers import PARALLEL_FROM_RECORDS, InputInfo, ReaderOptions, iter_records
from biogen.chem.records import RecordBatch
from biogen.runtime import Ledger, RuntimeSpec, run_shards

log = logging.getLogger(__name__)


class DriverChunks:
    """The driver reads the records; chunks cross to the tasks as ``RecordBatch`` es
    (column-wise: a list would be pickled record by record in the driver)."""

    def __init__(self, infos: Sequence[InputInfo], opts: ReaderOptions, size: int):
        self.infos, self.opts, self.size = infos, opts, size
        self.total = max(1, -(-sum(i.records_estimate for i in infos) // size))  # estimated

    def __iter__(self) -> Iterator[tuple[int, RecordBatch]]:
        part, buf = 0, []
        for info in self.infos:
            for rec in iter_records(info, self.opts):
                buf.append(rec)
                if len(buf) == self.size:
                    yield part, RecordBatch(buf)
                    part, buf = part + 1, []
        if buf:
            yield part, RecordBatch(buf)


class TaskChunks:
    """The tasks read the records: one ``ChunkPlan`` per chunk over the counted units."""

    def __init__(self, units: Sequence[CountedRange | SpilledFile], size: int, work: str, opts: ReaderOptions):
        self.units, self.size, self.work, self.opts = units, size, work, opts
        self.records = sum(u.records for u in units)
        self.total = -(-self.records // size)  # exact

    def __iter__(self) -> Iterator[tuple[int, ChunkPlan]]:
        return plan_chunks(self.units, self.size, self.work, self.opts)


def tasks_read(infos: Sequence[InputInfo], opts: ReaderOptions) -> bool:
    """``reader.parallel``: true, false, or auto: the tasks from ``PARALLEL_FROM_RECORDS``
    estimated records on, unless the input is one file that must be read whole (a gzip:
    one task would read all of it before any featurizing starts, where the driver streams
    it to the tasks as it reads)."""
    if opts.parallel != "auto":
        return bool(opts.parallel)
    one_whole = len(infos) == 1 and unsplittable(infos[0]) is not None
    return sum(i.records_estimate for i in infos) >= PARALLEL_FROM_RECORDS and not one_whole


def open_chunks(infos: Sequence[InputInfo], opts: ReaderOptions, size: int, work: Path, *, ledger: Ledger,
                runtime: RuntimeSpec, slots: int, action: str) -> DriverChunks | TaskChunks:
    """The chunks of the inputs, read by the driver or the tasks (chosen here, once); for
    the tasks, after the counting round (Ray tasks, ledgered)."""
    if not tasks_read(infos, opts):
        return DriverChunks(infos, opts, size)
    t0 = time.perf_counter()
    units = plan_units(infos, max(1, int(opts.range_mb * 2**20)), size)
    results = run_shards(count_unit, ((u.key, (u, opts, str(work))) for u in units), ledger=ledger, spec=runtime,
                         slots=slots, desc=f"{action}: count records", total=len(units))
    spans = sorted({u.index for u in units if results[u.key].get("spans")})
    if spans:  # a quoted field over several lines: those files are read whole, in a second round
        for i in spans:
            log.info("input %s is %s: read whole by one task", infos[i].path, SPANS)
        whole = [WholeFile(i, infos[i], os.path.abspath(infos[i].path), SPANS, size) for i in spans]
        results.update(run_shards(count_unit, ((u.key, (u, opts, str(work))) for u in whole), ledger=ledger,
                                  spec=runtime, slots=slots, desc=f"{action}: read whole", total=len(whole)))
        units = sorted([u for u in units if u.index not in spans] + whole,
                       key=lambda u: (u.index, getattr(u, "start", 0)))
    chunks = TaskChunks(counted(units, results), size, str(work), opts)
    log.info("read: tasks counted %d records of %d input file(s) in %d unit(s) (reader.range_mb=%g) in %.1f s; "
             "they read %d chunks", chunks.records, len(infos), len(units), opts.range_mb, time.perf_counter() - t0,
             chunks.total)
    return chunks
