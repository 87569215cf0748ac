"""Compose every packaged config and turn it into the typed objects the jobs use."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.readers import ReaderOptions
from biogen.chem.standardize import StandardizeSpec
from biogen.cli.main import JOBS, _register_resolvers
from biogen.resources import config_dir
from biogen.runtime import RuntimeSpec

FEATURIZERS = sorted(p.stem for p in (config_dir() / "featurizer").glob("*.yaml"))


@pytest.mark.parametrize("config_name", sorted({c for c, _, _ in JOBS.values()}))
def test_every_job_config_composes(config_name):
    _register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[], return_hydra_config=True)
    assert cfg.hydra.job.name == config_name
    if "runtime" in cfg:
        RuntimeSpec(**OmegaConf.to_container(cfg.runtime))
    if "reader" in cfg:
        ReaderOptions(**OmegaConf.to_container(cfg.reader))


@pytest.mark.parametrize("featurizer", FEATURIZERS)
@pytest.mark.parametrize("standardize", ["default", "none", "tautomer"])
def test_build_config_groups_instantiate(featurizer, standardize):
    _register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="library_build",
                      overrides=[f"featurizer={featurizer}", f"standardize={standardize}", "runtime=ray_cluster"])
    spec = FingerprintSpec.from_dict(OmegaConf.to_container(cfg.featurizer))
    assert spec.type in ("morgan", "rdkit", "atompair", "torsion", "maccs")
    StandardizeSpec(**OmegaConf.to_container(cfg.standardize))
    assert RuntimeSpec(**OmegaConf.to_container(cfg.runtime)).mode == "ray_cluster"
    assert cfg.input.endswith("test.csv.gz")  # the default job's data: MOSES test from molsets


def test_presets_mean_what_they_say():
    _register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        def fp(name):
            return FingerprintSpec.from_dict(OmegaConf.to_container(
                compose(config_name="library_build", overrides=[f"featurizer={name}"]).featurizer))
        assert fp("ecfp4") == FingerprintSpec()
        assert fp("ecfp6").radius == 3
        assert fp("fcfp4").use_features
        assert fp("maccs").n_words == 3
