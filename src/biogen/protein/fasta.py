"""Streaming FASTA reader for protein sets: validation, rejects with reasons, dedupe.

Records are read one at a time (plain or gzipped, detected by content), so a proteome
never has to fit in memory as text. Each record is either a ``ProteinRecord`` or a
``Reject`` (source, record number, id, reason, detail, raw) — nothing is dropped
silently:

- ``empty_sequence``: a header with no residues;
- ``invalid_residue``: characters outside ESM's alphabet (the 20 standard amino acids
  plus X, B, U, Z, O; lower case is accepted and upper-cased; one trailing ``*`` stop
  symbol is removed), with the offending characters and their first positions;
- ``missing_header``: sequence lines before the first ``>``;
- ``duplicate_id``: an id seen before in the same input (the first one is kept);
- ``not_utf8``: a header that is not valid UTF-8.

Identical sequences are computed once: ``dedupe`` maps each unique sequence (keyed by
its SHA-256) to every id that carries it.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from biogen.chem.records import Reject
from biogen.errors import InputError

ALPHABET = "ACDEFGHIKLMNPQRSTVWYXBUZO"
_VALID = frozenset(ALPHABET.encode())
_TRANSLATE = bytes.maketrans(ALPHABET.lower().encode(), ALPHABET.encode())


@dataclass(slots=True)
class ProteinRecord:
    """One valid protein: ``sequence`` upper case, ``key`` the SHA-256 of the sequence."""

    source: str
    record: int
    id: str
    description: str
    sequence: str
    key: str


def sequence_key(sequence: str) -> str:
    return hashlib.sha256(sequence.encode()).hexdigest()


def _open(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _invalid_detail(seq: bytes) -> str:
    bad: dict[str, int] = {}
    for i, b in enumerate(seq):
        if b not in _VALID:
            bad.setdefault(chr(b) if 32 < b < 127 else f"\\x{b:02x}", i + 1)
    shown = ", ".join(f"{c!r} at {pos}" for c, pos in list(bad.items())[:8])
    hint = " (gaps '-' and '.' are alignment symbols: remove them)" if ("-" in bad or "." in bad) else ""
    return (f"{len(bad)} character(s) outside ESM's alphabet {ALPHABET} (first positions: {shown}){hint}; "
            "fix or remove the record")


def _finish(source: str, record: int, header: bytes, lines: list[bytes], seen: set[str]) -> ProteinRecord | Reject:
    raw_head = header.rstrip(b"\r\n")
    try:
        head = raw_head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(source, record, "not_utf8", f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                      raw_head.decode("utf-8", "replace"))
    ident, _, desc = head[1:].strip().partition(" ")
    seq = b"".join(ln.strip() for ln in lines).translate(_TRANSLATE)
    if seq.endswith(b"*"):
        seq = seq[:-1]
    raw = head if len(seq) <= 60 else f"{head} ({len(seq)} residues)"
    if not ident:
        ident = f"{Path(source).name}:{record}"
    if not seq:
        return Reject(source, record, "empty_sequence", "the record has a header but no residues; remove it",
                      raw, ident)
    if not _VALID.issuperset(seq):
        return Reject(source, record, "invalid_residue", _invalid_detail(seq), raw, ident)
    if ident in seen:
        return Reject(source, record, "duplicate_id", f"id {ident!r} was used by an earlier record of this input; "
                      "the first one is kept (give records unique ids)", raw, ident)
    seen.add(ident)
    text = seq.decode("ascii")
    return ProteinRecord(source, record, ident, desc.strip(), text, sequence_key(text))


def iter_fasta(path: str | Path) -> Iterator[ProteinRecord | Reject]:
    """Records of one FASTA file (gz ok), in order; see the module docstring for rejects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"FASTA input {str(path)!r} not found; give a .fasta/.fa file (gz ok)")
    source = str(path)
    seen: set[str] = set()
    header: bytes | None = None
    lines: list[bytes] = []
    record = 0
    orphan: list[bytes] = []
    with _open(path) as fh:
        for line in fh:
            if line.startswith(b">"):
                if orphan:
                    yield Reject(source, 0, "missing_header", f"{len(orphan)} sequence line(s) before the first "
                                 "'>' header; give every sequence a '>id description' line",
                                 b"".join(orphan)[:200].decode("utf-8", "replace"))
                    orphan = []
                if header is not None:
                    yield _finish(source, record, header, lines, seen)
                record += 1
                header, lines = line, []
            elif header is None:
                if line.strip():
                    orphan.append(line.strip())
            else:
                lines.append(line)
    if orphan:
        yield Reject(source, 0, "missing_header", "sequence lines with no '>' header; this is not FASTA "
                     "(give every sequence a '>id description' line)", b"".join(orphan)[:200].decode("utf-8", "replace"))
    if header is not None:
        yield _finish(source, record, header, lines, seen)


def iter_inputs(paths: str | Path | Iterable[str | Path]) -> Iterator[ProteinRecord | Reject]:
    """Records of one or several FASTA files (a path, a list or a glob pattern; the same
    expansion as every other biogen input, ``biogen.chem.readers.resolve_inputs``)."""
    from biogen.chem.readers import resolve_inputs

    for p in resolve_inputs(paths):
        yield from iter_fasta(p)


@dataclass
class ProteinSet:
    """Unique sequences of an input and every id that carries each.

    keys / sequences: one entry per unique sequence (first-seen order); ids: key -> ids
    (input order); rejects: what could not be used, with reasons; n_records: records read.
    """

    keys: list[str] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)
    ids: dict[str, list[str]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    n_records: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_ids(self) -> int:
        return sum(len(v) for v in self.ids.values())


def read_proteins(paths) -> ProteinSet:
    """Read, validate and dedupe; ``n_ids + len(rejects) == n_records`` always holds."""
    out = ProteinSet()
    for rec in iter_inputs(paths):
        if isinstance(rec, Reject):
            out.rejects.append(rec)
            out.n_records += rec.reason != "missing_header"
            continue
        out.n_records += 1
        if rec.key not in out.ids:
            out.ids[rec.key] = []
            out.keys.append(rec.key)
            out.sequences.append(rec.sequence)
        out.ids[rec.key].append(rec.id)
    return out


def check_sequence(ident: str, sequence: str, source: str = "<sequence>") -> ProteinRecord | Reject:
    """One sequence given as text (e.g. ``target.sequence``), validated like a FASTA record."""
    head = (">" + ident).encode("utf-8", "replace")
    return _finish(source, 1, head, [sequence.strip().encode("utf-8", "replace")], set())
