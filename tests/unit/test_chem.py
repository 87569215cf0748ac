import numpy as np
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import QED, Crippen, Descriptors, MACCSkeys, rdFingerprintGenerator, rdMolDescriptors

from biogen.chem.descriptors import DESCRIPTORS, DescriptorCalculator
from biogen.chem.fingerprints import FingerprintSpec, Fingerprinter, pack_bits, popcounts, unpack_bits
from biogen.chem.pipeline import MoleculeProcessor, ProcessorSpec
from biogen.chem.readers import ReaderOptions, inspect_input, iter_records
from biogen.chem.records import RawRecord
from biogen.chem.standardize import StandardizeSpec, Standardizer
from biogen.errors import ConfigError

SMILES = ["CC(=O)Oc1ccccc1C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "C[C@H](N)C(=O)O",
          "O=C(O)Cc1ccccc1Nc1c(Cl)cccc1Cl", "c1ccc2ccccc2c1", "CCO", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"]
MOLS = [Chem.MolFromSmiles(s) for s in SMILES]

# Independent oracles: RDKit's own generators, configured directly.
ORACLES = {
    "ecfp4": (FingerprintSpec(), lambda m: rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048).GetFingerprint(m)),
    "ecfp6-1024-chiral": (FingerprintSpec(radius=3, nbits=1024, use_chirality=True),
                          lambda m: rdFingerprintGenerator.GetMorganGenerator(radius=3, fpSize=1024, includeChirality=True).GetFingerprint(m)),
    "fcfp4": (FingerprintSpec(use_features=True),
              lambda m: rdFingerprintGenerator.GetMorganGenerator(
                  radius=2, fpSize=2048, atomInvariantsGenerator=rdFingerprintGenerator.GetMorganFeatureAtomInvGen()).GetFingerprint(m)),
    "rdkit": (FingerprintSpec(type="rdkit"), lambda m: rdFingerprintGenerator.GetRDKitFPGenerator(fpSize=2048).GetFingerprint(m)),
    "atompair": (FingerprintSpec(type="atompair"), lambda m: rdFingerprintGenerator.GetAtomPairGenerator(fpSize=2048).GetFingerprint(m)),
    "torsion": (FingerprintSpec(type="torsion", nbits=4096), lambda m: rdFingerprintGenerator.GetTopologicalTorsionGenerator(fpSize=4096).GetFingerprint(m)),
    "maccs": (FingerprintSpec(type="maccs"), MACCSkeys.GenMACCSKeys),
}


@pytest.mark.parametrize("name", list(ORACLES))
def test_packed_bits_equal_rdkit_bits_and_tanimoto(name):
    spec, oracle = ORACLES[name]
    words = Fingerprinter(spec).compute(MOLS)
    assert words.dtype == np.dtype("<u8") and words.shape == (len(MOLS), spec.n_words)
    ref = [oracle(m) for m in MOLS]
    for row, bv in zip(words, ref):
        on = set(np.flatnonzero(unpack_bits(row[None])[0]))
        assert on == set(bv.GetOnBits())
    np.testing.assert_array_equal(popcounts(words), [bv.GetNumOnBits() for bv in ref])
    # Tanimoto from the packed words equals RDKit's, exactly
    a = popcounts(words)
    for i in range(len(MOLS)):
        common = np.bitwise_count(words[i] & words).sum(axis=1)
        union = a[i] + a - common
        ok = union > 0  # two empty fingerprints (ethanol has no torsion): search defines that case
        theirs = np.array(DataStructs.BulkTanimotoSimilarity(ref[i], ref))
        np.testing.assert_array_equal(common[ok] / union[ok], theirs[ok])


def test_bit_layout_is_little_endian_words():
    bits = np.zeros((1, 128), np.uint8)
    bits[0, [0, 63, 64, 127]] = 1
    w = pack_bits(bits)
    assert w[0, 0] == (1 | (1 << 63)) and w[0, 1] == (1 | (1 << 63))


def test_featurizer_errors_list_valid_choices():
    with pytest.raises(ConfigError, match="featurizer.type='morgn' is not a fingerprint type; valid: morgan, rdkit"):
        FingerprintSpec(type="morgn")
    with pytest.raises(ConfigError, match="multiple of 64"):
        FingerprintSpec(nbits=1000)
    with pytest.raises(ConfigError, match=r"unknown featurizer key\(s\) \['radious'\]; valid keys:"):
        FingerprintSpec.from_dict({"type": "morgan", "radious": 3})


