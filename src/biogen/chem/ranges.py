"""Byte ranges of deposit files, counted and read by tasks (library build/append).

The driver never reads records. ``plan_units`` cuts each plain input file into nominal
byte ranges; a first round of tasks (``count_unit``) moves each range's ends to the next
record boundary and counts its lines and records by scanning bytes, without parsing;
``counted`` and ``plan_chunks`` turn the counts into chunk plans in the driver (O(ranges)
work): chunk ``i`` holds input records ``[i*size, (i+1)*size)`` in input order across
all files, as the serial reader makes them. A map task reads its chunk
(``ChunkPlan.read``): it reads the part of a range that holds its records (each counting
task notes ``MARKS`` record boundaries per range), skips records by byte scanning and
parses from there with the serial reader's own functions
(``biogen.chem.readers.iter_text``), so records, line numbers and raw text are the same.

Files that cannot be cut are read whole by one task (``WholeFile``), which writes their
records to the work directory in blocks: gzip streams, and CSV files where a quoted field
spans lines (a line boundary need not be a record boundary there). A CSV with a '"' is cut
like any other, and each counting task parses its range with the csv module
(``quoted_span``): if no task finds a record over several lines, none exists (the task
holding the first such record starts at a true record boundary, so it sees it); if one
does, the driver reads that file whole in a second round (``open_chunks``).

Record boundaries, exactly as ``iter_records`` sees them:

- lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (Python's text files, newline='');
  line-based ranges start after a ``\\n``.
- a SMILES or CSV/TSV line is a record unless it is blank, a comment (SMILES), the
  header or before it (CSV/TSV; ``smi_header``: line 1). A printable first byte decides;
  lines with any other first byte (whitespace, non-ASCII) get the reader's own test
  (``is_record_line``), one line at a time.
- SDF: each line that strips to ``$$$$`` ends a record (so does the end of the file,
  after a last block that ``iter_records`` makes a record of); ranges start after one.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import pickle
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biogen.chem.readers import InputInfo, ReaderOptions, is_record_line, is_sdf_terminator, iter_records, iter_text
from biogen.chem.records import RawRecord, RecordBatch
from biogen.errors import InputError

log = logging.getLogger(__name__)
BLOCK = 1 << 20  # bytes read at a time when looking for a range's boundary
MARKS = 16  # record boundaries a counting task notes per range: a map task reads from the one before its
            # first record to the one after its last (~1/MARKS of a range more than its chunk), not the range
SPILL = "read"  # the work directory's folder for the records of files read whole


# ------------------------------------------------------------------ byte scans (pure)
def line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (past its line break) of each line of ``data``, split as Python's text
    files split with newline='': at ``\\n``, ``\\r\\n`` and a lone ``\\r``. A last line
    without a break ends at ``len(data)``; a ``\\r`` that ends ``data`` is a break."""
    a = np.frombuffer(data, np.uint8)
    breaks = np.flatnonzero(a == 10)
    if b"\r" in data:
        cr = np.flatnonzero(a == 13)
        lone = cr[a[np.minimum(cr + 1, len(a) - 1)] != 10]  # (a final \r looks at itself: lone)
        breaks = np.union1d(breaks, lone)
    ends = breaks + 1
    if len(a) and (not len(ends) or ends[-1] != len(a)):
        ends = np.append(ends, len(a))
    starts = np.zeros_like(ends)
    starts[1:] = ends[:-1]
    return starts, ends


def _decode(line: bytes, offset: int) -> str:
    """A line as the text reader decodes it (its BOM dropped at the file's start)."""
    return line.decode("utf-8-sig" if offset == 0 else "utf-8", "replace")


