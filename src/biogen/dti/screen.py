"""Protein-aware screening: rank a library for one protein, or a panel of proteins, with a
DTI model (``biogen train model=dti``).

    biogen screen scoring=protein_aware scoring.scorers.protein_aware.checkpoint=dti.ckpt \\
        target=custom target.name=ABL1 target.sequence=MLEICLKLVGCK...
    biogen screen scoring=protein_aware ... target.fasta=kinases.fasta      # a panel

The target proteins are embedded with the model's own protein language model (the
checkpoint names it and its weights' sha256: other weights are refused) or read from a
protein embedding store, and projected once. The compound side does not depend on the
target: a library that stores the model's compound projections (``biogen library embed
model=<checkpoint>``, ``embeddings/dti-<sha12>``) is scored with one matrix product per
block of rows; otherwise the projections are computed from the stored fingerprints as
the shards are read. The screen's score is the predicted affinity for the first protein
(the target); with several proteins the panel gets per-protein top-k and a selectivity
view after the ranking (``panel_hits.parquet``, ``panel_selective.parquet``).

Selectivity of a compound c for protein t: predicted affinity for t minus the highest
predicted affinity for t's ``neighbours`` nearest panel proteins (by cosine of their PLM
embeddings: for a kinase, its closest kinases). A compound predicted for t but not for
its closest relatives scores high. These are model predictions, not measurements: the
report shows the model's figures on proteins held out from its training.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.chem.records import Reject, write_rejects
from biogen.errors import ConfigError, InputError
from biogen.protein.fasta import sequence_key
from biogen.screen.stages import MoleculeBatch, ScreenContext, _Base

log = logging.getLogger(__name__)


@dataclass
class TargetPanel:
    """The proteins a screen scores: names and sequences (input order), what was rejected."""

    names: list[str]
    sequences: list[str]
    rejects: list[Reject] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def read_panel(name: str, sequence: str | None, fasta: str | None) -> TargetPanel:
    """``target.sequence`` (named ``target.name``) first, then every record of
    ``target.fasta``; invalid sequences become rejects; InputError when none is left."""
    from biogen.protein.fasta import check_sequence, iter_inputs

    names, seqs, rejects = [], [], []
    records = []
    if sequence:
        records.append(check_sequence(name, str(sequence), "target.sequence"))
    if fasta:
        records.extend(iter_inputs(str(fasta)))
    for r in records:
        if isinstance(r, Reject):
            rejects.append(r)
        elif r.id in names:
            rejects.append(Reject(r.source, r.record, "duplicate_id", f"protein name {r.id!r} is used twice; the "
                                  "first is kept (give the panel unique names)", r.sequence[:60], r.id))
        else:
            names.append(r.id)
            seqs.append(r.sequence)
    if not names:
        what = "target.sequence" if sequence and not fasta else "target.fasta" if fasta else "no protein"
        raise InputError(f"protein-aware scoring has no valid protein ({what}"
                         + (f"; {len(rejects)} rejected: {rejects[0].reason}: {rejects[0].detail}" if rejects else "")
                         + "): set target.sequence=<amino acids> or target.fasta=<file of one or more proteins>")
    return TargetPanel(names, seqs, rejects)


def embed_panel(predictor, panel: TargetPanel, device: str = "cpu", protein_store: str | None = None,
                protein_model: str | None = None) -> tuple[np.ndarray, dict, list[bool]]:
    """PLM vectors (P x E float32) of the panel's proteins, made by the model the DTI
    checkpoint was trained on (refused otherwise), the PLM's info and which were truncated."""
    from biogen.dti.predictor import DTISpec, protein_vectors

    model = protein_model or predictor.protein.get("model")
    if protein_store:
        spec = DTISpec(protein_store=str(protein_store))
    else:
        spec = DTISpec(protein_model=str(model), protein_dtype=str(predictor.protein.get("dtype") or "auto"))
    vectors, info, missing = protein_vectors(panel.sequences, spec, device=device)
    predictor.check_protein_model(info, "target proteins' embeddings" if not protein_store
                                  else f"protein store {protein_store}")
    if missing:
        i, why = next(iter(sorted(missing.items())))
        raise InputError(f"target protein {panel.names[i]}: {why}; embed it into the store (biogen embed) or leave "
                         "protein_store unset to embed the panel with the model's PLM")
    limit = (info.get("max_len") or 0) if info.get("family") != "unirep" else 0
    truncated = [bool(limit and len(s) > limit) for s in panel.sequences]
    return vectors, info, truncated


