"""benchmarks/gpu_suite.py and benchmarks/gpu_similarity.py: the parts that need no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import rdFingerprintGenerator

from biogen.chem.fingerprints import FingerprintSpec, Fingerprinter

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_similarity  # noqa: E402
import gpu_suite  # noqa: E402


def test_fpsim2_layout_is_its_bit_string_words():
    """FPSim2 stores ``BitStrToIntList(efp.ToBitString())``: word w = int(bits[64w:64w+64], 2)."""
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fpr = Fingerprinter(FingerprintSpec())
    for smi in ("CCOc1ccccc1C(=O)N", "C1CC2CCC1C2", "O=C(O)c1ccccc1Nc1cccc(C(F)(F)F)c1"):
        mol = Chem.MolFromSmiles(smi)
        ours = fpr.compute([mol])
        bits = gen.GetFingerprint(mol).ToBitString()
        theirs = np.array([int(bits[i:i + 64], 2) for i in range(0, 2048, 64)], dtype=np.uint64)
        assert np.array_equal(gpu_similarity.fpsim2_layout(ours)[0], theirs), smi


def _write(out: Path, name: str, doc: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(doc))


def test_headline_checks_each_target(tmp_path):
    _write(tmp_path, "similarity", {
        "full_scan": {"kernel_pairs_per_s": 13e9, "fraction_of_copy_bandwidth": 0.7, "call_pairs_per_s": 5e9},
        "results": {"batch_top_100": {"biogen_cuda": {"queries": 1000, "pairs_per_s": 2.2e9}},
                    "threshold_0.7": {"biogen_cuda": {"median_s": 1e-3}}},
        "ratios": {"threshold_0.7": {"vs_fpsim2_cuda": 25.0}, "threshold_0.4": {"vs_fpsim2_cuda": 1.5}}})
    _write(tmp_path, "embedding", {"device": "cuda", "dtype": "bfloat16", "results": [{
        "model": "esm2_t33_650M_UR50D", "paths": {"biogen": {"tokens_per_s": 250_000, "mfu_vs_measured_matmul": 0.4}},
        "speedup": {"hf_padded": 3.5}, "bf16_vs_fp32": {"sequences": 200, "min_cosine": 0.99997}}]})
    _write(tmp_path, "screen", {"runs": [
        {"molecules": 1_000_215, "accelerator": "cuda", "seconds_by_stage": {"library": 94.0, "total": 160.0}},
        {"molecules": 1_000_215, "accelerator": "cuda", "seconds_by_stage": {"library": 0.1, "total": 40.0}}]})
    rows = {r[0]: (r[1], r[3]) for r in gpu_suite.headline(tmp_path, {})}
    assert rows["similarity: one-query full scan, kernel (G pairs/s)"][1] == "met"
    assert rows["similarity: 1000-query top-100, biogen_cuda (G pairs/s)"] == ("2.2", "missed")
    assert rows["similarity: threshold_0.7 vs FPSim2 CUDA (x)"][1] == "met"
    assert rows["similarity: threshold_0.4 vs FPSim2 CUDA (x)"][1] == "missed"
    assert rows["ESM-2 650M: biogen bfloat16 tokens/s (MFU vs measured matmul)"] == ("250,000 (40%)", "missed")
    assert rows["ESM-2 650M: biogen vs HF padded (x)"][1] == "met"
    assert rows["ESM-2 650M: bf16 vs fp32 min cosine (200 seqs)"][1] == "met"
    assert rows["screen of 1,000,215 molecules (cached library, cuda) (s)"] == ("40.0", "met")
    assert rows["screen of 1,000,215 molecules (library built, cuda) (s)"][1] == "-"  # the build is not the target


def test_env_part_and_summary_without_a_gpu(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(tmp_path / "o"), "--parts", "env",
                          "--size", "dry"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["parts"]["env"]["status"] == "ok" and summary["size"] == "dry"
    env = json.loads((tmp_path / "o" / "env.json").read_text())
    assert env["cpu_cores"] >= 1 and "torch" in env and "biogen_commit" in env
    assert "| env | ok |" in (tmp_path / "o" / "summary.md").read_text()
    assert not (tmp_path / "o" / "work").exists()  # scratch space removed


def test_unknown_part_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(tmp_path), "--parts", "env,gpus"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown ['gpus']" in out.stderr


@pytest.mark.slow
def test_a_part_over_its_time_limit_is_stopped_and_reported(tmp_path):
    t = gpu_suite.run_steps("x", [("sleep", [sys.executable, "-c", "import time; print('hi', flush=True); "
                                                                    "time.sleep(60)"], {})], tmp_path, 3)
    assert t["status"] == "timeout" and t["runs"][0]["seconds"] < 20
    assert (tmp_path / "sleep.log").read_text().startswith("hi")
