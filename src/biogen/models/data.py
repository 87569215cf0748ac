"""Training data for QSAR models: activity sources, featurization, splits, bit unpacking.

Sources (config group ``train_data``) are small typed specs with one ``load`` method that
returns an ``ActivityData``: packed fingerprints featurized exactly as a library is
(``MoleculeProcessor``), pActivity values, MoleculeACE-style train/test labels and the
records that could not be used (rejected with a reason, never dropped silently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.pipeline import MoleculeProcessor, ProcessorSpec
from biogen.chem.records import RawRecord, Reject
from biogen.chem.scaffolds import murcko_scaffolds
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import ConfigError, InputError
from biogen.kernels.cpu import cttz64

SPLITS = ("scaffold", "random")
VALUE_UNITS = ("pActivity", "nM", "uM", "label")
# an activity column found by name when none is given (lower case)
VALUE_COLUMN_NAMES = ("value", "activity", "pactivity", "pchembl_value", "exp_mean [nm]", "ki", "ic50", "y")


def to_pactivity(text: str | float, unit: str) -> float:
    """One activity value in pActivity (-log10 molar) from ``unit`` (pActivity, nM, uM), or a
    0/1 label (``label``); ValueError for a non-number, a non-finite value, a potency <= 0
    or a label other than 0/1 (the callers reject the record with the message)."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError("not finite")
    if unit in ("nM", "uM"):
        if v <= 0:
            raise ValueError(f"a potency in {unit} must be > 0")
        return (9.0 if unit == "nM" else 6.0) - math.log10(v)
    if unit == "label" and v not in (0.0, 1.0):
        raise ValueError("a label must be 0 or 1")
    return v
SPLIT_LABELS = ("train", "test")


@dataclass
class ActivityData:
    """N featurized molecules with activities.

    fps: N x W ``<u8`` packed fingerprints (library layout); y: N float32, pActivity
    (-log10 molar) or 0/1 labels when the source's unit is ``label``; smiles: N
    standardized SMILES; split: N of 'train'/'test' (all 'train' when the source has no
    split); rejects: input records that could not be used; n_in: records read.
    """

    fps: np.ndarray
    y: np.ndarray
    smiles: list[str]
    split: list[str]
    rejects: list[Reject] = field(default_factory=list)
    n_in: int = 0
    source: str = ""
    unit: str = "pActivity"

    def __len__(self) -> int:
        return len(self.smiles)

    def subset(self, split: str) -> "ActivityData":
        keep = np.array([s == split for s in self.split], dtype=bool)
        idx = np.flatnonzero(keep)
        return ActivityData(self.fps[idx], self.y[idx], [self.smiles[i] for i in idx],
                            [split] * len(idx), [], len(idx), self.source, self.unit)


def _featurize(records: list[RawRecord], values: dict[int, tuple[float, str]], rejects: list[Reject],
               featurizer: FingerprintSpec, standardize: StandardizeSpec, source: str,
               unit: str) -> ActivityData:
    """Run ``records`` through the library's molecule processor; ``values``: record -> (y, split)."""
    chunk = MoleculeProcessor(ProcessorSpec(featurizer, standardize, ()), identity=False).process(records)
    y = np.array([values[r][0] for r in chunk.record], dtype=np.float32)
    split = [values[r][1] for r in chunk.record]
    return ActivityData(chunk.fps, y, list(chunk.smiles), split, rejects + list(chunk.rejects),
                        len(records) + len(rejects), source, unit)


@dataclass(frozen=True)
class MoleculeACESource:
    """A MoleculeACE data set shipped by the MoleculeACE package (``train_data=moleculeace``).

    target: e.g. CHEMBL204_Ki (thrombin); values are pActivity = 9 - log10(nM); the data
    set's own train/test split is kept. limit: use only the first N records (smoke runs).
    """

    source: str = "moleculeace"
    target: str = "CHEMBL204_Ki"
    limit: int | None = None

    def load(self, featurizer: FingerprintSpec, standardize: StandardizeSpec) -> ActivityData:
        from biogen.datasets import load_moleculeace

        data = load_moleculeace(self.target)
        n = len(data) if self.limit is None else min(int(self.limit), len(data))
        name = f"moleculeace:{self.target}"
        records = [RawRecord(name, i + 1, "smiles", data.smiles[i].strip(), data.smiles[i]) for i in range(n)]
        values = {i + 1: (data.pactivity[i], data.split[i]) for i in range(n)}
        return _featurize(records, values, [], featurizer, standardize, name, "pActivity")