def record_lines(data: bytes, base: int, info: InputInfo, opts: ReaderOptions,
                 header_end: int) -> tuple[np.ndarray, np.ndarray]:
    """Line starts (offsets in ``data``) and which lines are records, for ``data`` of a
    SMILES or CSV/TSV file from its offset ``base`` (a line start); ``header_end``: the
    offset past the CSV header line (lines before it are not records)."""
    starts, ends = line_bounds(data)
    first = np.frombuffer(data, np.uint8)[starts]
    records = (first > 0x20) & (first < 0x7F)  # printable: a record (SMILES: unless '#')
    empty = (first == 10) | (first == 13)
    if info.format == "smi":
        empty |= first == 0x23
        records &= first != 0x23
    for i in np.flatnonzero(~(records | empty)):  # whitespace, control or non-ASCII first byte
        records[i] = is_record_line(_decode(data[starts[i]:ends[i]], base + starts[i]), info)
    if info.format == "smi":
        if opts.smi_header and base == 0 and len(records):
            records[0] = False
    else:
        records &= starts + base >= header_end
    return starts, records


def sdf_terminators(data: bytes, base: int, at_eof: bool) -> list[tuple[int, int]]:
    """(start, end past its line break) in file offsets of each line of ``data`` (which
    starts at file offset ``base``) that ends an SDF record. A line whose end is not in
    ``data`` yet (``at_eof`` false) is left out, as is what follows it."""
    out = []
    n = len(data)
    cr = b"\r" in data
    pos = 0
    while (p := data.find(b"$$$$", pos)) >= 0:
        end = data.find(b"\n", p)
        end = n if end < 0 else end
        if cr and (r := data.find(b"\r", p, end)) >= 0:
            end = r
        if end == n:
            if not at_eof:
                break
            after = n
        elif data[end] == 13 and end + 1 == n and not at_eof:
            break  # \r or \r\n: the next byte decides
        else:
            after = end + 2 if data[end:end + 2] == b"\r\n" else end + 1
        start = data.rfind(b"\n", 0, p) + 1
        if cr:
            start = max(start, data.rfind(b"\r", start, p) + 1)
        if is_sdf_terminator(_decode(data[start:end], base + start)):
            out.append((base + start, base + after))
        pos = after
    return out


def _line_cut(fh, a: int, size: int) -> int:
    """The first line start at or after ``a``, a line starting after a ``\\n``."""
    if a <= 0 or a >= size:
        return min(max(a, 0), size)
    fh.seek(a - 1)
    pos = a - 1
    while block := fh.read(BLOCK):
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def _sdf_cut(fh, a: int, size: int) -> int:
    """The end of the first SDF terminator line that starts at or after ``a``."""
    if a <= 0 or a >= size:
        return min(max(a, 0), size)
    base = a - 1
    fh.seek(base)
    buf = b""
    while True:
        buf += fh.read(BLOCK)
        at_eof = base + len(buf) >= size
        for start, after in sdf_terminators(buf, base, at_eof):
            if start >= a:
                return after
        if at_eof:
            return size
        keep = buf.rfind(b"\n")  # lines before it are done with; the one after may go on
        if keep >= 0:
            buf, base = buf[keep + 1:], base + keep + 1


def _read(fh, path: str, start: int, end: int) -> bytes:
    fh.seek(start)
    data = fh.read(end - start)
    if len(data) != end - start:
        raise InputError(f"{path} changed while it was read: expected {end - start} bytes at offset {start}, got "
                         f"{len(data)}; input files must not change during a build (rerun once they are complete)")
    return data


