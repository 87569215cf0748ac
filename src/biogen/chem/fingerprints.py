"""Packed binary fingerprints: little-endian ``uint64`` words plus popcounts.

Layout contract (shared with the search kernels): fingerprint bit ``i`` is bit
``i % 64`` of word ``i // 64``; an ``(n, n_words)`` array of dtype ``<u8``; popcounts
are ``int32``. MACCS keys (167 bits) are stored in 192 bits (3 words, top bits zero).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from rdkit import Chem, DataStructs
from rdkit.Chem import MACCSkeys, rdFingerprintGenerator

from biogen.errors import ConfigError

FP_TYPES = ("morgan", "rdkit", "atompair", "torsion", "maccs")
MACCS_BITS = 167


@dataclass(frozen=True)
class FingerprintSpec:
    """Fingerprint parameters (config group ``featurizer``); stored in the manifest.

    type: morgan (ECFP; FCFP with use_features), rdkit (paths min_path..max_path),
    atompair, torsion, maccs. nbits: folded size, a multiple of 64 (ignored for maccs).
    """

    type: str = "morgan"
    nbits: int = 2048
    radius: int = 2
    use_features: bool = False
    use_chirality: bool = False
    min_path: int = 1
    max_path: int = 7

    def __post_init__(self) -> None:
        if self.type not in FP_TYPES:
            hint = (" (featurizer=minimol is a QSAR input for biogen train; a library stores MiniMol vectors "
                    "with embeddings=[minimol] or biogen library embed)" if self.type == "minimol" else
                    " (presets: featurizer=ecfp4|ecfp6|fcfp4|rdkit|atompair|torsion|maccs)")
            raise ConfigError(
                f"featurizer.type={self.type!r} is not a fingerprint type; valid: " + ", ".join(FP_TYPES) + hint)
        if self.type != "maccs" and (self.nbits <= 0 or self.nbits % 64):
            raise ConfigError(
                f"featurizer.nbits={self.nbits} must be a positive multiple of 64 (e.g. 1024, 2048)"
            )
        if not 0 <= self.radius <= 8:
            raise ConfigError(f"featurizer.radius={self.radius} must be between 0 and 8")
        if not 1 <= self.min_path <= self.max_path:
            raise ConfigError(
                f"featurizer.min_path={self.min_path}, max_path={self.max_path}: need 1 <= min_path <= max_path"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "FingerprintSpec":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"rdkit_version"})
        if d.get("type") == "minimol":  # an embedding model's config: say where it belongs, not which keys differ
            return cls(type="minimol")
        if unknown:
            raise ConfigError(
                f"unknown featurizer key(s) {unknown}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def stored_bits(self) -> int:
        return 192 if self.type == "maccs" else self.nbits

    @property
    def n_words(self) -> int:
        return self.stored_bits // 64

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.type == "maccs":
            d["nbits"] = MACCS_BITS
        return d


class Fingerprinter:
    """Computes the bits of one molecule into a row of a ``uint8`` 0/1 matrix; packs rows."""

    def __init__(self, spec: FingerprintSpec):
        self.spec = spec
        t = spec.type
        if t == "morgan":
            kw = {}
            if spec.use_features:
                kw["atomInvariantsGenerator"] = rdFingerprintGenerator.GetMorganFeatureAtomInvGen()
            self._gen = rdFingerprintGenerator.GetMorganGenerator(
                radius=spec.radius, fpSize=spec.nbits, includeChirality=spec.use_chirality, **kw)
        elif t == "rdkit":
            self._gen = rdFingerprintGenerator.GetRDKitFPGenerator(
                minPath=spec.min_path, maxPath=spec.max_path, fpSize=spec.nbits)
        elif t == "atompair":
            self._gen = rdFingerprintGenerator.GetAtomPairGenerator(
                fpSize=spec.nbits, includeChirality=spec.use_chirality)
        elif t == "torsion":
            self._gen = rdFingerprintGenerator.GetTopologicalTorsionGenerator(
                fpSize=spec.nbits, includeChirality=spec.use_chirality)
        else:
            self._gen = None

    def fill(self, mol: Chem.Mol, row: np.ndarray) -> None:
        """Write the 0/1 bits of ``mol`` into ``row`` (uint8, length stored_bits)."""
        if self._gen is None:
            DataStructs.ConvertToNumpyArray(MACCSkeys.GenMACCSKeys(mol), row[:MACCS_BITS])
        else:
            row[: self.spec.nbits] = self._gen.GetFingerprintAsNumPy(mol)

    def new_bits(self, n: int) -> np.ndarray:
        return np.zeros((n, self.spec.stored_bits), dtype=np.uint8)

    def compute(self, mols: list[Chem.Mol]) -> np.ndarray:
        """Packed fingerprints of ``mols``: N x n_words ``<u8``."""
        bits = self.new_bits(len(mols))
        for i, m in enumerate(mols):
            self.fill(m, bits[i])
        return pack_bits(bits)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """N x nbits 0/1 ``uint8`` -> N x nbits/64 little-endian ``uint64`` words."""
    packed = np.packbits(bits, axis=1, bitorder="little")  # N x nbits/8, bit i -> byte i//8 bit i%8
    return np.ascontiguousarray(packed).view("<u8")


def unpack_bits(words: np.ndarray, nbits: int | None = None) -> np.ndarray:
    """Inverse of ``pack_bits`` (for tests and debugging)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1, bitorder="little")
    return bits if nbits is None else bits[:, :nbits]


def popcounts(words: np.ndarray) -> np.ndarray:
    """Number of set bits per row, ``int32``."""
    if words.shape[0] == 0:
        return np.zeros(0, dtype=np.int32)
    return np.bitwise_count(words).sum(axis=1, dtype=np.int32)
