"""A QSAR model trained on a CUDA GPU saves, loads on the CPU and predicts the same."""

import numpy as np
import pytest
import torch

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.standardize import StandardizeSpec
from biogen.models.data import MoleculeACESource
from biogen.models.qsar import QSARPredictor, QSARSpec, fit_qsar

pytestmark = pytest.mark.gpu




@pytest.mark.parametrize("task", ["regression", "classification"])
def test_trained_on_gpu_loads_on_cpu(cuda, task, tmp_path):
    data = MoleculeACESource(limit=400).load(FingerprintSpec(), StandardizeSpec())
    tr, te = data.subset("train"), data.subset("test")
    p = fit_qsar(tr.fps, tr.y, QSARSpec(task=task, max_epochs=5), FingerprintSpec(), smiles=tr.smiles,
                 accelerator="cuda", out_dir=tmp_path, test=(te.fps, te.y))
    assert p.info["n_train"] > 0 and "test_auroc" in p.metrics
    on_gpu = p.to("cuda").predict(data.fps)  # dense unpack on the GPU
    assert p.device.type == "cuda"
    cpu = QSARPredictor.load(tmp_path / "model.ckpt", map_location="cpu")
    assert cpu.device.type == "cpu"
    np.testing.assert_allclose(cpu.predict(data.fps), on_gpu, atol=1e-5)  # sparse CPU path
    back = QSARPredictor.load(tmp_path / "model.ckpt", map_location="cuda")
    assert back.device.type == "cuda"
    np.testing.assert_allclose(back.predict(data.fps), on_gpu, atol=1e-6)
