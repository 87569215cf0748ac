"""The vectorized ESM tokenizer against fair-esm's Alphabet/BatchConverter (the oracle)."""

import esm
import numpy as np
import pytest

from biogen.protein.tokenizer import CLS, EOS, MASK, PAD, TOKENS, UNK, encode_packed, encode_padded

ALPHABET = esm.Alphabet.from_architecture("ESM-1b")


def test_alphabet_is_fair_esms():
    assert list(TOKENS) == ALPHABET.all_toks
    assert (CLS, PAD, EOS, UNK, MASK) == (ALPHABET.cls_idx, ALPHABET.padding_idx, ALPHABET.eos_idx,
                                          ALPHABET.unk_idx, ALPHABET.mask_idx)


def test_padded_equals_fair_esm_batch_converter():
    rng = np.random.default_rng(0)
    letters = list("LAGVSERTIDPKQNFYMHWCXBUZO")
    seqs = ["".join(rng.choice(letters, size=n)) for n in (1, 7, 30, 200, 3, 64)]
    _, _, ref = ALPHABET.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    np.testing.assert_array_equal(encode_padded(seqs), ref.numpy())


def test_packed_layout():
    seqs = ["MKV", "A", "WWYYC"]
    p = encode_packed(seqs)
    np.testing.assert_array_equal(p.cu_seqlens, [0, 5, 8, 15])
    np.testing.assert_array_equal(p.lengths, [3, 1, 5])
    assert p.max_tokens == 7
    for i, s in enumerate(seqs):
        a, b = p.cu_seqlens[i], p.cu_seqlens[i + 1]
        assert p.tokens[a] == CLS and p.tokens[b - 1] == EOS
        assert [TOKENS[t] for t in p.tokens[a + 1:b - 1]] == list(s)


def test_lower_case_and_unknown_characters():
    assert np.array_equal(encode_packed(["mkvxbuzo"]).tokens, encode_packed(["MKVXBUZO"]).tokens)
    # unknown ASCII and non-ASCII characters become <unk>, one token per character
    p = encode_packed(["A*J\u00e9A"])
    assert [TOKENS[t] for t in p.tokens] == ["<cls>", "A", "<unk>", "J" if "J" in TOKENS else "<unk>", "<unk>",
                                             "A", "<eos>"]
    assert p.lengths[0] == 5


@pytest.mark.parametrize("seqs", [[], [""]])
def test_edge_inputs(seqs):
    p = encode_packed(seqs)
    assert p.tokens.size == 2 * len(seqs)
    assert encode_padded(seqs).shape == (len(seqs), 2 if seqs else 0)
