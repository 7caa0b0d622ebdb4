"""MQAR and SymbolSoup generators: determinism per seed and labels consistent with construction."""

import numpy as np
import pytest

from sessa_jax.data import symbol_soup as ss
from sessa_jax.data.mqar import MQARSource


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make", [
    lambda seed, split: MQARSource(seq_len=64, vocab_size=64, num_kv_pairs=8, seed=seed, split=split),
    lambda seed, split: ss.SymbolSoupSource(seq_len=96, block_len=24, seed=seed, split=split),
])
def test_deterministic_per_seed_and_split(make):
    a, b = make(0, 0), make(0, 0)
    assert all(_same(a[i], b[i]) for i in (0, 7, 12345))
    assert not _same(a[3], a[4])  # examples differ
    assert not _same(a[3], make(1, 0)[3])  # seeds differ
    assert not _same(a[3], make(0, 1)[3])  # train and eval streams differ


def test_mqar_answers_are_the_values_of_the_queried_keys():
    k, t = 8, 64
    src = MQARSource(seq_len=t, vocab_size=64, num_kv_pairs=k, seed=3)
    for i in range(50):
        ex = src[i]
        x, y, w = ex["inputs"], ex["targets"], ex["weights"]
        keys, values = x[0:2 * k:2], x[1:2 * k:2]
        assert len(set(keys.tolist())) == k and keys.min() >= 1 and keys.max() < 32
        assert values.min() >= 32 and values.max() < 64
        table = dict(zip(keys.tolist(), values.tolist()))
        (qpos,) = np.nonzero(w)
        assert len(qpos) == k and qpos.min() >= 2 * k and np.all(qpos % 2 == 0)
        assert sorted(x[qpos].tolist()) == sorted(keys.tolist())  # every key queried once
        assert all(y[p] == table[x[p]] for p in qpos)
        rest = np.ones(t, bool)
        rest[: 2 * k] = False
        rest[qpos] = False
        assert np.all(x[rest] == 0)  # query region is filler except the queries


def _blocks(seq):
    s1, s2 = np.nonzero(seq == ss.SEP1)[0], np.nonzero(seq == ss.SEP2)[0]
    return [seq[a + 1:b] for a, b in zip(s1, s2)]


def _most_likely_style(block, styles):
    ll = [np.log(s.transition[block[:-1], block[1:]] * 0.97 + 0.03 / ss.NUM_SYMBOLS).sum() for s in styles]
    return int(np.argmax(ll))


def test_symbol_soup_layout_and_labels_match_the_styles_that_made_the_blocks():
    t, blk = 200, 48
    src = ss.SymbolSoupSource(seq_len=t, block_len=blk, seed=5)
    styles = ss.styles(0)
    orders = set()
    for i in range(60):
        ex = src[i]
        seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
        assert len(seq) == t + 1 and seq[0] == ss.BOS and seq[-2] == ss.SEP
        assert np.array_equal(ex["weights"], np.eye(t, dtype=np.float32)[-1])  # only <label> is scored
        specials = seq[(seq >= ss.NUM_SYMBOLS)]
        assert specials[:-1].tolist() == [ss.BOS, ss.SEP1, ss.SEP2, ss.SEP1, ss.SEP2, ss.SEP]
        blocks = _blocks(seq)
        assert [len(b) for b in blocks] == [blk, blk]
        found = [_most_likely_style(b, styles) for b in blocks]
        left = [f for f in found if f < ss.NUM_LEFT]
        right = [f - ss.NUM_LEFT for f in found if f >= ss.NUM_LEFT]
        assert len(left) == 1 and len(right) == 1  # one block of each family
        assert seq[-1] == ss.LABEL0 + ss.label_of(left[0], right[0])
        orders.add(found[0] < ss.NUM_LEFT)
    assert orders == {True, False}  # both block orders occur


def test_symbol_soup_noise_rate_is_about_three_percent():
    """With motifs off, a symbol departs from the chain's support only through noise."""
    rng = np.random.default_rng(0)
    style = ss.Style(np.eye(ss.NUM_SYMBOLS)[np.roll(np.arange(ss.NUM_SYMBOLS), 1)], np.zeros(4, int))
    block = ss.styled_block(rng, style, 20000, motif_prob=0.0, noise_prob=0.03)
    successor = style.transition.argmax(axis=1)
    off_chain = np.mean(block[1:] != successor[block[:-1]])
    # each flip breaks about two transitions, minus flips to the same symbol (1/16): ~0.056
    assert 0.045 < off_chain < 0.068


def test_generator_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data.seq_len=20 is too short for num_kv_pairs=8"):
        MQARSource(seq_len=20, num_kv_pairs=8)
    with pytest.raises(ValueError, match=r"data.mqar.vocab_size=16 gives 7 distinct keys"):
        MQARSource(seq_len=64, vocab_size=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match=r"need seq_len >= 70 or a smaller block_len"):
        ss.SymbolSoupSource(seq_len=64, block_len=32)
