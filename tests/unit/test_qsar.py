"""QSAR models: bit lists, metrics against scikit-learn, splits, Lightning smoke/overfit
runs, checkpoints (round trip, weights_only, refusals), training-data sources, configs."""

import pickle
import time

import numpy as np
import pytest
import torch

from biogen.chem.fingerprints import Fingerprinter, FingerprintSpec, pack_bits, unpack_bits
from biogen.chem.standardize import StandardizeSpec
from biogen.cli.config import from_config
from biogen.cli.train import TrainerSpec
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.models.data import (ActivityFileSource, MoleculeACESource, bit_indices, murcko_scaffolds,
                                split_indices, training_source)
from biogen.models.predictor import QSARNet
from biogen.models.qsar import QSARModule, QSARPredictor, QSARSpec, auroc, fit_qsar, qsar_metrics
from tests_support import compose_config

ECFP4 = FingerprintSpec()
FAST = dict(hidden=(64,), max_epochs=3, batch_size=64)


@pytest.fixture(scope="module")
def thrombin():
    """The first 300 MoleculeACE thrombin (CHEMBL204_Ki) records, featurized as a library is."""
    return MoleculeACESource(limit=300).load(ECFP4, StandardizeSpec())


@pytest.fixture(scope="module")
def trained(thrombin, tmp_path_factory):
    tr, te = thrombin.subset("train"), thrombin.subset("test")
    out = tmp_path_factory.mktemp("qsar")
    p = fit_qsar(tr.fps, tr.y, QSARSpec(**FAST), ECFP4, smiles=tr.smiles, out_dir=out, test=(te.fps, te.y),
                 logger=True)
    return p, out


# --- kernels and metrics against oracles ---------------------------------------------------


@pytest.mark.parametrize("nbits,density", [(64, 0.5), (2048, 0.02), (192, 0.0), (1024, 1.0)])
def test_bit_indices_match_numpy(nbits, density):
    rng = np.random.default_rng(nbits)
    bits = (rng.random((37, nbits)) < density).astype(np.uint8)
    idx, offsets = bit_indices(pack_bits(bits))
    rows, cols = np.nonzero(bits)
    assert np.array_equal(idx, cols)
    assert np.array_equal(offsets, np.searchsorted(rows, np.arange(len(bits))))


def test_metrics_match_sklearn():
    from sklearn.metrics import mean_squared_error, r2_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.normal(7, 1.5, 500)
    pred = np.round(y + rng.normal(0, 0.8, 500), 1)  # rounded: ties
    m = qsar_metrics(pred, y, "regression", 7.0)
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, pred)), rel=1e-12)
    assert m["r2"] == pytest.approx(r2_score(y, pred), rel=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y >= 7.0, pred), rel=1e-12)
    labels = rng.random(300) < 0.1
    scores = np.round(rng.random(300) + labels * 0.3, 1)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert np.isnan(auroc(np.zeros(5, bool), np.arange(5.0)))


# --- splits --------------------------------------------------------------------------------


def test_scaffold_split_keeps_scaffolds_apart(thrombin):
    tr, va = split_indices(len(thrombin), "scaffold", 0.2, 0, thrombin.smiles)
    assert len(tr) + len(va) == len(thrombin) and not set(tr) & set(va)
    assert abs(len(va) - 0.2 * len(thrombin)) <= 0.05 * len(thrombin)
    scaf = murcko_scaffolds(thrombin.smiles)
    assert not {scaf[i] for i in tr} & {scaf[i] for i in va}
    again = split_indices(len(thrombin), "scaffold", 0.2, 0, thrombin.smiles)
    assert np.array_equal(again[1], va)  # seeded
    assert not np.array_equal(split_indices(len(thrombin), "scaffold", 0.2, 1, thrombin.smiles)[1], va)


def test_random_split_and_bad_settings():
    tr, va = split_indices(100, "random", 0.1, 3)
    assert len(va) == 10 and sorted(np.r_[tr, va]) == list(range(100))
    assert len(split_indices(100, "random", 0.0, 0)[1]) == 0
    with pytest.raises(ConfigError, match="model.split='cluster' is not valid"):
        split_indices(100, "cluster", 0.1, 0)
    with pytest.raises(ConfigError, match="needs the SMILES"):
        split_indices(100, "scaffold", 0.1, 0)
    with pytest.raises(InputError, match="model.split=random"):
        split_indices(10, "scaffold", 0.2, 0, ["c1ccccc1C"] * 10)  # one scaffold


