"""Streaming readers for deposit files: SMILES, CSV/TSV and SDF, plain or gzipped.

Files are never loaded whole: records are yielded one at a time. Problems that make a
whole file unusable (missing file, missing column, wrong delimiter) raise ``InputError``
before any work starts (see ``inspect_input``); problems of one record (wrong field
count, a truncated gzip stream) become records with ``error`` set, which the processor
turns into rejects. No chemistry happens here: SDF blocks are split as text and parsed
by the workers.

Library build/append may have its tasks read byte ranges of the inputs instead
(``biogen.chem.ranges``): they parse from a record boundary with ``iter_text``, the same
functions as ``iter_records``, so either way the records are the same.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from biogen.chem.records import RawRecord
from biogen.errors import ConfigError, InputError

FORMATS = ("smi", "csv", "tsv", "sdf")
_EXT_FORMAT = {
    ".smi": "smi", ".smiles": "smi", ".ism": "smi", ".can": "smi",
    ".csv": "csv",
    ".tsv": "tsv", ".tab": "tsv", ".dat": "tsv",
    ".sdf": "sdf", ".sd": "sdf", ".mol": "sdf",
}
_SMILES_COLUMNS = ("smiles", "canonical_smiles", "smi", "isomeric_smiles", "molecule")
_ID_COLUMNS = ("id", "compound_id", "mol_id", "molecule_id", "name", "mol_title", "_name",
               "title", "zinc_id", "chembl_id", "identifier")
_GZIP_MAGIC = b"\x1f\x8b"
MAX_SDF_RECORD_LINES = 100_000  # the largest real molblocks (proteins as SDF) stay well below
PARALLEL_FROM_RECORDS = 1_000_000  # reader.parallel=auto: tasks read inputs of this many records on
_HOW = ("parallel", "range_mb")  # ReaderOptions keys that change how, not what, is read


@dataclass(frozen=True)
class ReaderOptions:
    """How to read deposit files (config key ``reader``; every key optional).

    format: ``auto`` (from the extension, ``.gz`` stripped) or one of smi, csv, tsv, sdf.
    smiles_column / id_column: CSV/TSV column names; ``None`` picks a usual name
    (``smiles``, ``id`` ...), case-insensitively; ``id_column: ""`` means no ids.
    delimiter: overrides the delimiter implied by the format.
    smi_header: the first line of a SMILES file is a header to skip.
    sdf_id_property: take SDF ids from this data item instead of the title line.
    parallel: library build/append only: who reads the records. ``true``: Ray tasks read
    byte ranges of the inputs themselves (``biogen.chem.ranges``), the driver only plans;
    ``false``: the driver reads every record and ships chunks to the tasks; ``auto``:
    tasks from ``PARALLEL_FROM_RECORDS`` records on (estimated by the pre-flight pass),
    except for a single gzip file. Both give the same library, byte for byte.
    range_mb: size of the byte ranges the tasks count and read (``parallel``).
    ``parallel`` and ``range_mb`` change how, not what, is read: they are not part of
    ``identity()`` (the job and deposit keys), so a build resumes under either setting.
    """

    format: str = "auto"
    smiles_column: str | None = None
    id_column: str | None = None
    delimiter: str | None = None
    smi_header: bool = False
    sdf_id_property: str | None = None
    parallel: bool | str = "auto"
    range_mb: float = 8.0

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError(
                f"reader.format={self.format!r} is not a known format; valid: auto, "
                + ", ".join(FORMATS)
            )
        aliases = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "space": " "}
        if self.delimiter in aliases:
            object.__setattr__(self, "delimiter", aliases[self.delimiter])
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ConfigError(
                f"reader.delimiter={self.delimiter!r} must be one character or one of "
                f"{', '.join(aliases)} (e.g. reader.delimiter=tab)"
            )
        parallel = {"auto": "auto", "true": True, "false": False}.get(str(self.parallel).lower())
        if parallel is None:
            raise ConfigError(f"reader.parallel={self.parallel!r} is not valid; choose auto, true or false")
        object.__setattr__(self, "parallel", parallel)
        if not self.range_mb > 0:
            raise ConfigError(f"reader.range_mb={self.range_mb} must be > 0 (MiB per byte range, e.g. 8)")

    def identity(self) -> dict:
        """The settings that decide which records are read (for job and deposit keys)."""
        return {k: v for k, v in asdict(self).items() if k not in _HOW}


@dataclass
class InputInfo:
    """What the pre-flight pass learned about one input file."""

    path: str
    format: str
    sha256: str
    bytes: int
    gzip: bool
    records_estimate: int
    truncated: str | None = None  # the decompressor's complaint, if the gzip stream is cut
    quotes: bool = False  # a CSV with '"' somewhere: a quoted field may span lines
    columns: list[str] = field(default_factory=list)
    smiles_column: str | None = None
    id_column: str | None = None
    delimiter: str | None = None

    def to_manifest(self) -> dict:
        return {"path": self.path, "format": self.format, "sha256": self.sha256,
                "bytes": self.bytes, "gzip": self.gzip, "truncated": self.truncated}


def resolve_inputs(spec: str | Sequence[str]) -> list[Path]:
    """Expand ``input=`` (a path, a glob, or a list of them) to existing files, in order."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise InputError("input= is empty; give a file, a list [a.smi,b.sdf] or a glob 'dir/*.smi'")
    out: list[Path] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputError(f"input glob {item!r} matches no file; check the path and pattern")
            out.extend(Path(m) for m in matches if Path(m).is_file())
        else:
            p = Path(item)
            if not p.exists():
                raise InputError(f"input file not found: {item} (cwd: {os.getcwd()}); check input=")
            if p.is_dir():
                raise InputError(f"input {item} is a directory; give files or a glob like '{item}/*.smi'")
            out.append(p)
    seen: set[Path] = set()
    dup = [p for p in out if p.resolve() in seen or seen.add(p.resolve())]
    if dup:
        raise InputError(f"input lists the same file twice: {dup[0]}; each deposit file once")
    return out


