"""Vectorized ESM tokenizer: one numpy lookup over the bytes of all sequences at once.

The alphabet is fair-esm's ``ESM-1b`` alphabet, shared by every ESM-2 model (33 tokens:
``<cls> <pad> <eos> <unk>``, the 20 amino acids, ``X B U Z O . -``, ``<null_1> <mask>``).
Lower case letters map to their upper case tokens (fair-esm would map them to ``<unk>``);
any other byte maps to ``<unk>``. Each sequence becomes ``<cls> residues <eos>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N",
          "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32


def _lookup() -> np.ndarray:
    lut = np.full(256, UNK, dtype=np.int64)
    for i, t in enumerate(TOKENS):
        if len(t) == 1:
            lut[ord(t)] = i
            lut[ord(t.lower())] = i
    return lut


LUT = _lookup()


@dataclass(frozen=True)
class PackedTokens:
    """Sequences packed into one token stream without padding.

    tokens: T int64 (``<cls> s0 <eos> <cls> s1 <eos> ...``); cu_seqlens: B+1 int64 offsets
    of each sequence's first token (``cu_seqlens[-1] == T``); lengths: B residues each."""

    tokens: np.ndarray
    cu_seqlens: np.ndarray
    lengths: np.ndarray

    @property
    def max_tokens(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max(initial=0))


def encode_packed(seqs: Sequence[str]) -> PackedTokens:
    """Tokenize ``seqs`` into one packed stream (BOS + residues + EOS each)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    n = len(seqs)
    raw = np.frombuffer("".join(seqs).encode("ascii", errors="replace"), dtype=np.uint8)  # '?' (-> <unk>) per non-ASCII
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths + 2, out=cu[1:])
    tokens = np.empty(int(cu[-1]), dtype=np.int64)
    tokens[cu[:-1]] = CLS
    tokens[cu[1:] - 1] = EOS
    # residue j of sequence i sits at cu[i] + 1 + j = (global residue index) + 2 i + 1
    pos = np.arange(raw.size, dtype=np.int64) + np.repeat(2 * np.arange(n, dtype=np.int64) + 1, lengths)
    tokens[pos] = LUT[raw]
    return PackedTokens(tokens, cu, lengths)


def encode_padded(seqs: Sequence[str]) -> np.ndarray:
    """B x (max_len + 2) int64, padded with ``<pad>`` (what fair-esm's BatchConverter returns
    for upper case input); used by the reference paths and tests."""
    packed = encode_packed(seqs)
    width = int((packed.lengths + 2).max(initial=0))
    out = np.full((len(seqs), width), PAD, dtype=np.int64)
    col = np.arange(packed.tokens.size) - np.repeat(packed.cu_seqlens[:-1], packed.lengths + 2)
    row = np.repeat(np.arange(len(seqs)), packed.lengths + 2)
    out[row, col] = packed.tokens
    return out