# --- Lightning runs ------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_fast_dev_run(thrombin, task):
    tr = thrombin.subset("train")
    p = fit_qsar(tr.fps, tr.y, QSARSpec(task=task, **FAST), ECFP4, smiles=tr.smiles,
                 trainer_kwargs={"fast_dev_run": True})
    out = p.predict(tr.fps)
    assert out.dtype == np.float32 and out.shape == (len(tr),) and np.isfinite(out).all()
    if task == "classification":
        assert ((out >= 0) & (out <= 1)).all() and "val_auroc" in p.metrics


def test_overfits_32_molecules(thrombin):
    tr = thrombin.subset("train")
    fps, y = tr.fps[:32], tr.y[:32]
    spec = QSARSpec(hidden=(256,), dropout=0.0, lr=3e-3, weight_decay=0.0, batch_size=32, max_epochs=200,
                    val_fraction=0.0, split="random")
    p = fit_qsar(fps, y, spec, ECFP4)
    rmse = qsar_metrics(p.predict(fps), y, "regression", 7.0)["rmse"]
    assert rmse < 0.05, rmse  # the targets spread over ~4 pKi units
    assert p.info["epochs"] == 200 and p.info["best_epoch"] == -1 and p.info["n_val"] == 0


def test_training_is_seeded(thrombin):
    tr = thrombin.subset("train")
    runs = [fit_qsar(tr.fps, tr.y, QSARSpec(**FAST, split="random"), ECFP4).predict(tr.fps) for _ in range(2)]
    assert np.array_equal(*runs)


def test_trained_model_reports_metrics_and_learns(trained, thrombin):
    p, out = trained
    for key in ("val_rmse", "val_r2", "val_auroc", "test_rmse", "test_r2", "test_auroc"):
        assert key in p.metrics
    te = thrombin.subset("test")
    assert p.metrics["test_rmse"] == pytest.approx(qsar_metrics(p.predict(te.fps), te.y, "regression", 7)["rmse"])
    assert p.metrics["test_rmse"] < np.std(te.y)  # better than predicting the mean
    assert p.checkpoint == out / "model.ckpt"
    logged = (out / "lightning_logs" / "metrics.csv").read_text().splitlines()[0]
    assert "val_loss" in logged and "val_rmse" in logged and "test_r2" in logged


def test_classifier_uses_labels_or_threshold(thrombin):
    tr = thrombin.subset("train")
    spec = QSARSpec(task="classification", **FAST, split="random")
    p = fit_qsar(tr.fps, tr.y, spec, ECFP4)
    fit_rows, _ = split_indices(len(tr), "random", 0.1, 0, labels=(tr.y >= 7.0))  # stratified
    n_pos = (tr.y[fit_rows] >= 7.0).sum()
    assert p.module.hparams.pos_weight == pytest.approx((len(fit_rows) - n_pos) / n_pos)
    labels = (tr.y >= 7.0).astype(np.float32)
    assert np.array_equal(fit_qsar(tr.fps, labels, spec, ECFP4).predict(tr.fps), p.predict(tr.fps))
    with pytest.raises(InputError, match="no actives"):
        fit_qsar(tr.fps, np.full(len(tr), 5.0), spec, ECFP4)


def test_small_fit_is_fast():
    """The evaluate benchmark's shape: 20 actives + 400 decoys, thousands of times."""
    rng = np.random.default_rng(0)
    fps = pack_bits((rng.random((420, 2048)) < 0.025).astype(np.uint8))
    y = np.r_[np.ones(20), np.zeros(400)]
    spec = QSARSpec(task="classification", split="random")
    fit_qsar(fps, y, spec, ECFP4)
    t = time.perf_counter()
    fit_qsar(fps, y, spec, ECFP4)
    assert time.perf_counter() - t < 5.0  # ~0.3 s on 2 idle cores; loose for a shared CI box


# --- prediction, checkpoints, refusals -----------------------------------------------------


def test_sparse_cpu_path_equals_dense_forward(trained, thrombin):
    p, _ = trained
    with torch.inference_mode():
        dense = p.module.to_output(p.module(torch.from_numpy(thrombin.fps.view(np.uint8)))).numpy()
    sparse = p.predict(thrombin.fps, batch_size=7)  # several batches
    np.testing.assert_allclose(sparse, dense, atol=1e-5)
    assert p.predict(thrombin.fps[:0]).shape == (0,)