class ProteinAwareScorer(_Base):
    """Predicted affinity for the target protein(s) from a DTI checkpoint.

    checkpoint: a ``model.ckpt`` from ``biogen train model=dti`` (required); proteins:
    ``target.sequence`` and/or ``target.fasta`` (the first is the screen's target);
    protein_store: an embedding store holding them (default: embed with the model's PLM);
    top_k: hits per protein in the panel outputs; pool: how many of each protein's best
    compounds the selectivity view considers; neighbours: the closest panel proteins a
    selective compound must not be predicted for; batch_size: compounds per projection.
    """

    kind = "score"
    worker_modules = ("torch",)
    whole_library_outputs = True  # finish: the panel's per-protein tables over the whole library

    def __init__(self, checkpoint: str | None = None, protein_store: str | None = None,
                 protein_model: str | None = None, top_k: int = 100, pool: int = 1000, neighbours: int = 3,
                 batch_size: int = 65536, name: str | None = None):
        if not checkpoint:
            raise ConfigError("protein-aware scoring needs a DTI model: set scoring.scorers.protein_aware.checkpoint="
                              "<model.ckpt> (train one with: biogen train model=dti train_data=kiba "
                              "train_data.path=<DeepDTA's data/kiba>)")
        if int(top_k) < 1 or int(pool) < 1 or int(neighbours) < 0:
            raise ConfigError(f"protein_aware: top_k={top_k}, pool={pool} must be >= 1, neighbours={neighbours} >= 0")
        self.checkpoint = str(Path(str(checkpoint)).absolute())  # workers may run elsewhere
        self.protein_store = None if protein_store is None else str(protein_store)
        self.protein_model = None if protein_model is None else str(protein_model)
        self.top_k, self.pool, self.neighbours = int(top_k), max(int(pool), int(top_k)), int(neighbours)
        self.batch_size = int(batch_size)
        self.name = name or "protein_aware"
        self.accelerator = "cpu"
        self.panel: TargetPanel | None = None
        self.plm: np.ndarray | None = None       # P x E target PLM vectors
        self.zp: np.ndarray | None = None        # P x latent projected targets (unit rows)
        self.head: tuple[float, float] = (1.0, 0.0)  # affinity = head[0] * cosine + head[1]
        self.plm_info: dict = {}
        self.truncated: list[bool] = []
        self.model_info: dict = {}
        self.projected = False                   # the library stores this model's compound projections
        self._predictor = None

    def __getstate__(self):
        return {**self.__dict__, "_predictor": None}  # workers load the checkpoint only when they project

    def prepare(self, ctx: ScreenContext) -> None:
        from biogen.dti.predictor import DTIPredictor
        from biogen.embeddings.dti import store_name

        t0 = time.perf_counter()
        predictor = DTIPredictor.load(self.checkpoint)
        lib = ctx.library
        if predictor.dense:  # trained on compound embeddings: the library's stored vectors of that model
            from biogen.embeddings.base import EmbeddingSpec

            if lib is None:
                raise ConfigError(f"the DTI model {self.checkpoint} reads {predictor.featurizer.model} embeddings; "
                                  "this screen has no library")
            entry = lib.embedding_entry(predictor.featurizer.model)  # names `library embed` when absent
            predictor.check_featurizer(EmbeddingSpec.of(entry), "library")
        else:
            predictor.check_featurizer(ctx.featurizer, "library")
        target = ctx.target
        if target is None or not (target.sequence or getattr(target, "fasta", None)):
            raise ConfigError("protein-aware scoring needs the target protein: set target.sequence=<amino acids> or "
                              "target.fasta=<file of one or more proteins> (several: a panel)")
        self.panel = read_panel(target.name, target.sequence, getattr(target, "fasta", None))
        if self.panel.rejects:
            path = write_rejects(self.panel.rejects, ctx.run_dir / "protein_rejects.csv")
            log.warning("%d target protein(s) could not be used; see %s", len(self.panel.rejects), path)
        self.accelerator = ctx.accelerator
        self.plm, self.plm_info, self.truncated = embed_panel(predictor, self.panel, ctx.accelerator,
                                                              self.protein_store, self.protein_model)
        for n, t in zip(self.panel.names, self.truncated):
            if t:
                log.warning("target %s is longer than %s's limit (%s residues): embedded truncated",
                            n, self.plm_info.get("model"), self.plm_info.get("max_len"))
        self.zp = predictor.project_proteins(self.plm)
        a = float(predictor.affinity(np.array([1.0], np.float32))[0])
        b = float(predictor.affinity(np.array([0.0], np.float32))[0])
        self.head = (a - b, b)
        name = store_name(predictor.sha256)
        if lib is not None and name in lib.embedding_models:
            lib.embedding_entry(name)  # complete, or LibraryError naming the command that completes it
            self.embeddings = name
            self.projected = True
        else:
            source = f"{predictor.featurizer.model} vectors" if predictor.dense else "fingerprints"
            log.info("the library stores no projections of this DTI model: computing them from its %s (store them "
                     "once with: biogen library embed library=%s model=%s)", source,
                     getattr(lib, "path", "<library>"), self.checkpoint)
            if predictor.dense:
                self.embeddings = predictor.featurizer.model  # workers get the stored input vectors
        self._predictor = predictor
        self.model_info = {"checkpoint": self.checkpoint, "checkpoint_sha256": predictor.sha256,
                           "library_vectors": self.embeddings if self.projected else "computed from the library's "
                           + (f"{self.embeddings} vectors" if self.embeddings else "fingerprints"),
                           "protein_model": predictor.protein.get("model"), "protein_sha256": predictor.protein.get("sha256"),
                           "trained_on": predictor.info.get("source"), "split": predictor.info.get("split"),
                           "evaluation": {k: v for k, v in predictor.metrics.items() if k.startswith("test_")},
                           "proteins": list(self.panel.names), "truncated": [n for n, t in
                                                                          zip(self.panel.names, self.truncated) if t],
                           "prepare_seconds": round(time.perf_counter() - t0, 3)}
        self.train_metrics = None

    def load(self) -> None:
        if not self.projected and self._predictor is None:
            from biogen.dti.predictor import DTIPredictor

            self._predictor = DTIPredictor.load(self.checkpoint)
            if self.accelerator != "cpu":
                self._predictor.net.to(self.accelerator)

    def compound_vectors(self, batch: MoleculeBatch) -> np.ndarray:
        """The batch's unit compound projections (N x latent float32; NaN rows: none stored)."""
        if self.projected:
            v = batch.embeddings[self.embeddings]
            return v / np.linalg.norm(v, axis=1, keepdims=True)
        if self._predictor is None:
            self.load()
        x = batch.embeddings[self.embeddings] if self.embeddings else batch.fps
        return self._predictor.project_compounds(x, self.batch_size)

    def __call__(self, batch: MoleculeBatch) -> np.ndarray:
        v = self.compound_vectors(batch)
        return self.head[0] * (v @ self.zp[0]).astype(np.float64) + self.head[1]

    def describe(self) -> str:
        n = 0 if self.panel is None else len(self.panel)
        who = "" if self.panel is None else self.panel.names[0] + (f" (+{n - 1} in the panel)" if n > 1 else "")
        inputs = ("stored projections" if self.projected else
                  f"{self.embeddings or 'fingerprint'} projections")
        seq = "" if self.panel is None else f", sequence sha256 {sequence_key(self.panel.sequences[0])[:12]}"
        return (f"{self.name}: predicted affinity for {who} by the DTI model {self.checkpoint} "
                f"({self.plm_info.get('model')} proteins, {inputs}{seq})")

    # ------------------------------------------------------------------ after the ranking
    def finish(self, library, alive: np.ndarray, run_dir: Path) -> dict:
        """The panel outputs (per-protein top-k, selectivity) over the molecules that passed
        the filters, and what the report shows of the model."""
        t0 = time.perf_counter()
        out = {"title": "Protein-aware model", "facts": self._facts(), "tables": [], "files": []}
        if self.panel is None or not alive.any():
            return out
        hits = panel_topk(library, self, alive, self.pool)
        tables = panel_tables(library, self, hits)
        for key, table in tables.items():
            pq.write_table(table, run_dir / f"{key}.parquet")
            out["files"].append(f"{key}.parquet")
        first = self.panel.names[0]
        top = tables["panel_hits"]
        show = ["rank", "id", "smiles", "affinity", "off_target", "off_target_affinity", "selectivity"]
        mask = np.asarray(top.column("target").to_pylist()) == first
        out["tables"].append((f"{first}: the best {min(10, int(mask.sum()))} by predicted affinity",
                              top.filter(pa.array(mask)).select(show).slice(0, 10)))
        if "panel_selective" in tables:
            sel = tables["panel_selective"]
            mask = np.asarray(sel.column("target").to_pylist()) == first
            pool = min(self.pool, int(alive.sum()))
            out["tables"].append((f"{first}: the most selective of its best {pool} (vs its "
                                  f"{min(self.neighbours, len(self.panel) - 1)} closest panel proteins)",
                                  sel.filter(pa.array(mask)).select(show).slice(0, 10)))
            out["tables"].append(("Panel: each protein's closest proteins and best compounds",
                                  tables["panel_targets"]))
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out

    def _facts(self) -> dict:
        m = self.model_info
        ev = m.get("evaluation") or {}
        shown = ", ".join(f"{k[5:]} {v:.3f}" for k, v in ev.items() if isinstance(v, float)
                          and k[5:] in ("ci", "rmse", "spearman_median", "auroc", "aupr"))
        return {"DTI model": f"{m.get('checkpoint')} (sha256 {str(m.get('checkpoint_sha256'))[:12]})",
                "protein language model": f"{m.get('protein_model')} (sha256 {str(m.get('protein_sha256'))[:12]})",
                "trained on": f"{m.get('trained_on')}, split {m.get('split')}",
                "its test figures": (shown or "none recorded")
                + (" (proteins held out from training)" if m.get("split") in ("unseen_protein", "unseen_both") else
                   " (the held-out pairs share proteins with training: expect less on new proteins)"),
                "proteins": ", ".join(m.get("proteins", [])[:12]) + (
                    f" ... ({len(m.get('proteins', []))})" if len(m.get("proteins", [])) > 12 else ""),
                "library vectors": m.get("library_vectors"),
                "note": "scores are model predictions of affinity, not measurements"}


