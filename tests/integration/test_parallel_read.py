"""Tasks that read byte ranges of the inputs (reader.parallel=true) make the same library,
byte for byte, as the driver reading every record (reader.parallel=false): shard hashes,
rejects file and counts, for SMILES, CSV/TSV, SDF and gzip inputs, with chunks that span
ranges and files, on runtime=inline and on Ray; and a failed build resumes to it."""

import gzip
import json
import logging
import random

import pytest
from rdkit import Chem

from biogen.chem import ranges
from biogen.chem.ranges import ChunkPlan, count_unit, counted, plan_chunks, plan_units
from biogen.chem.readers import ReaderOptions, inspect_input, iter_records
from biogen.errors import ConfigError, InputError
from biogen.library.ingest import append_library, build_library
from biogen.library.reading import tasks_read
from tests_support import moses_subset, shard_signature

MIB = 2**20


def _reader(parallel: bool, range_bytes: int = 8 * MIB, **kw) -> ReaderOptions:
    return ReaderOptions(parallel=parallel, range_mb=range_bytes / MIB, **kw)


def _library(lib) -> tuple:
    """Everything that must not depend on who read the inputs."""
    m = json.loads((lib / "manifest.json").read_text())
    counts = [{k: h[k] for k in ("records_read", "rows_added", "duplicates", "rejected", "rejected_by_reason",
                                 "shards")} for h in m["history"]]
    rejects = {p.name: p.read_text() for p in sorted((lib / "rejects").glob("*.csv"))}
    return shard_signature(lib), m["rejected_total"], counts, rejects


def _both(tmp_path, inputs, *, chunk_size, range_bytes, runtime, name="lib", **kw) -> tuple:
    """Build from ``inputs`` with the driver reading and with the tasks reading; return
    the library (which must be the same) after checking that it is."""
    inputs = [str(p) for p in inputs]
    serial = build_library(inputs, tmp_path / f"{name}-serial", chunk_size=chunk_size,
                           reader=_reader(False, **kw), runtime=runtime)
    tasks = build_library(inputs, tmp_path / f"{name}-tasks", chunk_size=chunk_size,
                          reader=_reader(True, range_bytes, **kw), runtime=runtime)
    assert tasks.records_read == serial.records_read > 0
    ref = _library(tmp_path / f"{name}-serial")
    assert _library(tmp_path / f"{name}-tasks") == ref
    return ref


