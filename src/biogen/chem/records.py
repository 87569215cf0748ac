"""The unit that flows from readers to the molecule processor."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(slots=True)
class RawRecord:
    """One input record before any chemistry.

    source: the input file's path as given; record: 1-based line number for line-based
    formats (SMILES, CSV/TSV; the header counts) and 1-based record ordinal for SDF;
    kind: ``"smiles"`` or ``"molblock"`` (what ``text`` holds); raw: the input text as read
    (for the rejects file); id: the record's own id or ``None``; props: extra columns or
    SDF properties are read by the processor; error: set by a reader when the record is
    broken before chemistry (wrong field count, truncated file) and then rejected as is.
    """

    source: str
    record: int
    kind: str
    text: str
    raw: str
    id: str | None = None
    props: dict[str, str] | None = None
    error: tuple[str, str] | None = None  # (reason code, detail)


_RECORD_FIELDS = tuple(f.name for f in fields(RawRecord))


class RecordBatch(Sequence):
    """A chunk of :class:`RawRecord` s that pickles column-wise.

    A plain list of records crosses a process boundary (a Ray task argument) one record
    at a time: Ray's serializer pickles each record separately, about 10 µs of the
    driver's CPU per record, which on a machine whose cores all run workers is taken from
    them. This batch pickles as one list per field (strings and ints, which pickle in C;
    ~0.6 µs per record) and is rebuilt on the other side.
    """

    __slots__ = ("_records",)

    def __init__(self, records: Iterable[RawRecord] = ()):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]

    def __iter__(self) -> Iterator[RawRecord]:
        return iter(self._records)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordBatch) and self._records == other._records

    def read(self) -> RecordBatch:
        """The records (a map task's chunk is a batch the driver read, or a
        ``biogen.chem.ranges.ChunkPlan`` that the task reads: both have ``read()``)."""
        return self

    def __reduce__(self):
        return _batch_from_columns, tuple([getattr(r, f) for r in self._records] for f in _RECORD_FIELDS)


def _batch_from_columns(*columns: list) -> RecordBatch:
    return RecordBatch(RawRecord(*values) for values in zip(*columns))


@dataclass(slots=True)
class Reject:
    """A record that did not make it into the library, with the reason."""

    source: str
    record: int
    reason: str  # short code, e.g. "parse_error", "duplicate_inchikey"
    detail: str  # human-readable explanation naming the fix where there is one
    raw: str
    id: str | None = None
    # machine-readable, for a duplicate: the compound's identity key (InChIKey or canonical
    # SMILES) and the id of the row that was kept; None otherwise
    key: str | None = None
    duplicate_of: str | None = None

    COLUMNS = ("source", "record", "id", "reason", "key", "duplicate_of", "detail", "raw")  # the rejects CSV header


def write_rejects(rejects: Sequence[Reject], path: str | Path) -> Path | None:
    """Write ``rejects`` as a CSV with ``Reject.COLUMNS``; nothing (None) when there are none."""
    if not rejects:
        return None
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(Reject.COLUMNS)
        for r in rejects:
            w.writerow([getattr(r, c) for c in Reject.COLUMNS])
    return path
