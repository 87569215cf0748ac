"""Molecular descriptors stored with every library row.

All are numbers except ``scaffold`` (text: the Bemis-Murcko scaffold SMILES), which
property filters refuse.

QED costs about 1 ms per molecule (its structural-alert matching dominates); its
property vector already holds the Wildman-Crippen logP, which is reused for ``clogp``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rdkit import Chem
from rdkit.Chem import QED, Crippen, Descriptors, rdMolDescriptors

from biogen.chem.scaffolds import scaffold_of_canonical_smiles
from biogen.errors import ConfigError

# name -> (arrow type, description)
DESCRIPTORS: dict[str, tuple[str, str]] = {
    "mw": ("float64", "average molecular weight (Descriptors.MolWt)"),
    "clogp": ("float64", "Wildman-Crippen logP"),
    "tpsa": ("float64", "topological polar surface area"),
    "hbd": ("int32", "H-bond donors (Lipinski, CalcNumHBD)"),
    "hba": ("int32", "H-bond acceptors (Lipinski, CalcNumHBA)"),
    "rotatable_bonds": ("int32", "rotatable bonds (strict)"),
    "rings": ("int32", "ring count (SSSR)"),
    "aromatic_rings": ("int32", "aromatic ring count"),
    "heavy_atoms": ("int32", "heavy atom count"),
    "formal_charge": ("int32", "net formal charge"),
    "qed": ("float64", "quantitative estimate of drug-likeness (Bickerton 2012)"),
    "fsp3": ("float64", "fraction of sp3 carbons"),
    "scaffold": ("string", "Bemis-Murcko scaffold, canonical SMILES without stereo ('' if acyclic); "
                           "a screen's per-scaffold cap reads it instead of computing it"),
}
TEXT_DESCRIPTORS = frozenset(n for n, (typ, _) in DESCRIPTORS.items() if typ == "string")
DEFAULT_DESCRIPTORS = tuple(DESCRIPTORS)  # a library build stores all of them unless told otherwise

_SIMPLE: dict[str, Callable[[Chem.Mol], float | int]] = {
    "mw": Descriptors.MolWt,
    "tpsa": rdMolDescriptors.CalcTPSA,
    "hbd": rdMolDescriptors.CalcNumHBD,
    "hba": rdMolDescriptors.CalcNumHBA,
    "rotatable_bonds": rdMolDescriptors.CalcNumRotatableBonds,
    "rings": rdMolDescriptors.CalcNumRings,
    "aromatic_rings": rdMolDescriptors.CalcNumAromaticRings,
    "heavy_atoms": lambda m: m.GetNumHeavyAtoms(),
    "formal_charge": Chem.GetFormalCharge,
    "fsp3": rdMolDescriptors.CalcFractionCSP3,
}


def validate_descriptor_names(names: Sequence[str]) -> tuple[str, ...]:
    bad = [n for n in names if n not in DESCRIPTORS]
    if bad:
        raise ConfigError(
            f"unknown descriptor(s) {bad} in descriptors=; valid: {', '.join(DESCRIPTORS)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"descriptors= lists a name twice: {list(names)}")
    return tuple(names)


class DescriptorCalculator:
    """Computes the configured descriptors of one molecule, in the configured order."""

    def __init__(self, names: Sequence[str]):
        self.names = validate_descriptor_names(names)
        self._need_qed_props = "qed" in self.names

    def __call__(self, mol: Chem.Mol, smiles: str | None = None) -> list[float | int | str]:
        """smiles: the molecule's canonical SMILES when the caller has it (the scaffold is
        computed from it, exactly as a screen would from the stored SMILES)."""
        qprops = QED.properties(mol) if self._need_qed_props else None
        out: list[float | int | str] = []
        for name in self.names:
            if name == "scaffold":
                out.append(scaffold_of_canonical_smiles(smiles if smiles is not None else Chem.MolToSmiles(mol)))
            elif name == "qed":
                out.append(QED.qed(mol, qedProperties=qprops))
            elif name == "clogp":
                out.append(qprops.ALOGP if qprops is not None else Crippen.MolLogP(mol))
            else:
                out.append(_SIMPLE[name](mol))
        return out
