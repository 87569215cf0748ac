"""Compose every packaged config and turn it into the typed objects the jobs use."""

import pytest
from omegaconf import OmegaConf

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.readers import ReaderOptions
from biogen.chem.standardize import StandardizeSpec
from biogen.cli.config import from_config
from biogen.cli.main import JOBS
from biogen.resources import config_dir
from biogen.runtime import RuntimeSpec
from tests_support import compose_config

EMBEDDING_FEATURIZERS = ["minimol"]  # QSAR inputs from a compound model, not library fingerprints
FEATURIZERS = sorted(p.stem for p in (config_dir() / "featurizer").glob("*.yaml")
                     if p.stem not in EMBEDDING_FEATURIZERS)


# the pluggable roles: each a config node with a _target_, made by from_config
ROLES = {"runtime": RuntimeSpec, "reader": ReaderOptions, "standardize": StandardizeSpec,
         "featurizer": FingerprintSpec}


@pytest.mark.parametrize("config_name", sorted({c for c, _, _ in JOBS.values()}))
def test_every_job_config_composes(config_name):
    cfg = compose_config(config_name, hydra=True)
    assert cfg.hydra.job.name == config_name
    for role, cls in ROLES.items():
        if role in cfg:
            assert isinstance(from_config(cfg[role], role), cls)


def test_a_wrong_setting_names_the_role_and_its_keys():
    from biogen.errors import ConfigError

    cfg = compose_config("library_build", "++runtime.wokers=4", job=False)
    with pytest.raises(ConfigError, match=r"unknown runtime key\(s\) \['wokers'\]; valid keys: mode, address, workers"):
        from_config(cfg.runtime, "runtime")
    cfg = compose_config("library_build", "featurizer.nbits=100", job=False)
    with pytest.raises(ConfigError, match="featurizer.nbits=100 must be a positive multiple of 64"):
        from_config(cfg.featurizer, "featurizer")  # the class's own check, unwrapped
    with pytest.raises(ConfigError, match="config node runtime has no _target_"):
        from_config(OmegaConf.create({"mode": "local"}), "runtime")


@pytest.mark.parametrize("featurizer", FEATURIZERS)
@pytest.mark.parametrize("standardize", ["default", "none", "tautomer"])
def test_build_config_groups_instantiate(featurizer, standardize):
    cfg = compose_config("library_build", f"featurizer={featurizer}", f"standardize={standardize}",
                         "runtime=ray_cluster", job=False)
    spec = from_config(cfg.featurizer, "featurizer")
    assert spec.type in ("morgan", "rdkit", "atompair", "torsion", "maccs")
    assert from_config(cfg.standardize, "standardize") == StandardizeSpec(
        enabled=standardize != "none", tautomer=standardize == "tautomer")
    assert from_config(cfg.runtime, "runtime").mode == "ray_cluster"
    assert cfg.input.endswith("test.csv.gz")  # the default job's data: MOSES test from molsets


@pytest.mark.parametrize("featurizer", EMBEDDING_FEATURIZERS)
def test_an_embedding_featurizer_is_refused_as_fingerprints_with_the_fix(featurizer):
    from biogen.errors import ConfigError

    from biogen.cli.library import _fingerprint

    cfg = compose_config("library_build", f"featurizer={featurizer}", job=False)
    with pytest.raises(ConfigError, match=rf"embeddings=\[{featurizer}\]"):
        _fingerprint(cfg)


def test_build_config_default_descriptors_are_the_python_defaults():
    """`biogen library build` and `build_library()` store the same descriptors by default."""
    from biogen.chem.descriptors import DEFAULT_DESCRIPTORS

    cfg = compose_config("library_build", job=False)
    assert tuple(cfg.descriptors) == DEFAULT_DESCRIPTORS


def test_presets_mean_what_they_say():
    def fp(name):
        return from_config(compose_config("library_build", f"featurizer={name}", job=False).featurizer, "featurizer")

    assert fp("ecfp4") == FingerprintSpec()
    assert fp("ecfp6").radius == 3
    assert fp("fcfp4").use_features
    assert fp("maccs").n_words == 3


SCREEN_GROUPS = config_dir() / "screen"


@pytest.mark.parametrize("group,option", sorted(
    (g.name, p.stem) for g in SCREEN_GROUPS.iterdir() if g.is_dir() for p in g.glob("*.yaml")))
def test_every_screen_preset_composes_and_instantiates(group, option):
    from hydra.utils import instantiate

    from biogen.cli.screen import build_stages
    from biogen.screen.pipeline import FusionSpec
    from biogen.screen.presets import LibrarySpec
    from biogen.screen.selection import SelectionSpec
    from biogen.screen.target import TargetSpec

    extra = {"library": ["library.path=somewhere"] if option == "store" else [],
             "target": ["target.name=x", "target.actives=a.smi"] if option == "custom" else [],
             # a protein-aware screen needs a DTI checkpoint (loaded only in prepare)
             "scoring": ["scoring.scorers.protein_aware.checkpoint=dti.ckpt"] if "protein_aware" in option else [],
             }.get(group, [])
    cfg = compose_config("screen", f"{group}={option}", *extra)
    assert isinstance(from_config(cfg.library, "library"), LibrarySpec)
    assert isinstance(from_config(cfg.target, "target"), TargetSpec)
    filters = build_stages(cfg.filters, "filters")
    assert all(f.kind == "filter" for f in filters)
    if "admet" not in option:  # the ADMET scorer is built too; only its prepare() needs admet-ai
        scorers = build_stages(cfg.scoring.scorers, "scoring.scorers")
        assert scorers and all(s.kind == "score" for s in scorers)
    else:
        assert instantiate(cfg.scoring.scorers.herg, name="herg").kind == "score"
    assert isinstance(from_config(cfg.scoring.fusion, "scoring.fusion"), FusionSpec)
    assert isinstance(from_config(cfg.selection, "selection"), SelectionSpec)


def test_a_screen_group_name_is_not_a_group_for_other_jobs():
    cfg = compose_config("search", "library=mylib", "query=CCO")
    assert cfg.library == "mylib"


@pytest.mark.parametrize("job,node,option,cls", [
    ("train", "train_data", "kiba", "KibaSource"), ("train", "train_data", "pairs", "PairsSource"),
    ("evaluate_dti", "data", "kiba", "KibaSource"), ("evaluate_dti", "data", "pairs", "PairsSource")])
def test_drug_target_data_groups_build_their_sources(job, node, option, cls):
    """train_data=kiba|pairs and evaluate dti's data=kiba|pairs: the same sources, by _target_."""
    from biogen.dti import data as dti_data

    cfg = compose_config(job, f"{node}={option}", f"{node}.path=somewhere")
    src = from_config(cfg[node], node)
    assert type(src) is getattr(dti_data, cls) and src.path == "somewhere" and src.source == option


def test_a_featurizer_is_a_fingerprint_or_a_compound_model():
    from biogen.cli.train import featurizer_of
    from biogen.embeddings.base import ModelFeaturizer

    assert featurizer_of(compose_config("train", "featurizer=fcfp4")) == (FingerprintSpec(use_features=True), None)
    assert featurizer_of(compose_config("train", "featurizer=minimol")) == (FingerprintSpec(), ModelFeaturizer())
