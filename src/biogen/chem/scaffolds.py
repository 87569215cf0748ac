"""Bemis-Murcko scaffolds (selection's per-scaffold cap, scaffold splits)."""

from __future__ import annotations

from collections.abc import Iterable

from rdkit import Chem, rdBase
from rdkit.Chem import rdmolops
from rdkit.Chem.Scaffolds import MurckoScaffold

_AS_WRITTEN = Chem.SmilesParserParams()
_AS_WRITTEN.sanitize = False  # see murcko_scaffolds(canonical=True)
_AS_WRITTEN.removeHs = False


def _scaffold_of_canonical(smiles: str) -> str:
    mol = Chem.MolFromSmiles(smiles, _AS_WRITTEN)
    if mol is None:
        return ""
    mol.UpdatePropertyCache(strict=False)
    rdmolops.AssignRadicals(mol)  # what sanitizing would add: e.g. [I] with two bonds keeps its bracket
    Chem.FastFindRings(mol)
    return Chem.MolToSmiles(Chem.MurckoDecompose(mol), isomericSmiles=False)


def scaffold_of_canonical_smiles(smiles: str) -> str:
    """``murcko_scaffolds([smiles], canonical=True)[0]`` without blocking RDKit's log (the
    library build stores this for every molecule: the ``scaffold`` descriptor)."""
    try:
        return _scaffold_of_canonical(smiles)
    except Exception:  # noqa: BLE001 - RDKit raises several types; the full path decides
        mol = Chem.MolFromSmiles(smiles)
        return MurckoScaffold.MurckoScaffoldSmiles(mol=mol) if mol is not None else ""


def murcko_scaffolds(smiles: Iterable[str], *, canonical: bool = False) -> list[str]:
    """Canonical Bemis-Murcko scaffold SMILES of each molecule ('' for acyclic or unreadable ones),
    as RDKit's ``MurckoScaffoldSmiles`` (stereo dropped).

    canonical=True: the SMILES were written by RDKit from sanitized molecules (a library's
    canonical SMILES), so their aromaticity is already RDKit's: they are read without
    sanitizing again, which halves the cost (the parse is most of it). The scaffolds are
    the same (checked on 109k ChEMBL/DUD, RDKit's 5k NCI set with its inorganics and
    hypervalent atoms, and 20k MOSES molecules; a test keeps it so); a SMILES this path
    cannot read goes through the full one.

    RDKit's parse messages are blocked for the call (C++ side, cheap) rather than switched
    off and on through ``RDLogger`` per molecule, which cost more than the scaffold itself.
    """
    out = []
    with rdBase.BlockLogs():
        for s in smiles:
            if canonical:
                out.append(scaffold_of_canonical_smiles(s))
                continue
            mol = Chem.MolFromSmiles(s)
            out.append(MurckoScaffold.MurckoScaffoldSmiles(mol=mol) if mol is not None else "")
    return out
