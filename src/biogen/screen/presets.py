"""The screen's library: an existing store, or a preset built on the fly from packaged
real data and cached (``~/.cache/biogen/libraries/<preset>-<key>``).

Preset ``moses_test_actives``: MOSES test (176,074 ZINC drug-like molecules, molsets
package) with the target's held-out actives mixed in, so that a screen can measure how
many of them it recovers. Built with ``standardize=none`` (MOSES and MoleculeACE SMILES
are already curated parent structures) and the descriptors the filter presets use. Left
out, to keep the first run short: QED (about 1 ms per molecule; a filter that needs it
computes it on the fly) and the scaffold (about 0.2 ms; the selection computes the few
thousand it needs).
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import ConfigError, InputError
from biogen.files import atomic_path, json_digest
from biogen.runtime import RuntimeSpec

log = logging.getLogger(__name__)
PRESETS = ("moses_test_actives",)
PRESET_DESCRIPTORS = ("mw", "clogp", "tpsa", "hbd", "hba", "rotatable_bonds", "rings", "aromatic_rings",
                      "heavy_atoms", "formal_charge", "fsp3")


@dataclass(frozen=True)
class LibrarySpec:
    """Config group ``library``.

    path: an existing library directory (``biogen library build``); when null, ``preset``
    is built from the packaged data set ``base`` (optionally its first ``limit``
    molecules) with the target's held-out actives mixed in, and cached in ``cache_dir``.
    featurizer: the preset's fingerprint (ignored for an existing library, which has its own).
    """

    path: str | None = None
    preset: str | None = "moses_test_actives"
    base: str = "moses_test"
    limit: int | None = None
    cache_dir: str = "~/.cache/biogen/libraries"
    featurizer: dict = field(default_factory=lambda: FingerprintSpec().to_dict())
    descriptors: tuple[str, ...] = PRESET_DESCRIPTORS
    chunk_size: int = 10_000

    def __post_init__(self) -> None:
        if self.path is None and self.preset not in PRESETS:
            raise ConfigError(f"library.preset={self.preset!r} is unknown; choose one of {', '.join(PRESETS)} "
                              "or give library.path=<a library directory>")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"library.limit={self.limit} must be >= 1 or null")


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{int(st.st_mtime)}"


def _preset_root(spec: LibrarySpec, target_name: str, held_out: list[str]) -> tuple[Path, Path]:
    """The preset's cache directory (keyed by everything that decides its content) and its base input."""
    from biogen import __version__
    from biogen.datasets import dataset_path

    base = Path(dataset_path(spec.base))
    featurizer = FingerprintSpec.from_dict(dict(spec.featurizer))
    # json_digest is the same canonical JSON (sorted keys) this key was always hashed from, so
    # cache directories made by earlier versions keep their names.
    key = json_digest({"preset": spec.preset, "base": _file_key(base), "limit": spec.limit,
                       "target": target_name, "held_out": sorted(held_out),
                       "featurizer": featurizer.to_dict(), "descriptors": list(spec.descriptors),
                       "chunk_size": spec.chunk_size, "biogen": __version__})[:12]
    return Path(os.path.expanduser(spec.cache_dir)) / f"{spec.preset}-{target_name}-{key}", base


def cached_preset(spec: LibrarySpec, target_name: str, held_out: list[str]) -> Path | None:
    """The preset library's directory if a complete build of it is in the cache, else None."""
    root, _ = _preset_root(spec, target_name, held_out)
    if (root / "library" / "manifest.json").exists() and not (root / "library" / "_work").exists():
        log.info("library preset %s (cached): %s", spec.preset, root / "library")
        return root / "library"
    return None


def preset_library(spec: LibrarySpec, target_name: str, held_out: list[str], runtime: RuntimeSpec) -> Path:
    """Build (or find in the cache) the preset library; returns its directory."""
    from biogen.library.ingest import build_library

    cached = cached_preset(spec, target_name, held_out)
    if cached is not None:
        return cached
    root, base = _preset_root(spec, target_name, held_out)
    featurizer = FingerprintSpec.from_dict(dict(spec.featurizer))
    inputs_dir = root / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    base_input = base
    if spec.limit is not None:
        base_input = inputs_dir / f"{spec.base}_first{spec.limit}.csv"
        if not base_input.exists():
            with atomic_path(base_input) as tmp, gzip.open(base, "rt") as src, open(tmp, "w") as dst:
                for i, line in enumerate(src):
                    if i > spec.limit:
                        break
                    dst.write(line)
    inputs = [str(base_input)]
    if held_out:
        spike = inputs_dir / f"{target_name}_held_out_actives.smi"
        if not spike.exists():
            with atomic_path(spike) as tmp:
                tmp.write_text("".join(f"{s} {target_name}:heldout{i + 1}\n" for i, s in enumerate(held_out)))
        inputs.append(str(spike))
    log.info("building library preset %s (%s%s + %d held-out actives of %s) into %s; cached for later runs",
             spec.preset, spec.base, f", first {spec.limit}" if spec.limit else "", len(held_out), target_name, root)
    try:
        report = build_library(inputs, root / "library", featurizer=featurizer, standardize=StandardizeSpec(enabled=False),
                               descriptors=spec.descriptors, chunk_size=spec.chunk_size, runtime=runtime)
    except InputError as exc:
        raise InputError(f"could not build library preset {spec.preset}: {exc}") from exc
    log.info("%s", report.summary())
    return root / "library"