@dataclass(frozen=True)
class ActivityFileSource:
    """A CSV/TSV (gz ok) of SMILES with an activity column (``train_data=file``).

    value_unit: pActivity (-log10 molar: pKi, pIC50 ...), nM or uM (converted to
    pActivity), or label (0/1 for classification). split_column: optional column of
    train/test labels; rows marked test are held out for the final metrics.
    Records with a missing or non-numeric value, a bad split label or a SMILES RDKit
    cannot read are rejected with the reason. ``value_column=None`` takes the first column
    with a usual activity name (``VALUE_COLUMN_NAMES``). The one reader of activity files:
    ``biogen train`` (``load``) and a screen's target (``read``, ``biogen.screen.target``).
    """

    source: str = "file"
    path: str = ""
    smiles_column: str | None = None
    value_column: str | None = "pactivity"
    value_unit: str = "pActivity"
    split_column: str | None = None
    format: str = "auto"
    delimiter: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.value_unit not in VALUE_UNITS:
            raise ConfigError(f"train_data.value_unit={self.value_unit!r} is not valid; choose one of "
                              f"{', '.join(VALUE_UNITS)}")

    def _value(self, text: str) -> float:
        return to_pactivity(text, self.value_unit)

    def load(self, featurizer: FingerprintSpec, standardize: StandardizeSpec) -> ActivityData:
        records, values, rejects, path = self.read()
        unit = "label" if self.value_unit == "label" else "pActivity"
        return _featurize(records, values, rejects, featurizer, standardize, str(path), unit)

    def read(self, key: str = "train_data") -> tuple[list[RawRecord], dict[int, tuple[float, str]], list[Reject], str]:
        """The file's usable records, ``{record: (value in pActivity or label, split)}``, the
        rejected records with reasons, and the path. ``key``: the setting's name in messages."""
        from biogen.chem.readers import ReaderOptions, inspect_input, iter_records, resolve_inputs

        if not str(self.path):
            raise ConfigError(f"{key}.path is empty; give the CSV/TSV of SMILES and activities "
                              f"({key}.path=activities.csv)")
        opts = ReaderOptions(format=self.format, smiles_column=self.smiles_column, id_column="",
                             delimiter=self.delimiter)
        (path,) = resolve_inputs(str(self.path))
        info = inspect_input(path, opts)
        if info.format not in ("csv", "tsv"):
            raise InputError(f"{key}.path={self.path}: activity data needs a CSV/TSV file with a "
                             f"SMILES column and an activity column (got a {info.format} file); "
                             f"set {key}.format=csv|tsv if the extension is misleading")
        value_column = self.value_column or next(
            (c for c in info.columns if c.lower() in VALUE_COLUMN_NAMES), None)
        if value_column is None:
            raise InputError(f"{path}: no activity column among {info.columns}; set {key}.value_column")
        for name, col in (("value_column", value_column), ("split_column", self.split_column)):
            if col is not None and col not in info.columns:
                raise InputError(f"{path}: column {col!r} ({key}.{name}) is not in the header "
                                 f"{info.columns}; set {key}.{name} to one of them")
        records: list[RawRecord] = []
        rejects: list[Reject] = []
        values: dict[int, tuple[float, str]] = {}
        for rec in iter_records(info, opts):
            if self.limit is not None and len(records) + len(rejects) >= int(self.limit):
                break
            if rec.error is not None:
                rejects.append(Reject(rec.source, rec.record, *rec.error, rec.raw, rec.id))
                continue
            props = rec.props or {}
            text = props.get(value_column, "").strip()
            try:
                y = self._value(text)
            except ValueError as exc:
                rejects.append(Reject(rec.source, rec.record, "bad_value",
                                      f"column {value_column!r} holds {text!r}, not a usable "
                                      f"{self.value_unit} value ({exc})", rec.raw, rec.id))
                continue
            split = "train"
            if self.split_column is not None:
                split = props.get(self.split_column, "").strip().lower()
                if split not in SPLIT_LABELS:
                    rejects.append(Reject(rec.source, rec.record, "bad_split",
                                          f"column {self.split_column!r} holds {split!r}; expected "
                                          f"{' or '.join(SPLIT_LABELS)}", rec.raw, rec.id))
                    continue
            values[rec.record] = (y, split)
            records.append(rec)
        if not records:
            raise InputError(f"{path}: no usable activity records ({len(rejects)} rejected; first: "
                             f"{rejects[0].detail if rejects else 'the file is empty'})")
        return records, values, rejects, str(path)


