"""The hash-partitioned dedupe (biogen.library.dedupe) gives exactly the serial planner's
library: the same rows, ids, ordinals, duplicates and rejects, shard bytes included, for
several partition counts, both dedupe modes, both identity keys, an append against an
existing library, and inputs that need the serial planner (which it falls back to); a full
disk in a dedupe round stops the job, keeps the library and what was done, and resumes."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from biogen.errors import BiogenError, ConfigError
from biogen.library.dedupe import work_tag
from biogen.library.ingest import append_library, build_library
from biogen.library.verify import format_info, library_info
from tests_support import moses_subset, shard_signature

N = 300


def deposit(tmp: Path, name: str, start: int, n: int, *, ids: str = "mixed", repeat_every: int = 7) -> Path:
    """MOSES molecules ``start..start+n`` with every ``repeat_every``-th one repeated later
    (a duplicate within the deposit); ids given on odd lines (``mixed``), all lines
    (``all``: unique), or none."""
    src = moses_subset(start + n, tmp / f"{name}.src.smi", id_prefix="X")
    smiles = [line.split()[0] for line in src.read_text().splitlines()[start:]]
    rows = [(s, f"{name}{i}") for i, s in enumerate(smiles)]
    rows += [(s, f"{name}-again{i}") for i, (s, _) in enumerate(rows) if i % repeat_every == 0]
    lines = []
    for i, (s, rid) in enumerate(rows):
        give = ids == "all" or (ids == "mixed" and i % 2)
        lines.append(f"{s} {rid}" if give else s)
    path = tmp / f"{name}.smi"
    path.write_text("\n".join(lines) + "\n")
    return path


def outcome(lib: Path) -> tuple:
    """Everything the dedupe decides: rows and shard bytes, the rejects file, the counts."""
    m = json.loads((lib / "manifest.json").read_text())
    hist = [(h["records_read"], h["rows_added"], h["duplicates"], h["rejected_by_reason"]) for h in m["history"]]
    rejects = [(lib / h["rejects_file"]).read_text() for h in m["history"]]
    return shard_signature(lib), hist, rejects


def build(tmp_path, name, inp, partitions, rt, **kw):
    out = tmp_path / name
    build_library(str(inp), out, chunk_size=50, runtime=rt, dedupe_partitions=partitions, **kw)
    return out


@pytest.mark.parametrize("mode,key", [("keep_first", "inchikey"), ("keep_all", "smiles")])
def test_partition_counts_give_the_serial_library(tmp_path, inline_rt, mode, key, caplog):
    inp = deposit(tmp_path, "d", 0, N, repeat_every=3)
    serial = outcome(build(tmp_path, "serial", inp, 0, inline_rt, dedupe=mode, dedupe_key=key))
    assert serial[1][0][2] > 80  # the input holds duplicates to decide
    with caplog.at_level(logging.INFO, logger="biogen.library"):
        for p in (1, 3, 8):
            assert outcome(build(tmp_path, f"p{p}", inp, p, inline_rt, dedupe=mode, dedupe_key=key)) == serial, p
    assert "dedupe: 8 key partitions" in caplog.text and "serial planner" not in caplog.text


def test_append_dedupes_against_the_library_by_partition(tmp_path, inline_rt):
    first = deposit(tmp_path, "a", 0, 350)
    second = deposit(tmp_path, "b", 250, 300)  # 100 molecules the library already holds
    libs = {}
    for p in (0, 5):
        lib = build(tmp_path, f"lib{p}", first, p, inline_rt)
        rep = append_library(lib, str(second), chunk_size=50, runtime=inline_rt, dedupe_partitions=p)
        assert rep.duplicates >= 100
        libs[p] = outcome(lib)
    assert libs[5] == libs[0]


def test_appends_split_only_the_segments_the_key_index_lacks(tmp_path, inline_rt, caplog, monkeypatch):
    """The library keeps its keys split by partition per segment of shards (``keyindex/``,
    2 shards per segment here): the second append reuses the first's full segments and
    splits only the last one and the shards added since, a damaged file is rebuilt, another
    P replaces the index. The library equals the serial planner's at every step."""
    from biogen.library import dedupe

    monkeypatch.setattr(dedupe, "SEGMENT_SHARDS", 2)
    deps = [deposit(tmp_path, n, s, 150) for n, s in (("a", 0), ("b", 100), ("c", 200), ("d", 50))]
    serial = build(tmp_path, "serial", deps[0], 0, inline_rt)
    lib = build(tmp_path, "lib", deps[0], 4, inline_rt)  # 4 shards of <= 50 rows
    index = lib / "keyindex" / work_tag(4)

    def append(dep, p):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="biogen.library"):
            for target, part in ((serial, 0), (lib, p)):
                append_library(target, str(dep), chunk_size=50, runtime=inline_rt, dedupe_partitions=part)
        assert outcome(lib) == outcome(serial)
        return caplog.text.split("the library's key index held ")[-1].split(")")[0]

    def segments() -> list[str]:
        return [seg.file for seg in dedupe.index_segments(json.loads((lib / "manifest.json").read_text()))]

    def shards() -> int:
        return len(json.loads((lib / "manifest.json").read_text())["shards"])

    assert not (lib / "keyindex").exists()  # nothing to index before a library has shards
    assert library_info(lib)["key_index"] is None
    first, n1 = segments(), shards()
    assert n1 >= 3
    assert append(deps[1], 4) == f"0 of its {len(first)} segments ({n1} of {n1} shards split now"
    assert sorted(f.name for f in index.iterdir()) == sorted(first[:n1 // 2])  # the partial one was pruned
    info = library_info(lib)
    assert info["key_index"]["partitions"] == 4 and info["key_index"]["bytes"] > 0
    assert (info["key_index"]["segments_indexed"], info["key_index"]["segments"]) == (n1 // 2, len(segments()))
    assert f"key index    4 partitions; {n1 // 2} of {len(segments())} segments indexed" in format_info(info)
    stamp = {f.name: f.stat().st_mtime_ns for f in index.iterdir()}
    second, n2 = segments(), shards()
    kept = [f for f in second if f in stamp]  # the full segments keep their cuts
    assert kept == first[:n1 // 2] and n2 > n1
    assert append(deps[2], 4) == f"{len(kept)} of its {len(second)} segments ({n2 - 2 * len(kept)} of {n2} shards split now"
    assert {f.name: f.stat().st_mtime_ns for f in index.iterdir() if f.name in stamp} == stamp
    (index / first[0]).write_bytes(b"not an index file")  # damaged: rebuilt, not trusted
    third, n3 = segments(), shards()
    full = n2 // 2 - 1
    assert append(deps[3], 4) == f"{full} of its {len(third)} segments ({n3 - 2 * full} of {n3} shards split now"
    append(deposit(tmp_path, "e", 120, 100), 6)  # another P: one index, of that P
    assert [d.name for d in (lib / "keyindex").iterdir()] == [work_tag(6)]
    assert {f.name for f in (lib / "keyindex" / work_tag(6)).iterdir()} <= set(segments())


def test_auto_counts_the_librarys_rows_for_an_append(tmp_path, inline_rt, monkeypatch, caplog):
    """An append of a few records to a large library is partitioned under auto: the serial
    planner would hold all the library's keys (AUTO_RECORDS lowered to test scale)."""
    from biogen.library import dedupe

    monkeypatch.setattr(dedupe, "AUTO_RECORDS", 200)
    lib = build(tmp_path, "lib", deposit(tmp_path, "a", 0, 250), "auto", inline_rt)
    with caplog.at_level(logging.INFO, logger="biogen.library"):
        append_library(lib, str(deposit(tmp_path, "b", 240, 30)), chunk_size=50, runtime=inline_rt,
                       dedupe_partitions="auto")
    assert "key partitions" in caplog.text and "the library's key index held 0 of its" in caplog.text


def test_auto_partitions_keep_to_the_key_index_while_it_is_fine_enough(tmp_path):
    from biogen.library.dedupe import choose_partitions, sticky_partitions

    assert choose_partitions("auto", 1_000_000, 2) == 0
    assert choose_partitions("auto", 2_500_000, 2) == 4 and choose_partitions("auto", 9_000_000, 2) == 9
    assert sticky_partitions("auto", 9, tmp_path) == 9  # no index yet
    (tmp_path / "keyindex" / work_tag(5)).mkdir(parents=True)
    assert sticky_partitions("auto", 9, tmp_path) == 5   # 5 partitions of <= 2 M records still do
    assert sticky_partitions("auto", 11, tmp_path) == 11  # too coarse now: a new index
    assert sticky_partitions(7, 9, tmp_path) == 9 and sticky_partitions("auto", 0, tmp_path) == 0


def test_inputs_that_need_the_serial_planner_fall_back_to_it(tmp_path, inline_rt, caplog):
    inp = deposit(tmp_path, "r", 0, 400, ids="all")
    text = inp.read_text().splitlines()
    # a given id used twice (the second is a duplicate_id reject) and one that looks generated
    text[5] = text[5].split()[0] + " " + text[3].split()[1]
    text[7] = text[7].split()[0] + " BG000000099"
    inp.write_text("\n".join(text) + "\n")
    serial = outcome(build(tmp_path, "serial", inp, 0, inline_rt))
    assert "duplicate_id" in serial[1][0][3]
    with caplog.at_level(logging.WARNING, logger="biogen.library"):
        assert outcome(build(tmp_path, "p4", inp, 4, inline_rt)) == serial
    assert "the serial planner decides this input" in caplog.text


def test_partition_setting_is_checked_before_any_work(tmp_path, inline_rt):
    for bad in (-1, "many", 2.5):
        with pytest.raises(ConfigError, match="dedupe_partitions"):
            build_library(str(tmp_path / "missing.smi"), tmp_path / "x", runtime=inline_rt, dedupe_partitions=bad)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fail_at,step", [(3, "split-n000002"),
                                          pytest.param(11, "decide-b00002", marks=pytest.mark.slow)])
def test_full_disk_in_a_dedupe_round_keeps_the_library_and_resumes(tmp_path, inline_rt, monkeypatch, fail_at, step):
    """An append (7 parts against 2 shards in one key-index segment, 4 partitions): the ``fail_at``-th dedupe file
    written (splits of parts, then of the segment, then decisions) hits a full disk."""
    lib = build(tmp_path, "lib", deposit(tmp_path, "a", 0, 80), 4, inline_rt)  # 2 shards
    second = deposit(tmp_path, "b", 40, 300)
    before = outcome(lib), (lib / "manifest.json").read_text()
    shutil.copytree(lib, tmp_path / "undisturbed")
    append_library(tmp_path / "undisturbed", str(second), chunk_size=50, runtime=inline_rt, dedupe_partitions=4)

    real, calls = pa.ipc.new_file, {"n": 0}

    def full_disk(sink, schema, **kw):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(sink, schema, **kw)

    monkeypatch.setattr(pa.ipc, "new_file", full_disk)
    tag = work_tag(4)
    with pytest.raises(BiogenError, match=rf"shard {tag}-{step}: could not write \S+/{tag}/\S+\.arrow: no space left "
                                          "on the device.*rerun the same command"):
        append_library(lib, str(second), chunk_size=50, runtime=inline_rt, dedupe_partitions=4)
    monkeypatch.undo()
    assert (outcome(lib), (lib / "manifest.json").read_text()) == before  # the library as it was
    events = [json.loads(x) for x in next((lib / "_work").glob("*-append/ledger.jsonl")).read_text().splitlines()[1:]]
    assert [e["key"] for e in events if e.get("event") == "failed"] == [f"{tag}-{step}"]
    done = [e for e in events if "outputs" in e]
    assert sum(e["key"].startswith("map-") for e in done) == 7
    assert sum(len(e["outputs"]) for e in done if e["key"].startswith(tag)) == fail_at - 1  # the files before it
    assert not list((lib / "_work").rglob(".*.tmp*"))  # no half-written file left behind

    report = append_library(lib, str(second), chunk_size=50, runtime=inline_rt, dedupe_partitions=4)
    assert report.resumed_shards == len(done)
    assert outcome(lib) == outcome(tmp_path / "undisturbed")
