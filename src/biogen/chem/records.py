"""The unit that flows from readers to the molecule processor."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(slots=True)
class Reject:
    """A record that did not make it into the library, with the reason."""

    source: str
    record: int
    reason: str  # short code, e.g. "parse_error", "duplicate_inchikey"
    detail: str  # human-readable explanation naming the fix where there is one
    raw: str
    id: str | None = None

    COLUMNS = ("source", "record", "id", "reason", "detail", "raw")  # the rejects CSV header


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