def _text(data: bytes, offset: int) -> io.TextIOWrapper:
    """``data`` (from file offset ``offset``, a line start) as the text reader reads it."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig" if offset == 0 else "utf-8", errors="replace",
                            newline="")


# -------------------------------------------------------------------- units (tasks)
@dataclass(frozen=True)
class ByteRange:
    """Nominal bytes ``[start, end)`` of plain input file number ``index``; its records are
    those that start in ``[cut(start), cut(end))``, each end moved to the next record
    boundary (``cut``) by the task that counts it. ``file``: the absolute path to open;
    ``header_end``: the offset past a CSV/TSV header line."""

    index: int
    info: InputInfo
    file: str
    start: int
    end: int
    header_end: int = 0

    @property
    def key(self) -> str:
        return f"count-{self.index:04d}-{self.start}-{self.end}"

    def count(self, opts: ReaderOptions, work: str) -> tuple[list[str], dict]:
        """Find the range's true ends; count its lines and records (a byte scan)."""
        size = self.info.bytes
        cut = _sdf_cut if self.info.format == "sdf" else _line_cut
        with open(self.file, "rb") as fh:
            start, end = cut(fh, self.start, size), cut(fh, self.end, size)
            data = _read(fh, self.file, start, end)
        if self.info.format == "sdf":
            terms = sdf_terminators(data, start, True)
            tail = terms[-1][1] - start if terms else 0
            n = len(terms) + (sum(1 for _ in iter_text(_text(data[tail:], start + tail), self.info, opts, 0))
                              if end == size else 0)  # the last block, if iter_records makes a record of it
            firsts = np.array([0] + [after - start for _, after in terms[:n - 1]], np.int64)[:n]  # record starts
            lines, before = np.zeros(len(firsts), np.int64), np.arange(len(firsts))
            n_lines = 0
        else:
            firsts, records = record_lines(data, start, self.info, opts, self.header_end)
            lines, before = np.arange(len(firsts)), np.concatenate(([0], np.cumsum(records)))
            n, n_lines = int(before[-1]), len(firsts)
            if self.info.format == "csv" and self.info.quotes and quoted_span(data, start, self.info):
                return [], {"start": start, "end": end, "spans": True}
        # every (range / MARKS) bytes, the next line or record start: (offset, lines and records before it)
        i = np.unique(np.searchsorted(firsts, np.arange(0, len(data), max(1, (self.end - self.start) // MARKS))))
        i = i[i < len(firsts)]
        marks = np.stack([firsts[i] + start, lines[i], before[i]], axis=1).tolist() if len(i) else []
        return [], {"start": start, "end": end, "lines": n_lines, "records": n, "marks": marks}

    def counted(self, result: dict, lines_before: int, records_before: int) -> list[CountedRange]:
        """The range as its marked parts, each with its records and first line number (or
        records of the file before it)."""
        marks = result["marks"]
        ends = [m[0] for m in marks[1:]] + [result["end"]]
        recs = [m[2] for m in marks[1:]] + [result["records"]]
        sdf = self.info.format == "sdf"
        return [CountedRange(self.info, self.file, off, end, n - before,
                             records_before + before if sdf else lines_before + lines + 1, self.header_end)
                for (off, lines, before), end, n in zip(marks, ends, recs)]


@dataclass(frozen=True)
class WholeFile:
    """Input file number ``index`` read whole by one task (``why``: it cannot be cut); its
    records go to the work directory in pickled blocks of ``block`` records."""

    index: int
    info: InputInfo
    file: str
    why: str
    block: int

    @property
    def key(self) -> str:
        return f"spill-{self.index:04d}"

    def count(self, opts: ReaderOptions, work: str) -> tuple[list[str], dict]:
        out = Path(work) / SPILL
        out.mkdir(parents=True, exist_ok=True)
        blocks: list[str] = []
        n = 0
        for batch in _batched(iter_records(self.info, opts, file=self.file), self.block):
            rel = f"{SPILL}/f{self.index:04d}-b{len(blocks):06d}.pkl"
            tmp = Path(work) / f"{rel}.tmp"
            tmp.write_bytes(pickle.dumps(RecordBatch(batch), protocol=pickle.HIGHEST_PROTOCOL))
            os.replace(tmp, Path(work) / rel)
            blocks.append(rel)
            n += len(batch)
        return blocks, {"start": 0, "end": self.info.bytes, "lines": 0, "records": n, "blocks": blocks}

    def counted(self, result: dict, lines_before: int, records_before: int) -> list[SpilledFile]:
        return [SpilledFile(result["records"], tuple(result["blocks"]), self.block)]


def _batched(records: Iterator[RawRecord], n: int) -> Iterator[list[RawRecord]]:
    while batch := list(itertools.islice(records, n)):
        yield batch


def count_unit(unit: ByteRange | WholeFile, opts: ReaderOptions, work: str) -> tuple[list[str], dict]:
    """Counting-round task: a range's true ends and its records (or a whole file's records,
    written to the work directory). Returns (outputs, result) for the ledger."""
    return unit.count(opts, work)


def unsplittable(info: InputInfo) -> str | None:
    """Why a file must be read whole by one task, if it must be before any counting (a CSV
    whose quoted fields span lines is found by its counting tasks: ``quoted_span``)."""
    if info.gzip:
        return "gzip-compressed"
    return None


SPANS = "a CSV with a quoted field over several lines"


def quoted_span(data: bytes, offset: int, info: InputInfo) -> bool:
    """Whether a record of this CSV range (``data`` from file offset ``offset``, a line
    start) runs over several lines as the csv module reads it: a row over more than one
    line, the last row with a line break in a field (its quote closes past the range),
    or a csv error (the serial reader decides those)."""
    reader = csv.reader(_text(data, offset), delimiter=info.delimiter, quoting=csv.QUOTE_MINIMAL)
    prev, row = 0, None
    try:
        for row in reader:
            if reader.line_num - prev > 1:
                return True
            prev = reader.line_num
    except csv.Error:
        return True
    return row is not None and any("\n" in f or "\r" in f for f in row)


def header_end(file: str, info: InputInfo) -> int:
    """The offset past the header of a plain CSV/TSV file (its first non-blank line, as
    ``inspect_input`` reads it); the file's size when it has none."""
    with open(file, "rb") as fh:
        buf = b""
        while True:
            more = fh.read(max(BLOCK, len(buf)))
            buf += more
            starts, ends = line_bounds(buf)
            done = len(buf) >= info.bytes or not more
            for s, e in zip(starts[:len(starts) - (not done)], ends):  # the last line may go on
                if _decode(buf[s:e], s).strip():
                    return int(e)
            if done:
                return info.bytes


def plan_units(infos: Sequence[InputInfo], range_bytes: int, block: int) -> list[ByteRange | WholeFile]:
    """The counting round's units, in input order: byte ranges of ``range_bytes`` of the
    files that can be cut, whole files (records spilled in blocks of ``block``) of the rest."""
    units: list[ByteRange | WholeFile] = []
    for index, info in enumerate(infos):
        file = os.path.abspath(info.path)  # tasks may run with another working directory
        why = unsplittable(info)
        if why:
            log.info("input %s is %s: read whole by one task", info.path, why)
            units.append(WholeFile(index, info, file, why, block))
            continue
        head = header_end(file, info) if info.format in ("csv", "tsv") else 0
        units += [ByteRange(index, info, file, a, min(a + range_bytes, info.bytes), head)
                  for a in range(0, info.bytes, range_bytes)]
    return units


# -------------------------------------------------------- counted units (map tasks)
@dataclass(frozen=True)
class CountedRange:
    """Bytes ``[start, end)`` of a file, from a line start (SDF: a record start), holding
    ``records`` records; ``at``: the number of its first line (SMILES, CSV/TSV) or of the
    file's records before it (SDF)."""

    info: InputInfo
    file: str
    start: int
    end: int
    records: int
    at: int
    header_end: int = 0

    def read(self, opts: ReaderOptions, work: str, skip: int, take: int) -> list[RawRecord]:
        """Records ``[skip, skip + take)`` of the range: skipped by byte scanning, parsed by
        the reader's own functions from the first one's line on."""
        with open(self.file, "rb") as fh:
            data = _read(fh, self.file, self.start, self.end)
        if self.info.format == "sdf":  # record k starts after the k-th terminator line
            off = sdf_terminators(data, self.start, True)[skip - 1][1] - self.start if skip else 0
            at = self.at + skip
            expected = list(range(at + 1, at + 1 + take))
        else:
            starts, records = record_lines(data, self.start, self.info, opts, self.header_end)
            lines = np.flatnonzero(records)[skip:skip + take]  # take >= 1
            off, at = int(starts[lines[0]]), self.at + int(lines[0])
            expected = (self.at + lines).tolist()
        recs = list(itertools.islice(iter_text(_text(data[off:], self.start + off), self.info, opts, at), take))
        if [r.record for r in recs] != expected:  # the scan and the reader disagree: never guess
            raise RuntimeError(f"{self.info.path} bytes {self.start}-{self.end}: records {skip}..{skip + take} "
                               f"were counted at {expected[:3]}... but read at {[r.record for r in recs][:3]}...; "
                               "please report this with the file; reader.parallel=false reads it serially")
        return recs


@dataclass(frozen=True)
class SpilledFile:
    """A file read whole by a task: ``records`` records in pickled blocks under the work directory."""

    records: int
    blocks: tuple[str, ...]
    block: int

    def read(self, opts: ReaderOptions, work: str, skip: int, take: int) -> list[RawRecord]:
        out: list[RawRecord] = []
        for b in range(skip // self.block, (skip + take - 1) // self.block + 1):
            with open(Path(work) / self.blocks[b], "rb") as fh:
                batch = pickle.load(fh)
            lo = b * self.block
            out += batch[max(skip - lo, 0):skip + take - lo]
        return out


def counted(units: Sequence[ByteRange | WholeFile], results: dict[str, dict]) -> list[CountedRange | SpilledFile]:
    """The units with their counts (``results``: the counting round's, by key), each range
    told its first line number or the records of its file before it. Checks that each
    file's ranges tile it."""
    lines: Counter = Counter()
    before: Counter = Counter()
    reach: dict[int, int] = {}
    out = []
    for u in units:
        r = results[u.key]
        if r["start"] != reach.get(u.index, 0):
            raise RuntimeError(f"{u.info.path}: byte ranges do not tile the file (a range starts at {r['start']}, "
                               f"the one before ends at {reach.get(u.index, 0)}); reader.parallel=false reads it")
        out += u.counted(r, lines[u.index], before[u.index])
        lines[u.index] += r["lines"]
        before[u.index] += r["records"]
        reach[u.index] = r["end"]
    for u in units:
        if reach[u.index] != u.info.bytes:
            raise RuntimeError(f"{u.info.path}: byte ranges end at {reach[u.index]} of {u.info.bytes} bytes")
    return out


@dataclass(frozen=True)
class ChunkPlan:
    """Where a map task reads its chunk: ``(unit, skip, take)`` slices, in input order."""

    work: str
    opts: ReaderOptions
    slices: tuple[tuple[CountedRange | SpilledFile, int, int], ...]

    def read(self) -> RecordBatch:
        recs: list[RawRecord] = []
        for unit, skip, take in self.slices:
            recs += unit.read(self.opts, self.work, skip, take)
        return RecordBatch(recs)


def plan_chunks(units: Sequence[CountedRange | SpilledFile], size: int, work: str,
                opts: ReaderOptions) -> Iterator[tuple[int, ChunkPlan]]:
    """Chunk ``i`` = records ``[i*size, (i+1)*size)`` of all units in order (chunks span
    range and file boundaries), as ``(i, plan)``."""
    part, slices, room = 0, [], size
    for unit in units:
        skip = 0
        while skip < unit.records:
            take = min(room, unit.records - skip)
            slices.append((unit, skip, take))
            skip, room = skip + take, room - take
            if not room:
                yield part, ChunkPlan(work, opts, tuple(slices))
                part, slices, room = part + 1, [], size
    if slices:
        yield part, ChunkPlan(work, opts, tuple(slices))