# ----------------------------------------------------------------------------- panel

def _row_offsets(library) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([s.rows for s in library.shards])]).astype(np.int64)


def _blocks(library, scorer: ProteinAwareScorer, alive: np.ndarray, device):
    """(unit vectors torch [b, d], library rows) of the living molecules, in blocks."""
    import torch

    from biogen.search.embedding import BLOCK_ROWS

    offsets = _row_offsets(library)
    pending_v, pending_r, n = [], [], 0
    for i, shard in enumerate(library.shards):
        rows = np.flatnonzero(alive[offsets[i]:offsets[i + 1]])
        if not len(rows):
            continue
        v = _vectors_of(library, scorer, shard, rows)
        ok = np.isfinite(v).all(axis=1)
        pending_v.append(v[ok])
        pending_r.append(offsets[i] + rows[ok])
        n += int(ok.sum())
        if n >= BLOCK_ROWS:
            yield torch.from_numpy(np.concatenate(pending_v)).to(device), np.concatenate(pending_r)
            pending_v, pending_r, n = [], [], 0
    if n:
        yield torch.from_numpy(np.concatenate(pending_v)).to(device), np.concatenate(pending_r)


def _vectors_of(library, scorer: ProteinAwareScorer, shard, rows: np.ndarray) -> np.ndarray:
    """Unit compound projections (float32) of ``rows`` of one shard (NaN: no vector)."""
    stored = None
    if scorer.embeddings is not None:
        from biogen.library.embeddings import shard_dir

        stored = np.asarray(np.load(shard_dir(library.path, scorer.embeddings, shard.name) / "vectors.npy",
                                    mmap_mode="r")[rows], dtype=np.float32)
    if scorer.projected:
        return stored / np.linalg.norm(stored, axis=1, keepdims=True)
    if scorer._predictor is None:
        scorer.load()
    x = stored if stored is not None else np.asarray(shard.fingerprints[rows])
    return scorer._predictor.project_compounds(x, scorer.batch_size)