def training_source(source) -> MoleculeACESource | ActivityFileSource:
    """``source`` (a built ``train_data`` node), checked to hold activities for a QSAR model."""
    if not isinstance(source, (MoleculeACESource, ActivityFileSource)):
        kind = getattr(source, "source", type(source).__name__)
        raise ConfigError(f"train_data={kind} holds drug-target pairs: train it with model=dti (a QSAR model takes "
                          "train_data=moleculeace|file)")
    return source


# --- splits ---------------------------------------------------------------------------


def split_indices(n: int, kind: str, val_fraction: float, seed: int,
                  smiles: list[str] | None = None, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices, sorted.

    random: a seeded permutation; with ``labels`` (classification) it is stratified, so a
    set with few actives still validates on its share of them (at least one when a class
    has two or more members) instead of early-stopping on inactives alone. scaffold: Bemis-Murcko groups never straddle the two
    sets (balanced scaffold split, as in Chemprop): groups larger than half the
    validation size go to training, the others are shuffled with ``seed`` and fill the
    validation set while they fit. ``val_fraction=0``: everything trains.
    """
    if kind not in SPLITS:
        raise ConfigError(f"model.split={kind!r} is not valid; choose one of {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"model.val_fraction={val_fraction} must be in [0, 1)")
    n_val = int(round(val_fraction * n))
    if n_val == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if kind == "random":
        if labels is None:
            perm = rng.permutation(n)
            return np.sort(perm[n_val:]), np.sort(perm[:n_val])
        labels = np.asarray(labels).reshape(-1)
        val_parts, train_parts = [], []
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            take = int(round(val_fraction * len(idx)))
            if take == 0 and len(idx) >= 2:
                take = 1
            val_parts.append(idx[:take])
            train_parts.append(idx[take:])
        return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))
    if smiles is None or len(smiles) != n:
        raise ConfigError("model.split=scaffold needs the SMILES of the training molecules; "
                          "pass smiles=... or use model.split=random")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(murcko_scaffolds(smiles)):
        groups.setdefault(s, []).append(i)
    big = [g for g in groups.values() if len(g) > n_val / 2]
    small = [g for g in groups.values() if len(g) <= n_val / 2]
    order = rng.permutation(len(small))
    val: list[int] = []
    train = [i for g in big for i in g]
    for j in order:
        g = small[j]
        (val if len(val) + len(g) <= n_val else train).extend(g)
    if not val:
        raise InputError(f"scaffold split: the {n} training molecules fall into {len(groups)} Bemis-Murcko "
                         f"scaffold group(s), none small enough for a validation set of {n_val}; "
                         "use model.split=random")
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


# --- packed words -> set-bit lists (sparse first layer on CPU) -----------------------------


@njit(nogil=True, cache=True)
def _fill_bit_indices(words, offsets, out):
    n, w = words.shape
    one = np.uint64(1)
    for i in range(n):
        k = offsets[i]
        for j in range(w):
            x = words[i, j]
            base = j * 64
            while x:
                out[k] = base + np.int64(cttz64(x))
                k += 1
                x &= x - one


def bit_indices(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Set bits of packed rows as (indices, offsets) for ``torch.nn.functional.embedding_bag``.

    words: N x W ``<u8``; indices: total-set-bits int64, bit numbers in row order;
    offsets: N int64, start of each row's bits in ``indices``.
    """
    words = np.ascontiguousarray(words, dtype=np.uint64)
    counts = np.bitwise_count(words).sum(axis=1, dtype=np.int64)  # N
    offsets = np.zeros(len(words), dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    out = np.empty(int(counts.sum()), dtype=np.int64)
    _fill_bit_indices(words, offsets, out)
    return out, offsets