def detect_format(path: Path, opts: ReaderOptions) -> str:
    if opts.format != "auto":
        return opts.format
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    if ext not in _EXT_FORMAT:
        raise InputError(
            f"cannot tell the format of {path} from its extension {ext or '(none)'}; "
            f"set reader.format to one of {', '.join(FORMATS)}"
        )
    return _EXT_FORMAT[ext]


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping by magic bytes (not by extension)."""
    if _is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _scan(path: Path, fmt: str) -> tuple[str, int, bool, int, str | None, bool]:
    """One pass over the raw bytes: sha256, size, gzip?, record estimate, truncation, and
    for CSV whether any '"' occurs (then a quoted field may span lines)."""
    h = hashlib.sha256()
    size = 0
    gz = _is_gzip(path)
    marker = b"$$$$" if fmt == "sdf" else b"\n"
    count = 0
    last = b""
    truncated = None
    quotes = False
    dec = zlib.decompressobj(wbits=31) if gz else None
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            size += len(block)
            data = b""
            if dec is not None and truncated is None:
                pending = block
                try:
                    data = dec.decompress(pending)
                    while dec.eof and dec.unused_data:  # concatenated members, or padding
                        pending = dec.unused_data
                        if not pending.strip(b"\0"):
                            break  # zero padding after the last member, as gzip tolerates
                        dec = zlib.decompressobj(wbits=31)
                        data += dec.decompress(pending)
                except zlib.error as exc:
                    truncated = f"corrupt gzip stream ({exc})"
            elif dec is None:
                data = block
            count += data.count(marker)
            quotes = quotes or (fmt == "csv" and b'"' in data)
            if data:
                last = data[-1:]
    if dec is not None and truncated is None and not dec.eof:
        truncated = "gzip stream ends early (file truncated: the end-of-stream marker is missing)"
    if last not in (b"", b"\n") or (fmt == "sdf" and size and count == 0):
        count += 1  # last line without newline; an SDF/.mol record without "$$$$"
    return h.hexdigest(), size, gz, count, truncated, quotes


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...],
                 key: str, path: Path, required: bool) -> str | None:
    if wanted == "":
        return None
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise InputError(
            f"{path}: column {wanted!r} (reader.{key}) is not in the header {columns}; "
            f"set reader.{key} to one of them"
        )
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    if required:
        raise InputError(
            f"{path}: no SMILES column found in the header {columns}; "
            f"set reader.{key}=<column name> (or reader.format=smi for a SMILES file)"
        )
    return None


def _read_header(fh, delimiter: str) -> tuple[list[str], int]:
    """First non-empty line as column names; a leading '#' (as in the DUD/ChEMBL sets) is dropped."""
    lineno = 0
    for line in fh:
        lineno += 1
        if line.strip():
            if line.startswith("#"):
                line = line[1:]
            cols = next(csv.reader([line.strip("\r\n")], delimiter=delimiter))
            return [c.strip() for c in cols], lineno
    return [], lineno


def inspect_input(path: Path, opts: ReaderOptions) -> InputInfo:
    """Pre-flight check of one file: hash it, estimate its records, validate its header."""
    fmt = detect_format(path, opts)
    sha, size, gz, count, truncated, quotes = _scan(path, fmt)
    info = InputInfo(path=str(path), format=fmt, sha256=sha, bytes=size, gzip=gz,
                     records_estimate=count, truncated=truncated, quotes=quotes)
    if fmt in ("csv", "tsv"):
        delim = opts.delimiter or ("," if fmt == "csv" else "\t")
        other = "\t" if delim == "," else ","
        with open_text(path) as fh:
            try:
                cols, _ = _read_header(fh, delim)
            except (EOFError, OSError, zlib.error):
                cols = []
        info.columns, info.delimiter = cols, delim
        if cols:
            if len(cols) == 1 and other in cols[0]:
                name = "tab" if other == "\t" else "comma"
                raise InputError(
                    f"{path}: the header has one column {cols[0][:60]!r} but looks {name}-separated; "
                    f"set reader.delimiter={'tab' if other == chr(9) else 'comma'} "
                    f"(or reader.format={'tsv' if other == chr(9) else 'csv'})"
                )
            info.smiles_column = _pick_column(cols, opts.smiles_column, _SMILES_COLUMNS,
                                              "smiles_column", path, required=True)
            info.id_column = _pick_column(cols, opts.id_column, _ID_COLUMNS, "id_column", path,
                                          required=opts.id_column is not None)
        info.records_estimate = max(count - 1, 0)
    return info


def iter_records(info: InputInfo, opts: ReaderOptions, *, file: str | None = None) -> Iterator[RawRecord]:
    """Yield the records of one inspected file, in order. ``file``: the path to open when
    it differs from ``info.path`` (an absolute path for a task; records keep ``info.path``)."""
    last = 0
    with open_text(Path(file or info.path)) as fh:
        try:
            for rec in _READERS[info.format](fh, info, opts):
                last = rec.record
                yield rec
        except (EOFError, OSError, zlib.error) as exc:
            unit = "record" if info.format == "sdf" else "line"
            yield RawRecord(
                info.path, last + 1, "smiles", "", "",
                error=("truncated_input",
                       f"the file ends early after {unit} {last} ({exc}); records after it are "
                       f"missing and the last one may be cut: re-copy the file and append the rest"),
            )


def iter_text(lines: Iterable[str], info: InputInfo, opts: ReaderOptions, at: int) -> Iterator[RawRecord]:
    """The records in ``lines``, text of ``info``'s file from a record boundary on (a byte
    range a task reads), as ``iter_records`` yields them: ``at`` is the number of the first
    line (SMILES, CSV/TSV; a line after the header) or of SDF records before it."""
    if at < 1 and info.format != "sdf":
        raise ValueError(f"iter_text: line numbers start at 1, got {at}")
    return _READERS[info.format](lines, info, opts, at)


def is_record_line(line: str, info: InputInfo) -> bool:
    """Whether one line of a SMILES or CSV/TSV file, past its header, is a record (or a
    rejected one) for ``iter_records``: the exact test for lines a byte scan cannot judge."""
    if info.format == "smi":
        return _smi_text(line) is not None  # the header line (smi_header) is the caller's to skip
    try:
        row = next(csv.reader([line], delimiter=info.delimiter, quoting=_quoting(info)), [])
    except csv.Error:
        return True  # an unreadable line is a csv_error record
    return not _blank_row(row)


def _smi_text(line: str) -> str | None:
    """A SMILES file line's text; None for blank and comment lines."""
    text = line.strip()
    return None if not text or text.startswith("#") else text