def panel_topk(library, scorer: ProteinAwareScorer, alive: np.ndarray, k: int):
    """(protein index, library row, cosine) of each protein's ``k`` best living molecules:
    exact, one matrix product per block (``biogen.search.embedding.exact_scan``)."""
    import torch

    from biogen.search.embedding import exact_scan

    device = torch.device(scorer.accelerator if scorer.accelerator != "cpu" else "cpu")
    qv = torch.from_numpy(np.ascontiguousarray(scorer.zp, dtype=np.float32)).to(device)
    return exact_scan(qv, _blocks(library, scorer, alive, device), k=k)


def _neighbours(plm: np.ndarray, n: int) -> np.ndarray:
    """P x n indices of each protein's closest other panel proteins (PLM cosine)."""
    p = len(plm)
    n = min(n, p - 1)
    if n <= 0:
        return np.zeros((p, 0), dtype=np.int64)
    u = plm / np.linalg.norm(plm, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :n]


def panel_tables(library, scorer: ProteinAwareScorer, hits) -> dict[str, pa.Table]:
    """panel_hits (each protein's top_k by predicted affinity), panel_selective (each
    protein's top_k by selectivity among its ``pool`` best) and panel_targets."""
    qi, rows, cos = hits
    names = scorer.panel.names
    uniq, inv = np.unique(rows, return_inverse=True)
    offsets = _row_offsets(library)
    shard_of = np.searchsorted(offsets, uniq, side="right") - 1
    vec = np.zeros((len(uniq), scorer.zp.shape[1]), np.float32)
    ids = np.empty(len(uniq), dtype=object)
    smiles = np.empty(len(uniq), dtype=object)
    for s in np.unique(shard_of):
        at = np.flatnonzero(shard_of == s)
        shard = library.shards[int(s)]
        local = uniq[at] - offsets[s]
        vec[at] = _vectors_of(library, scorer, shard, local)
        meta = shard.metadata(["id", "smiles"]).take(pa.array(local))
        ids[at] = meta.column("id").to_pylist()
        smiles[at] = meta.column("smiles").to_pylist()
    aff_all = scorer.head[0] * (vec @ scorer.zp.T).astype(np.float64) + scorer.head[1]  # U x P
    nb = _neighbours(scorer.plm, scorer.neighbours)
    aff = scorer.head[0] * cos + scorer.head[1]
    if nb.shape[1]:
        nbq = nb[qi]                                        # hit x n
        off_aff = aff_all[inv[:, None], nbq]
        j = np.argmax(off_aff, axis=1)
        off_best = off_aff[np.arange(len(qi)), j]
        off_name = np.asarray(names, dtype=object)[nbq[np.arange(len(qi)), j]]
    else:
        off_best = np.full(len(qi), np.nan)
        off_name = np.full(len(qi), None, dtype=object)
    sel = aff - off_best
    rank = np.empty(len(qi), dtype=np.int64)
    starts = np.searchsorted(qi, qi, side="left")
    rank[:] = np.arange(len(qi)) - starts + 1                # hits come in (protein, score desc, row) order

    def table(idx: np.ndarray, ranks: np.ndarray) -> pa.Table:
        return pa.table({"target": pa.array([names[i] for i in qi[idx]], pa.string()),
                         "rank": pa.array(ranks, pa.int64()), "row": pa.array(rows[idx], pa.int64()),
                         "id": pa.array(ids[inv[idx]].tolist(), pa.string()),
                         "smiles": pa.array(smiles[inv[idx]].tolist(), pa.string()),
                         "affinity": pa.array(aff[idx]), "cosine": pa.array(cos[idx]),
                         "off_target": pa.array(off_name[idx].tolist(), pa.string()),
                         "off_target_affinity": pa.array(off_best[idx]), "selectivity": pa.array(sel[idx])})

    top = np.flatnonzero(rank <= scorer.top_k)
    out = {"panel_hits": table(top, rank[top])}
    if nb.shape[1]:
        order = np.lexsort((rows, -aff, -sel, qi))           # per protein: selectivity desc, affinity, row
        srank = np.empty(len(qi), dtype=np.int64)
        qs = qi[order]
        srank[order] = np.arange(len(qi)) - np.searchsorted(qs, qs, side="left") + 1
        pick = order[srank[order] <= scorer.top_k]
        out["panel_selective"] = table(pick, srank[pick])
        best_sel = {}
        for i in pick[srank[pick] == 1]:
            best_sel[int(qi[i])] = (ids[inv[i]], sel[i])
        first = {int(qi[i]): (ids[inv[i]], aff[i]) for i in top[rank[top] == 1]}
        out["panel_targets"] = pa.table({
            "target": pa.array(names, pa.string()),
            "length": pa.array([len(s) for s in scorer.panel.sequences], pa.int64()),
            "closest": pa.array([", ".join(names[j] for j in nb[p]) for p in range(len(names))], pa.string()),
            "best_compound": pa.array([first.get(p, (None, None))[0] for p in range(len(names))], pa.string()),
            "best_affinity": pa.array([first.get(p, (None, np.nan))[1] for p in range(len(names))], pa.float64()),
            "most_selective": pa.array([best_sel.get(p, (None, None))[0] for p in range(len(names))], pa.string()),
            "its_selectivity": pa.array([best_sel.get(p, (None, np.nan))[1] for p in range(len(names))],
                                        pa.float64())})
    return out