def test_save_load_round_trip(trained, thrombin, tmp_path):
    p, out = trained
    q = QSARPredictor.load(out / "model.ckpt")
    assert np.array_equal(q.predict(thrombin.fps), p.predict(thrombin.fps))
    assert q.featurizer == ECFP4 and q.task == "regression" and q.spec == QSARSpec(**FAST)
    assert q.metrics == pytest.approx(p.metrics) and q.standardize is None
    assert QSARPredictor.load(out).checkpoint == out / "model.ckpt"  # a run directory works too
    ckpt = torch.load(out / "model.ckpt", weights_only=True)  # nothing but tensors and containers
    hp = ckpt["hyper_parameters"]
    assert hp["featurizer"] == ECFP4.to_dict() and hp["y_std"] > 0 and "rdkit" in hp["versions"]
    assert ckpt["epoch"] == p.info["best_epoch"] and ckpt["biogen"]["format_version"] == 1
    lm = QSARModule.load_from_checkpoint(out / "model.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(lm.input.weight, q.module.input.weight)  # a plain Lightning checkpoint too
    again = q.save(tmp_path / "sub" / "copy.ckpt")
    assert np.array_equal(QSARPredictor.load(again).predict(thrombin.fps[:20]), p.predict(thrombin.fps[:20]))


def test_featurizer_mismatch_is_refused(trained):
    p, _ = trained
    p.check_featurizer(FingerprintSpec())
    with pytest.raises(LibraryError) as e:
        p.check_featurizer(FingerprintSpec(radius=3, use_chirality=True), what="library")
    msg = str(e.value)
    assert "radius: model=2, library=3" in msg and "use_chirality: model=False, library=True" in msg
    assert "biogen train featurizer.radius=3 featurizer.use_chirality=true" in msg
    assert "biogen library build featurizer.radius=2 featurizer.use_chirality=false" in msg
    maccs = Fingerprinter(FingerprintSpec(type="maccs")).compute([])
    with pytest.raises(InputError, match="N x 32"):
        p.predict(maccs)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(InputError, match=r"not found: .*nope.ckpt; train one with `biogen train output="):
        QSARPredictor.load(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(InputError, match="is not a biogen QSAR checkpoint"):
        QSARPredictor.load(tmp_path / "text.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(InputError, match="not a biogen QSAR checkpoint"):
        QSARPredictor.load(tmp_path / "other.ckpt")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))
    with open(tmp_path / "evil.ckpt", "wb") as fh:
        pickle.dump({"biogen": Evil()}, fh)
    with pytest.raises(InputError, match="weights_only=True"):
        QSARPredictor.load(tmp_path / "evil.ckpt")


def test_gpu_without_cuda_is_a_config_error(thrombin):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present (tests/gpu/test_qsar_gpu.py trains on it)")
    for word in ("cuda", "gpu"):  # gpu: the old word, same meaning
        with pytest.raises(ConfigError, match=f"trainer.accelerator={word} but torch .* sees no CUDA device.*"
                                              "use trainer.accelerator=cpu"):
            fit_qsar(thrombin.fps, thrombin.y, QSARSpec(**FAST), ECFP4, smiles=thrombin.smiles, accelerator=word)
    with pytest.raises(ConfigError, match="trainer.accelerator='tpu' is not valid; choose one of auto, cpu, cuda"):
        fit_qsar(thrombin.fps, thrombin.y, QSARSpec(**FAST), ECFP4, accelerator="tpu")


def test_spec_validation():
    with pytest.raises(ConfigError, match="model.task='regresion' is not valid"):
        QSARSpec(task="regresion")
    assert QSARSpec(hidden=[32, 16]).hidden == (32, 16)
    with pytest.raises(ConfigError, match="model.hidden"):
        QSARSpec(hidden=[])


# --- training data sources -----------------------------------------------------------------


def test_activity_file_rejects_and_converts(tmp_path):
    path = tmp_path / "acts.csv"
    path.write_text("SMILES,ki_nm,set\n"
                    "CCO,100,train\n"
                    "c1ccccc1O,1000,test\n"
                    "not_a_smiles,10,train\n"
                    "CCN,abc,train\n"
                    "CCC,-5,train\n"
                    "CCCl,10,valid\n"
                    "CC(=O)O,1,train\n")
    src = ActivityFileSource(path=str(path), value_column="ki_nm", value_unit="nM", split_column="set")
    d = src.load(ECFP4, StandardizeSpec())
    assert d.smiles == ["CCO", "Oc1ccccc1", "CC(=O)O"] and d.split == ["train", "test", "train"]
    np.testing.assert_allclose(d.y, [7.0, 6.0, 9.0], atol=1e-6)
    assert sorted(r.reason for r in d.rejects) == ["bad_split", "bad_value", "bad_value", "parse_error"]
    assert d.n_in == 7 and d.fps.shape == (3, 32)
    assert np.array_equal(unpack_bits(d.fps[:1], 2048), unpack_bits(Fingerprinter(ECFP4).compute(
        [__import__("rdkit.Chem", fromlist=["Chem"]).MolFromSmiles("CCO")]), 2048))
    with pytest.raises(InputError, match=r"column 'pki' \(train_data.value_column\) is not in the header"):
        ActivityFileSource(path=str(path), value_column="pki").load(ECFP4, StandardizeSpec())
    cfg = compose_config("train", "train_data=file", f"train_data.path={path}", "++train_data.valu_column=x")
    with pytest.raises(ConfigError, match=r"unknown train_data key\(s\) \['valu_column'\]; valid keys: source, path"):
        from_config(cfg.train_data, "train_data")
    with pytest.raises(ConfigError, match="train_data=kiba holds drug-target pairs: train it with model=dti"):
        training_source(from_config(compose_config("train", "train_data=kiba", "train_data.path=x").train_data,
                                    "train_data"))
    with pytest.raises(ConfigError, match="value_unit='mM' is not valid"):
        ActivityFileSource(path=str(path), value_unit="mM")


def test_moleculeace_source(thrombin):
    assert len(thrombin) == 300 and thrombin.source == "moleculeace:CHEMBL204_Ki"
    assert set(thrombin.split) == {"train", "test"} and thrombin.fps.shape == (300, 32)
    with pytest.raises(InputError, match="unknown MoleculeACE data set 'CHEMBL0_Ki'; known: CHEMBL"):
        MoleculeACESource(target="CHEMBL0_Ki").load(ECFP4, StandardizeSpec())


# --- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["qsar_mlp", "qsar_mlp_classifier"])
@pytest.mark.parametrize("trainer", ["cpu", "cuda", "gpu"])
@pytest.mark.parametrize("data", ["moleculeace", "file"])
def test_train_config_groups_instantiate(model, trainer, data):
    cfg = compose_config("train", f"model={model}", f"trainer={trainer}", f"train_data={data}",
                         "train_data.path=x.csv" if data == "file" else "train_data.limit=5")
    spec = from_config(cfg.model, "model")
    assert spec.task == ("regression" if model == "qsar_mlp" else "classification")
    assert spec == QSARSpec(task=spec.task)  # the yaml defaults are the dataclass defaults
    assert from_config(cfg.trainer, "trainer") == TrainerSpec(trainer)
    src = training_source(from_config(cfg.train_data, "train_data"))
    assert src.source == data
    assert from_config(cfg.featurizer, "featurizer") == ECFP4


def test_random_split_is_stratified_for_classification():
    from biogen.models.data import split_indices

    labels = np.array([1] * 12 + [0] * 388)  # few actives, as in a benchmark draw
    tr, va = split_indices(400, "random", 0.1, 0, labels=labels)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 400
    assert labels[va].sum() == 1 and labels[tr].sum() == 11  # round(0.1 * 12) = 1 active validates
    tr2, va2 = split_indices(400, "random", 0.1, 0, labels=np.array([1] * 3 + [0] * 397))
    assert np.array([1] * 3 + [0] * 397)[va2].sum() == 1  # at least one when a class has >= 2


def test_training_inside_a_multi_node_slurm_job_stays_single_process(thrombin, monkeypatch):
    """In `slurm/ray_cluster.sbatch` the driver runs in a batch step of a multi-node job
    (SLURM_NTASKS = nodes). Lightning would take that for a SLURM-launched DDP job and wait
    for the other ranks; biogen trains in one process, whatever SLURM says."""
    for k, v in {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "ray_cluster.sbatch", "SLURM_JOB_ID": "4242",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "4",
                 "SLURM_NTASKS_PER_NODE": "1"}.items():
        monkeypatch.setenv(k, v)
    tr = thrombin.subset("train")
    p = fit_qsar(tr.fps[:64], tr.y[:64], QSARSpec(**FAST), ECFP4, smiles=tr.smiles[:64],
                 trainer_kwargs={"fast_dev_run": True})
    assert np.isfinite(p.predict(tr.fps[:8])).all()


def test_inference_needs_no_lightning(tmp_path, thrombin):
    """Screen workers only load and predict: biogen.models.predictor must not import
    Lightning (~4 s per worker), and a checkpoint loads there with the same predictions."""
    import subprocess
    import sys

    tr = thrombin.subset("train")
    p = fit_qsar(tr.fps[:200], tr.y[:200], QSARSpec(**FAST), ECFP4, smiles=tr.smiles[:200], out_dir=tmp_path)
    assert type(p.module).__name__ == "QSARNet"  # no Lightning module past training
    np.save(tmp_path / "fps.npy", tr.fps[:50])
    np.save(tmp_path / "ref.npy", p.predict(tr.fps[:50]))
    code = f"""
import sys, numpy as np
from biogen.models.predictor import QSARPredictor
q = QSARPredictor.load({str(tmp_path / 'model.ckpt')!r})
out = q.predict(np.load({str(tmp_path / 'fps.npy')!r}))
assert np.allclose(out, np.load({str(tmp_path / 'ref.npy')!r}), atol=1e-6), "predictions differ"
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'lightning_fabric'))
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# --- reduced precision (biogen.precision's shared plan and gate) ----------------------------


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_reduced_precision_runs_the_hidden_layers_reduced_and_the_score_layer_in_float32(thrombin, dtype):
    torch.manual_seed(0)
    p = QSARPredictor(QSARNet(2048, [256, 128], task="regression", featurizer=ECFP4.to_dict(), y_mean=6.0,
                              y_std=1.5))
    q = p.with_precision(dtype)
    assert q is not p and q.precision == dtype and p.precision == "float32"
    assert isinstance(q.module.head[-1], torch.nn.Linear)  # the layer whose value is the score
    assert isinstance(q.module.input, torch.nn.Linear)     # on the CPU a sparse sum of weight rows
    assert not isinstance(q.module.head[2], torch.nn.Linear) and isinstance(p.module.head[2], torch.nn.Linear)
    got, want = q.predict(thrombin.fps, batch_size=100), p.predict(thrombin.fps)
    assert np.abs(got - want).max() < 0.02 and np.corrcoef(got, want)[0, 1] > 0.999
    rec = q.precision_record
    assert rec["dtype"] == dtype and rec["parity_vs_float32"]["min_cosine"] >= 0.999
    assert (rec["quantization"] is not None) == (dtype == "int8")
    f = p.with_precision("float32")
    assert f is p and f.precision_record["parity_vs_float32"] is None


def test_qsar_scorer_dtype_is_checked_in_the_driver_and_used_by_workers(trained, thrombin):
    from biogen.screen.stages import QSARScorer

    _, out = trained
    s = QSARScorer(checkpoint=str(out / "model.ckpt"), dtype="float16")
    with pytest.raises(ConfigError, match="float16.*is for GPUs"):
        s.load()
    s = QSARScorer(checkpoint=str(out / "model.ckpt"))  # float32 by default: the checkpoint's scores exactly
    s.load()
    assert s._predictor.precision == "float32"
    assert np.array_equal(s._predictor.predict(thrombin.fps), QSARPredictor.load(out).predict(thrombin.fps))


def test_qsar_auto_takes_int8_on_a_vnni_cpu_and_a_score_ignores_its_batch_mates(monkeypatch, thrombin):
    from biogen import precision

    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset({"avx512_vnni"}))
    monkeypatch.setattr(precision, "linear_gflops", lambda dtypes, shape, threads: {"int8": 9.0})
    monkeypatch.setattr(precision, "dtype_cache_file", lambda: __import__("pathlib").Path("/nonexistent/x.json"))
    precision._choose.cache_clear()
    try:
        p = QSARPredictor(QSARNet(2048, [512, 128], featurizer=ECFP4.to_dict())).with_precision("auto")
    finally:
        precision._choose.cache_clear()
    assert p.precision == "int8" and p.precision_record["dtype_auto"]["chosen"] == "int8"
    # activations quantized per row: a molecule's score is the same in any batch, to the float32
    # rounding of the fp32 layers (one int8 scale per batch moved them by up to 3e-4 of 0.08 here)
    together = p.predict(thrombin.fps[:300], batch_size=300)
    assert np.abs(p.predict(thrombin.fps[:300], batch_size=7) - together).max() < 1e-7
    assert np.abs(p.predict(thrombin.fps[41:42]) - together[41:42]).max() < 1e-7