def test_descriptors_match_rdkit():
    calc = DescriptorCalculator(list(DESCRIPTORS))
    m = MOLS[3]
    values = dict(zip(calc.names, calc(m)))
    assert values["mw"] == pytest.approx(Descriptors.MolWt(m))
    assert values["clogp"] == pytest.approx(Crippen.MolLogP(m))
    assert values["qed"] == pytest.approx(QED.qed(m))
    assert values["tpsa"] == pytest.approx(rdMolDescriptors.CalcTPSA(m))
    assert (values["hbd"], values["hba"], values["rings"], values["aromatic_rings"]) == (2, 2, 2, 2)
    assert values["heavy_atoms"] == 19 and values["formal_charge"] == 0
    assert values["fsp3"] == pytest.approx(1 / 14)
    with pytest.raises(ConfigError, match="unknown descriptor"):
        DescriptorCalculator(["mw", "logp"])


def test_standardizer_steps():
    std = Standardizer(StandardizeSpec())
    salt = Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)[O-].[Na+]")
    assert Chem.MolToSmiles(std(salt)) == Chem.MolToSmiles(MOLS[0])
    nitro = Chem.MolFromSmiles("C[N+](=O)[O-]")
    assert Chem.MolToSmiles(std(Chem.MolFromSmiles("CN(=O)=O"))) == Chem.MolToSmiles(nitro)
    hcl = Chem.MolFromSmiles("Cl.CN")
    assert Chem.MolToSmiles(Standardizer(StandardizeSpec(fragment="parent"))(hcl)) == "CN"
    off = Standardizer(StandardizeSpec(enabled=False))
    assert Chem.MolToSmiles(off(salt)) == Chem.MolToSmiles(salt)
    taut = Standardizer(StandardizeSpec(tautomer=True))
    assert Chem.MolToSmiles(taut(Chem.MolFromSmiles("Oc1ccccn1"))) == Chem.MolToSmiles(
        taut(Chem.MolFromSmiles("O=c1cccc[nH]1")))
    with pytest.raises(ConfigError, match="standardize.fragment='biggest' is not valid"):
        StandardizeSpec(fragment="biggest")


def test_processor_rejects_with_reasons_and_keeps_good_rows(data_dir):
    spec = ProcessorSpec(FingerprintSpec(), StandardizeSpec(), ("mw", "qed"))
    opts = ReaderOptions()
    recs = list(iter_records(inspect_input(data_dir / "mixed.smi", opts), opts))
    recs += list(iter_records(inspect_input(data_dir / "small.sdf", opts), opts))
    recs.append(RawRecord("x", 1, "smiles", "", "", error=("field_count", "expected 2 fields")))
    out = MoleculeProcessor(spec).process(recs)
    reasons = {(r.id, r.reason) for r in out.rejects}
    assert ("broken-ring", "parse_error") in reasons
    assert ("pentavalent-carbon", "parse_error") in reasons
    assert ("broken-caffeine", "parse_error") in reasons
    assert (None, "field_count") in reasons
    detail = {r.id: r.detail for r in out.rejects}
    assert "Explicit valence for atom # 0 C, 5" in detail["pentavalent-carbon"]
    assert len(out) + len(out.rejects) == len(recs)
    assert out.fps.shape == (len(out), 32)
    np.testing.assert_array_equal(out.popcount, popcounts(out.fps))
    i = out.id.index("aspirin-sodium")
    assert out.smiles[i] == Chem.MolToSmiles(MOLS[0])  # salt stripped, neutralized
    assert out.inchikey[i] == Chem.MolToInchiKey(MOLS[0])
    j = out.id.index("diclofenac")
    assert out.props[j] == '{"CAS": "15307-86-5", "vendor": "A"}'
    assert set(out.timings) >= {"parse", "standardize", "identify", "fingerprint", "descriptors"}


def test_non_utf8_record_is_rejected_not_altered(tmp_path):
    p = tmp_path / "latin1.smi"
    p.write_bytes("CCO ethanol\nCCN m\xe9thylamine\n".encode("latin-1"))
    opts = ReaderOptions()
    recs = list(iter_records(inspect_input(p, opts), opts))
    out = MoleculeProcessor(ProcessorSpec(FingerprintSpec(), StandardizeSpec(), ())).process(recs)
    assert out.id == ["ethanol"]
    assert [(r.record, r.reason) for r in out.rejects] == [(2, "encoding_error")]
