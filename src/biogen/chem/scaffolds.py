"""Bemis-Murcko scaffolds (selection's per-scaffold cap, scaffold splits)."""

from __future__ import annotations

from collections.abc import Iterable

from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold


def murcko_scaffolds(smiles: Iterable[str]) -> list[str]:
    """Canonical Bemis-Murcko scaffold SMILES of each molecule ('' for acyclic or unreadable ones).

    RDKit's parse messages are blocked for the call (C++ side, cheap) rather than switched
    off and on through ``RDLogger`` per molecule, which cost more than the scaffold itself.
    """
    out = []
    with rdBase.BlockLogs():
        for s in smiles:
            mol = Chem.MolFromSmiles(s)
            out.append(MurckoScaffold.MurckoScaffoldSmiles(mol=mol) if mol is not None else "")
    return out


def murcko_scaffold(smiles: str) -> str:
    """The scaffold of one molecule (see ``murcko_scaffolds``)."""
    return murcko_scaffolds([smiles])[0]