def _blank_row(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _quoting(info: InputInfo) -> int:
    # TSV has no quoting convention: a '"' in a name is just a character there
    return csv.QUOTE_NONE if info.format == "tsv" else csv.QUOTE_MINIMAL


def _iter_smi(fh, info: InputInfo, opts: ReaderOptions, first_line: int = 1) -> Iterator[RawRecord]:
    for lineno, line in enumerate(fh, first_line):
        text = _smi_text(line)
        if text is None or (opts.smi_header and lineno == 1):
            continue
        parts = text.split(None, 1)
        yield RawRecord(info.path, lineno, "smiles", parts[0], text,
                        parts[1].strip() if len(parts) > 1 else None)


def _iter_delimited(fh, info: InputInfo, opts: ReaderOptions, first_line: int = 0) -> Iterator[RawRecord]:
    """first_line: 0 reads the header from ``fh``; else ``fh`` starts at that line, after
    the header (as read by ``inspect_input``)."""
    if first_line:
        cols, header_line = info.columns, first_line - 1
    else:
        cols, header_line = _read_header(fh, info.delimiter)
    if not cols:
        return
    n = len(cols)
    si = cols.index(info.smiles_column)
    ii = cols.index(info.id_column) if info.id_column else None
    extra = [(j, c) for j, c in enumerate(cols) if j != si and j != ii]
    reader = csv.reader(fh, delimiter=info.delimiter, quoting=_quoting(info))
    prev = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            start, prev = header_line + prev + 1, reader.line_num
            yield RawRecord(info.path, start, "smiles", "", "", error=(
                "csv_error", f"unreadable CSV from line {start} to {header_line + prev}: {exc} "
                "(an unbalanced quote?)"))
            continue
        lineno, end = header_line + prev + 1, header_line + reader.line_num
        prev = reader.line_num
        if _blank_row(row):
            continue
        raw = info.delimiter.join(row)
        if end != lineno:
            yield RawRecord(info.path, lineno, "smiles", "", raw, error=(
                "multiline_record",
                f"a quoted field runs from line {lineno} to line {end} (an unbalanced quote?); "
                f"the lines in between are in this record's raw text: fix the quote and append them"))
            continue
        if len(row) != n:
            rid = row[ii].strip() if ii is not None and ii < len(row) else None
            yield RawRecord(info.path, lineno, "smiles", "", raw, rid or None, error=(
                "field_count",
                f"expected {n} fields separated by {info.delimiter!r} as in the header, got "
                f"{len(row)}; fix the line or set reader.delimiter"))
            continue
        smi = row[si].strip()
        rid = row[ii].strip() if ii is not None else None
        props = {c: row[j] for j, c in extra} or None
        if not smi:
            yield RawRecord(info.path, lineno, "smiles", "", raw, rid, props,
                            error=("empty_smiles", f"column {info.smiles_column!r} is empty"))
            continue
        yield RawRecord(info.path, lineno, "smiles", smi, raw, rid or None, props)


def _parse_sdf_block(lines: list[str]) -> tuple[str, dict[str, str]]:
    """Split an SDF record into its molblock and its data items (``> <name>`` + value lines)."""
    end = next((i for i, ln in enumerate(lines) if ln.startswith("M  END")), None)
    if end is None:
        return "".join(lines), {}
    props: dict[str, str] = {}
    name, values = None, []
    for ln in lines[end + 1:]:
        s = ln.rstrip("\r\n")
        if s.startswith(">") and name is None:  # inside an item, ">..." is a value line
            if name is not None:
                props[name] = "\n".join(values)
            lt, gt = s.find("<"), s.rfind(">")
            name = s[lt + 1:gt] if 0 < lt < gt else s[1:].strip()
            values = []
        elif name is not None:
            if s.strip() == "":
                props[name] = "\n".join(values)
                name, values = None, []
            else:
                values.append(s)
    if name is not None:
        props[name] = "\n".join(values)
    return "".join(lines[: end + 1]), props


def is_sdf_terminator(line: str) -> bool:
    """An SDF line that ends a record."""
    return line.strip() == "$$$$"


def _iter_sdf(fh, info: InputInfo, opts: ReaderOptions, ordinal: int = 0) -> Iterator[RawRecord]:
    """ordinal: the records before ``fh``'s first line (which starts a record)."""
    block: list[str] = []

    def make(lines: list[str]) -> RawRecord:
        molblock, props = _parse_sdf_block(lines)
        title = lines[0].strip() if lines else ""
        rid = props.get(opts.sdf_id_property) if opts.sdf_id_property else title
        return RawRecord(info.path, ordinal, "molblock", molblock, "".join(lines),
                         (rid or "").strip() or None, props or None)

    for line in fh:
        if is_sdf_terminator(line):
            ordinal += 1
            yield make(block)
            block = []
        elif len(block) >= MAX_SDF_RECORD_LINES:  # not an SDF, or a lost terminator: stay streaming
            ordinal += 1
            yield RawRecord(info.path, ordinal, "molblock", "", "".join(block[:50]), error=(
                "record_too_long", f"no '$$$$' within {MAX_SDF_RECORD_LINES} lines; is this really "
                "an SDF file? (the first 50 lines are in raw; the rest of the record is skipped)"))
            block = []
            for line in fh:  # skip to the next terminator
                if is_sdf_terminator(line):
                    break
        else:
            block.append(line if line.endswith("\n") else line + "\n")
    if any(ln.strip() for ln in block):  # last record without its "$$$$" terminator
        ordinal += 1
        yield make(block)


# each takes (lines, info, opts) and, from a record boundary, the first line's number
# (SMILES, CSV/TSV; CSV: 0 = the header comes first) or the SDF records before it
_READERS = {"smi": _iter_smi, "csv": _iter_delimited, "tsv": _iter_delimited, "sdf": _iter_sdf}