def _shape(inputs, chunk_size, range_bytes, **kw) -> tuple[int, int]:
    """(byte ranges holding records, chunks) of the plan: proves the tests cut as they say
    (the parts of ranges between marks, which the map tasks read)."""
    opts = _reader(True, range_bytes, **kw)
    infos = [inspect_input(p, opts) for p in inputs]
    units = plan_units(infos, range_bytes, chunk_size)
    cu = counted(units, {u.key: count_unit(u, opts, "unused")[1] for u in units})
    return sum(1 for u in cu if u.records), -(-sum(u.records for u in cu) // chunk_size)


def _messy_smi(path, n, seed=0):
    """MOSES molecules with invalid SMILES, blank, blank-looking and comment lines, CRLF
    line ends, a non-breaking space and no newline at the end."""
    rng = random.Random(seed)
    lines = ["# deposit of lab B", ""]
    for i, line in enumerate(moses_subset(n, path).read_text().splitlines()):
        lines.append(line)
        k = rng.random()
        if k < 0.05:
            lines.append(f"C1CC( broken-{i}")
        elif k < 0.08:
            lines.append("")
        elif k < 0.10:
            lines.append("   # indented comment")
        elif k < 0.12:
            lines.append("\u00a0")  # blank to str.strip, not to a byte scan
        elif k < 0.14:
            lines.append(f"  CCO indented-{i}")
    path.write_bytes(("\n".join(lines[:-20]) + "\r\n" + "\r\n".join(lines[-20:])).encode())
    return path


@pytest.mark.parametrize("chunk_size,range_bytes,shape", [(25, 64, "ranges per chunk"), (7, 2048, "chunks per range")])
def test_smi_with_rejects_blank_and_comment_lines(tmp_path, inline_rt, monkeypatch, chunk_size, range_bytes, shape):
    if shape == "chunks per range":
        monkeypatch.setattr(ranges, "MARKS", 1)  # a map task reads a whole range: it skips records in it
    smi = _messy_smi(tmp_path / "deposit.smi", 300)
    n_ranges, n_chunks = _shape([smi], chunk_size, range_bytes)
    assert (n_ranges >= 3 * n_chunks) if shape == "ranges per chunk" else (n_chunks >= 3 * n_ranges)
    _, rejected, counts, rejects = _both(tmp_path, [smi], chunk_size=chunk_size, range_bytes=range_bytes,
                                         runtime=inline_rt)
    assert counts[0]["rejected_by_reason"]["parse_error"] > 5 and "broken-" in rejects["000-build.csv"]


@pytest.mark.ray
def test_chunks_span_files_on_ray(tmp_path, data_dir, ray_rt, inline_rt, caplog):
    """Several inputs, chunks across file boundaries, a quoted CSV (its fields on one line:
    cut like any file); tasks on Ray (2 workers) against the driver reading, and an append
    the same way."""
    a = _messy_smi(tmp_path / "a.smi", 150, seed=1)
    b = moses_subset(40, tmp_path / "b.smi", id_prefix="B")
    inputs = [a, data_dir / "mixed.smi", b, data_dir / "compounds.csv", data_dir / "small.sdf"]
    serial = build_library([str(p) for p in inputs], tmp_path / "serial", chunk_size=13, runtime=inline_rt,
                           reader=_reader(False))
    with caplog.at_level(logging.INFO, logger="biogen.chem.ranges"):
        tasks = build_library([str(p) for p in inputs], tmp_path / "tasks", chunk_size=13, runtime=ray_rt,
                              reader=_reader(True, 300))
    assert "compounds.csv" not in caplog.text and "read whole" not in caplog.text
    assert tasks.records_read == serial.records_read > 200
    assert _library(tmp_path / "tasks") == _library(tmp_path / "serial")

    new = _messy_smi(tmp_path / "new.smi", 60, seed=2)
    append_library(tmp_path / "serial", [str(new), str(b)], chunk_size=9, runtime=inline_rt, reader=_reader(False))
    append_library(tmp_path / "tasks", [str(new), str(b)], chunk_size=9, runtime=ray_rt, reader=_reader(True, 200))
    assert _library(tmp_path / "tasks") == _library(tmp_path / "serial")


def test_csv_and_tsv_with_header(tmp_path, inline_rt):
    mols = moses_subset(120, tmp_path / "m.smi").read_text().split("\n")
    rows = ["", "  ", "# smiles,id,note"]  # blank lines, then a header with a leading '#'
    for i, line in enumerate(m for m in mols if m):
        smi, rid = line.split()
        rows.append(f"{smi},{rid},n{i}")
        if i % 17 == 0:
            rows += [f"{smi},{rid}", f",empty-{i},x", "", " , ", "\u00a0", f"C1CC(,bad-{i},x"]
    csv_file = tmp_path / "deposit.csv"
    csv_file.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    tsv_file = tmp_path / "deposit.tsv"
    tsv_file.write_text("\n".join(r.replace(",", "\t") for r in rows[2:]))  # '#' header, no newline at the end
    _, _, counts, _ = _both(tmp_path, [csv_file, tsv_file], chunk_size=11, range_bytes=100, runtime=inline_rt)
    assert {"field_count", "empty_smiles", "parse_error"} <= set(counts[0]["rejected_by_reason"])


def test_quoted_csv_is_cut_unless_a_quoted_field_spans_lines(tmp_path, inline_rt, caplog):
    """A CSV with quoted fields on one line each is cut into ranges like any file; one
    where a quoted field runs over several lines (found by the counting tasks) is read
    whole by one task in a second round, and the library is the serial reader's either way."""
    mols = [m.split() for m in moses_subset(150, tmp_path / "m.smi").read_text().split("\n") if m]
    rows = ["smiles,id,note"] + [f'{smi},{rid},"note {i}, with a comma"' for i, (smi, rid) in enumerate(mols)]
    quoted = tmp_path / "quoted.csv"
    quoted.write_text("\n".join(rows) + "\n")
    n_ranges, _ = _shape([quoted], 10, 500)
    assert n_ranges >= 8
    with caplog.at_level(logging.INFO, logger="biogen.library"):
        _both(tmp_path, [quoted], chunk_size=10, range_bytes=500, runtime=inline_rt, name="quoted")
    assert "read whole" not in caplog.text
    rows[120] = rows[120].replace('"note', '"two-line\nnote')  # one field over two lines, in a late range
    spans = tmp_path / "spans.csv"
    spans.write_text("\n".join(rows) + "\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="biogen.library"):
        _, _, counts, _ = _both(tmp_path, [quoted, spans], chunk_size=10, range_bytes=500, runtime=inline_rt,
                                name="spans")
    assert f"input {spans} is a CSV with a quoted field over several lines: read whole" in caplog.text
    assert str(quoted) not in caplog.text  # the other file is still cut
    assert counts[0]["records_read"] == 2 * 150


def test_sdf_with_a_malformed_record(tmp_path, data_dir, inline_rt):
    mols = [Chem.MolFromSmiles(line.split()[0]) for line in moses_subset(60, tmp_path / "m.smi").read_text().split("\n")
            if line]
    blocks = []
    for i, mol in enumerate(mols):
        mol.SetProp("_Name", f"S{i}")
        block = Chem.MolToMolBlock(mol) + f"> <vendor>\nV{i % 3}\n\n"
        if i == 17:  # the bond block cut short: a parse error
            lines = block.split("\n")
            end = lines.index("M  END")
            block = "\n".join(lines[:end - 3] + lines[end:])
        blocks.append(block + ("$$$$\r\n" if i % 7 == 0 else " $$$$\n" if i % 11 == 0 else "$$$$\n"))
    sdf = tmp_path / "deposit.sdf"
    sdf.write_text("".join(blocks) + (data_dir / "small.sdf").read_text().rstrip().removesuffix("$$$$"))
    n_ranges, n_chunks = _shape([sdf], 8, 1500)
    assert n_ranges > n_chunks > 1
    _, _, counts, rejects = _both(tmp_path, [sdf], chunk_size=8, range_bytes=1500, runtime=inline_rt)
    assert counts[0]["records_read"] == 64 and counts[0]["rejected_by_reason"]["parse_error"] >= 2


def test_gzip_is_read_whole_by_one_task_and_a_cut_one_is_reported(tmp_path, data_dir, inline_rt, caplog):
    smi = _messy_smi(tmp_path / "m.smi", 150)
    gz = tmp_path / "deposit.smi.gz"
    gz.write_bytes(gzip.compress(smi.read_bytes()))
    cut = tmp_path / "cut.smi.gz"
    cut.write_bytes(gzip.compress(smi.read_bytes() * 3)[:-2000])
    with caplog.at_level(logging.INFO, logger="biogen.chem.ranges"):
        _, _, counts, rejects = _both(tmp_path, [data_dir / "mixed.smi", gz, cut], chunk_size=16, range_bytes=128,
                                      runtime=inline_rt)
    assert f"input {gz} is gzip-compressed: read whole by one task" in caplog.text
    assert counts[0]["rejected_by_reason"]["truncated_input"] == 1 and "cut.smi.gz" in rejects["000-build.csv"]


def test_failed_parallel_build_resumes_to_the_same_library(tmp_path, inline_rt, monkeypatch):
    smi = _messy_smi(tmp_path / "deposit.smi", 200)
    ref = _both(tmp_path, [smi], chunk_size=20, range_bytes=512, runtime=inline_rt, name="ref")

    read, calls = ChunkPlan.read, []

    def dies_at_the_fourth_chunk(self):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("node lost")
        return read(self)

    monkeypatch.setattr(ChunkPlan, "read", dies_at_the_fourth_chunk)
    out = tmp_path / "resumed"
    with pytest.raises(OSError, match="node lost"):
        build_library([str(smi)], out, chunk_size=20, reader=_reader(True, 512), runtime=inline_rt)
    monkeypatch.setattr(ChunkPlan, "read", read)
    lines = (out / "_work" / "000-build" / "ledger.jsonl").read_text().splitlines()
    done = [e["key"] for e in map(json.loads, lines) if "outputs" in e]  # shard entries, events aside
    n_counted = sum(k.startswith("count-") for k in done)
    assert n_counted > 3 and [k for k in done if k.startswith("map-")] == ["map-000000", "map-000001", "map-000002"]
    # resumed by the driver reading (same job, same map parts): the count round is not even needed
    rep = build_library([str(smi)], out, chunk_size=20, reader=_reader(False), runtime=inline_rt)
    assert rep.resumed_shards == n_counted + 3
    assert _library(out) == ref
    # and the same build with the tasks reading is the one already made
    assert build_library([str(smi)], out, chunk_size=20, reader=_reader(True, 512), runtime=inline_rt).already_done


def test_reader_settings_and_auto(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="reader.parallel='sometimes' is not valid; choose auto, true or false"):
        ReaderOptions(parallel="sometimes")
    with pytest.raises(ConfigError, match="reader.range_mb=0 must be > 0"):
        ReaderOptions(range_mb=0)
    assert ReaderOptions(parallel="true").parallel is True and ReaderOptions(parallel="False").parallel is False
    assert ReaderOptions(parallel=True, range_mb=1).identity() == ReaderOptions().identity()
    info = inspect_input(data_dir / "mixed.smi", ReaderOptions())
    assert not tasks_read([info], ReaderOptions())  # auto: a small input is read by the driver
    big = type(info)(**{**info.__dict__, "records_estimate": 5_000_000})
    assert tasks_read([big], ReaderOptions()) and not tasks_read([big], ReaderOptions(parallel=False))
    big_gz = type(info)(**{**big.__dict__, "gzip": True})  # one task would read it all before any featurizing
    assert not tasks_read([big_gz], ReaderOptions()) and tasks_read([big_gz, big_gz], ReaderOptions())
    assert tasks_read([big_gz], ReaderOptions(parallel=True))


def test_a_file_changed_under_the_build_is_an_error(tmp_path):
    smi = moses_subset(50, tmp_path / "m.smi")
    opts = _reader(True, 200)
    units = plan_units([inspect_input(smi, opts)], 200, 10)
    cu = counted(units, {u.key: count_unit(u, opts, str(tmp_path))[1] for u in units})
    plans = [plan for _, plan in plan_chunks(cu, 10, str(tmp_path), opts)]
    assert [r for p in plans for r in p.read()] == list(iter_records(inspect_input(smi, opts), opts))
    smi.write_bytes(smi.read_bytes()[:-300])
    with pytest.raises(InputError, match=r"m.smi changed while it was read: expected \d+ bytes at offset \d+, got"):
        plans[-1].read()


def _random_lines(rng, n, kind):
    eol = ["\n", "\r\n", "\r"]
    lines = [f"smiles{kind}id{kind}x"] if kind != "smi" else []
    pool = ["", "   ", "# c", "\u00a0", "\u00a0# c", "\x0c", "\t#x", "é€ 1", f"{kind}{kind}", f" {kind}",
            f"CCO{kind}two", "#CCO"]
    for i in range(n):
        body = rng.choice(pool) if rng.random() < 0.3 else f"C{'C' * rng.randrange(4)}O{' ' if kind == 'smi' else kind}i{i}"
        lines.append(body + (rng.choice(eol) if rng.random() < 0.2 else "\n"))
    text = "".join(lines)
    return ("\ufeff" if rng.random() < 0.2 else "") + (text.rstrip("\r\n") if rng.random() < 0.5 else text)


def _random_sdf(rng, n):
    ends = ["$$$$\n", "$$$$\r\n", " $$$$ \n", "$$$$\r", "\u00a0$$$$\n", "$$$$$$$$\n", "x$$$$\n"]
    out = [f"m{i}\n\n\n  0  0  0  0  0  0  0  0  0  0999 V2000\nM  END\n> <p>\nv{i}\n\n" + rng.choice(ends)
           for i in range(n)]
    return "".join(out) + rng.choice(["", "tail\nM  END\n", "\n \n"])


def test_byte_scans_agree_with_the_reader_on_random_files(tmp_path, monkeypatch):
    """The counting and reading tasks, run in-process on random files with every kind of
    line end, blank-looking line and terminator, against ``iter_records``."""
    rng = random.Random(7)
    for trial in range(120):
        kind = rng.choice(["smi", ",", "\t", "sdf"])
        suffix = {"smi": "smi", ",": "csv", "\t": "tsv", "sdf": "sdf"}[kind]
        path = tmp_path / f"t{trial}.{suffix}"
        path.write_bytes((_random_sdf(rng, rng.randrange(15)) if kind == "sdf"
                          else _random_lines(rng, rng.randrange(40), kind)).encode())
        opts = ReaderOptions(smi_header=rng.random() < 0.2)
        info = inspect_input(path, opts)
        ref = list(iter_records(info, opts))
        for range_bytes in (1, 5, 40, 1000):
            size = rng.choice([1, 3, 50])
            monkeypatch.setattr(ranges, "MARKS", rng.choice([1, 3, 16]))
            units = plan_units([info], range_bytes, size)
            cu = counted(units, {u.key: count_unit(u, opts, str(tmp_path))[1] for u in units})
            got = [r for _, plan in plan_chunks(cu, size, str(tmp_path), opts) for r in plan.read()]
            assert got == ref, (path.read_bytes()[:200], range_bytes, size, ranges.MARKS)
