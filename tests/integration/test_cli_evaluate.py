"""`biogen evaluate` as users run it: help, a small real run (2 targets, few repeats),
resume, and clear errors."""

import csv
import json

from .test_cli import run

SMALL = ["datasets=[DUD]", "targets=[ace,parp]", "n_queries=[5,10]", "repeats=3", "ml_repeats=2",
         "scorers=[sim-ecfp4_1024-max,sim-ecfp4_1024-mean,lr-ecfp4_1024,fused-lr-sim-ecfp4_1024]",
         "runtime=processes", "runtime.workers=2", "runtime.progress=false"]  # no Ray start here (~5 s)


def test_evaluate_help(tmp_path):
    out = run(["evaluate", "--help"], tmp_path).stdout
    assert "Riniker & Landrum" in out and "repeats: 50" in out
    assert "runtime=local|ray_cluster|processes|inline" in out


def test_small_run_writes_tables_plots_and_resumes(tmp_path, vs_benchmark):
    args = ["evaluate", f"data_dir={vs_benchmark}", "output=out", *SMALL]
    run(args, tmp_path)
    out = tmp_path / "out"
    for name in ("evaluate-summary.csv", "evaluate-targets.csv", "evaluate-repeats.csv.gz", "evaluate.md",
                 "evaluate-summary.png", "evaluate-targets.png", "evaluate.json", "notes.csv"):
        assert (out / name).is_file(), name
    with open(out / "evaluate-targets.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["target"], r["scorer"], r["n_queries"]) for r in rows} == {
        (t, s, n) for t in ("ace", "parp") for n in ("5", "10")
        for s in ("sim-ecfp4_1024-max", "sim-ecfp4_1024-mean", "lr-ecfp4_1024", "fused-lr-sim-ecfp4_1024")}
    reps = {r["scorer"]: r["repeats"] for r in rows}
    assert reps["sim-ecfp4_1024-max"] == "3" and reps["lr-ecfp4_1024"] == "2"
    assert all(0.0 <= float(r["auroc"]) <= 1.0 for r in rows)
    md = (out / "evaluate.md").read_text()
    assert "### DUD (2 targets)" in md and "Trained scorers vs the best similarity scorer" in md
    report = json.loads((out / "evaluate.json").read_text())
    assert report["targets"] == 2 and set(report["per_target"]) == {"DUD/ace", "DUD/parp"}
    before = (out / "evaluate-summary.csv").read_text()
    # rerun: both targets come from the ledger, same numbers
    run(args, tmp_path)
    assert (out / "evaluate-summary.csv").read_text() == before
    # other parameters into the same output: refused
    p = run(args[:-1] + ["repeats=4"] + args[-1:], tmp_path, check=False)
    assert p.returncode == 2 and "interrupted job with other parameters" in p.stderr


def test_errors_name_the_key(tmp_path, vs_benchmark):
    p = run(["evaluate", "data_dir=nowhere"], tmp_path, check=False)
    assert p.returncode == 2 and "data_dir='nowhere'" in p.stderr
    p = run(["evaluate", f"data_dir={vs_benchmark}", "scorers=[sim-ecfp5-max]"], tmp_path, check=False)
    assert p.returncode == 2 and "not in scorer_catalog; valid: sim-ecfp4_1024-max" in p.stderr
    p = run(["evaluate", f"data_dir={vs_benchmark}", "targets=[nope]", "datasets=[DUD]"], tmp_path, check=False)
    assert p.returncode == 2 and "targets ['nope'] not found" in p.stderr and "DUD/fxa" in p.stderr
