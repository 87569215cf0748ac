"""`biogen train` as users run it: the default job on a slice of thrombin, a CSV with bad
records, the checkpoint it writes loading for screening, and errors with their exit codes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.standardize import StandardizeSpec
from biogen.datasets import load_moleculeace
from biogen.errors import LibraryError
from biogen.models.data import MoleculeACESource
from biogen.models.qsar import QSARPredictor
from .test_cli import run


def last_run(cwd: Path) -> Path:
    return sorted((cwd / "runs" / "train").iterdir())[-1]


def test_train_default_job_on_a_slice(tmp_path):
    p = run(["train", "train_data.limit=300", "model.max_epochs=3", "output=models/thrombin.ckpt"], tmp_path)
    rd = last_run(tmp_path)
    report = json.loads((rd / "metrics.json").read_text())
    assert report["source"] == "moleculeace:CHEMBL204_Ki" and report["records"] == 300 and report["rejects"] == 0
    assert report["n_train"] + report["n_val"] + report["n_test"] == 300 and report["epochs"] == 3
    for key in ("val_rmse", "val_r2", "test_rmse", "test_r2", "test_auroc"):
        assert isinstance(report["metrics"][key], float), key
    assert (rd / ".hydra" / "config.yaml").is_file() and (rd / "lightning_logs" / "metrics.csv").is_file()
    assert "best epoch" in p.stderr and not (rd / "train_rejects.csv").exists()
    model = QSARPredictor.load(tmp_path / "models" / "thrombin.ckpt")
    assert model.featurizer == FingerprintSpec() and model.standardize == StandardizeSpec().to_dict()
    data = MoleculeACESource(limit=300).load(FingerprintSpec(), StandardizeSpec()).subset("test")
    pred = model.predict(data.fps)
    rmse = float(np.sqrt(((pred - data.y) ** 2).mean()))
    assert rmse == pytest.approx(report["metrics"]["test_rmse"], rel=1e-5)
    with pytest.raises(LibraryError, match="radius: model=2, library=3"):
        model.check_featurizer(FingerprintSpec(radius=3))


def test_train_on_a_csv_rejects_bad_records(tmp_path):
    acts = load_moleculeace("CHEMBL214_Ki")
    path = tmp_path / "acts.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["smiles", "ki_nm", "set"])
        for i in range(160):
            w.writerow([acts.smiles[i], acts.nm[i], acts.split[i]])
        w.writerow(["C1CC(", "10", "train"])  # unclosed ring and branch
        w.writerow(["CCO", "n/a", "train"])
    run(["train", "train_data=file", f"train_data.path={path}", "train_data.value_column=ki_nm",
         "train_data.value_unit=nM", "train_data.split_column=set", "model=qsar_mlp_classifier",
         "model.max_epochs=2", "model.split=random", "featurizer=fcfp4"], tmp_path)
    rd = last_run(tmp_path)
    report = json.loads((rd / "metrics.json").read_text())
    assert report["rejects"] == 2 and report["task"] == "classification" and "test_auroc" in report["metrics"]
    rejects = list(csv.DictReader(open(rd / "train_rejects.csv")))
    assert sorted(r["reason"] for r in rejects) == ["bad_value", "parse_error"]
    assert QSARPredictor.load(rd).featurizer.use_features


def test_train_help_and_errors(tmp_path):
    out = run(["train", "--help"], tmp_path).stdout
    assert "biogen train: train a fingerprint MLP QSAR model" in out
    assert "model=qsar_mlp|qsar_mlp_classifier" in out and "trainer=cpu|cuda" in out
    p = run(["train", "train_data.target=CHEMBL1_Ki"], tmp_path, check=False)
    assert p.returncode == 2 and "unknown MoleculeACE data set 'CHEMBL1_Ki'; known: CHEMBL1862_Ki" in p.stderr
    p = run(["train", "model.hiden=[64]"], tmp_path, check=False)
    assert p.returncode == 2 and "'model.hiden' is not a setting" in p.stderr and "hidden" in p.stderr
    p = run(["train", "model=qsar_mpl"], tmp_path, check=False)
    assert p.returncode != 0 and "qsar_mlp_classifier" in p.stderr  # Hydra lists the options
    p = run(["train", "train_data=file"], tmp_path, check=False)
    assert p.returncode == 2 and "train_data.path is required for train_data=file" in p.stderr
    if not torch.cuda.is_available():
        p = run(["train", "trainer=cuda", "train_data.limit=50"], tmp_path, check=False)
        assert p.returncode == 2 and "trainer.accelerator=cuda but torch" in p.stderr and "sees no CUDA" in p.stderr
        p = run(["train", "trainer=gpu", "train_data.limit=50"], tmp_path, check=False)  # the old word
        assert p.returncode == 2 and "trainer.accelerator=gpu is deprecated" in p.stderr
