"""MQAR and SymbolSoup generators: determinism per seed, layout, labels and published constants."""

import numpy as np
import pytest

from sessa_jax.data import symbol_soup as ss
from sessa_jax.data.mqar import MQARSource


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed, split: MQARSource(seq_len=64, vocab_size=64, num_kv_pairs=8, seed=seed, split=split),
        lambda seed, split: ss.SymbolSoupSource(seq_len=96, min_tokens=60, max_tokens=96, seed=seed, split=split),
    ],
)
def test_deterministic_per_seed_and_split(make):
    a, b = make(0, 0), make(0, 0)
    assert all(_same(a[i], b[i]) for i in (0, 7, 12345 % len(a)))
    assert not _same(a[3], a[4])  # examples differ
    assert not _same(a[3], make(1, 0)[3])  # seeds differ
    assert not _same(a[3], make(0, 1)[3])  # train and eval streams differ


def test_mqar_answers_are_the_values_of_the_queried_keys():
    k, t = 8, 64
    src = MQARSource(seq_len=t, vocab_size=64, num_kv_pairs=k, seed=3)
    for i in range(50):
        ex = src[i]
        x, y, w = ex["inputs"], ex["targets"], ex["weights"]
        keys, values = x[0 : 2 * k : 2], x[1 : 2 * k : 2]
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


def test_symbol_soup_rows_score_only_the_class_at_the_label_position():
    t = 160
    src = ss.SymbolSoupSource(seq_len=t, min_tokens=100, max_tokens=150, seed=5, num_records=40)
    lengths, classes = set(), []
    for i in range(len(src)):
        ex = src[i]
        (n,) = np.nonzero(ex["segment_ids"])[0][-1:] + 1
        x, y = ex["inputs"], ex["targets"]
        assert 100 <= n <= 150 and x[0] == ss.BOS and x[n - 1] == ss.LABEL and x[n - 3] == ss.SEP
        assert np.all(x[n:] == ss.PAD) and np.all(ex["segment_ids"][:n] == 1)
        assert np.array_equal(y[: n - 1], x[1:n])  # next-token targets inside the text
        assert np.array_equal(ex["weights"], np.eye(t, dtype=np.float32)[n - 1])  # only <label> is scored
        classes.append(int(y[n - 1]) - ss.CLASS0)
        lengths.add(int(n))
    assert np.all(np.bincount(classes, minlength=ss.NUM_CLASSES) == 2)  # exactly balanced split
    assert len(lengths) > 5  # lengths vary, as published


def test_symbol_soup_styles_follow_the_published_construction_rule():
    """The construction rule: primaries/secondaries are positions 0-3/4-7 of ``random.Random(123|456)``
    shuffling a fresh alphabet per style (the tables themselves are compared with the published
    script's in tests/data/test_symbol_soup_published.py)."""
    import random

    for seed, family in ((123, ss.styles()[0]), (456, ss.styles()[1])):
        rng = random.Random(seed)
        for style in family:
            order = list("abcdefghijklmnop")
            rng.shuffle(order)
            assert "".join(ss.ALPHABET[k] for k in style.primaries) == "".join(order[:4])
            assert "".join(ss.ALPHABET[k] for k in style.secondaries) == "".join(order[4:8])
            prim = [ss.ALPHABET.index(c) for c in order[:4]]
            # preferred bigrams weigh x4: p0 -> p1 is 4 x 3 against 1 x 1 for an "other" symbol
            other = ss.ALPHABET.index(order[8])
            assert style.transition[prim[0], prim[1]] / style.transition[prim[0], other] == pytest.approx(12.0)


def test_symbol_soup_flip_rate_is_three_percent():
    """The same draws with and without flips differ exactly where a flip hit (rate 0.03)."""
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    clean = ss.styled_block(rng_a, 1, 3, 20000, ss.Process(flip_prob=0.0))
    noisy = ss.styled_block(rng_b, 1, 3, 20000)
    rate = np.mean(clean != noisy)
    assert abs(rate - 0.03) < 4 * np.sqrt(0.03 * 0.97 / 20000)  # 4 sd of a binomial rate


def test_generator_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data.seq_len=20 is too short for num_kv_pairs=8"):
        MQARSource(seq_len=20, num_kv_pairs=8)
    with pytest.raises(ValueError, match=r"data.mqar.vocab_size=16 gives 7 distinct keys"):
        MQARSource(seq_len=64, vocab_size=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match=r"data.seq_len=64 is shorter than data.symbol_soup.max_tokens=600"):
        ss.SymbolSoupSource(seq_len=64)
    with pytest.raises(ValueError, match=r"min_tokens=30, max_tokens=20 admit no example"):
        ss.SymbolSoupSource(seq_len=64, min_tokens=30, max_tokens=20)
    with pytest.raises(ValueError, match=r"train split size=30 must be a positive multiple of 20"):
        ss.SymbolSoupSource(seq_len=64, min_tokens=40, max_tokens=64, num_records=30)


def test_mqar_values_are_distinct_within_a_sequence_unless_asked_otherwise():
    k = 8
    distinct = MQARSource(seq_len=64, vocab_size=40, num_kv_pairs=k, seed=5)
    assert all(len(set(distinct[i]["inputs"][1 : 2 * k : 2].tolist())) == k for i in range(200))
    # 8 values from 20 with replacement repeat one in most sequences (P(no repeat) ~ 0.18).
    shared = MQARSource(seq_len=64, vocab_size=40, num_kv_pairs=k, seed=5, distinct_values=False)
    repeats = [len(set(shared[i]["inputs"][1 : 2 * k : 2].tolist())) < k for i in range(200)]
    assert 0.5 < np.mean(repeats) < 1.0


@pytest.mark.parametrize("k, v", [(1, 4), (3, 3), (4, 2), (4, 16), (5, 7)])
def test_no_association_closed_form_matches_enumerating_every_value_draw(k, v):
    import itertools

    from sessa_jax.data.mqar import no_association_accuracy

    # Expected (max value multiplicity) / K over all V^K equally likely draws.
    exact = np.mean([max(np.bincount(draw)) / k for draw in itertools.product(range(v), repeat=k)])
    assert no_association_accuracy(k, v, distinct_values=False) == pytest.approx(exact, rel=1e-12)
    if v >= k:
        assert no_association_accuracy(k, v) == 1.0 / k


@pytest.mark.parametrize("distinct", [True, False])
def test_frequency_baseline_measured_on_examples_matches_its_closed_form(distinct):
    from sessa_jax.data.mqar import frequency_baseline, no_association_accuracy

    k, vocab, n = 4, 32, 3000
    src = MQARSource(seq_len=32, vocab_size=vocab, num_kv_pairs=k, seed=1, split=2, distinct_values=distinct)
    batch = {key: np.stack([src[i][key] for i in range(n)]) for key in ("inputs", "targets", "weights")}
    measured = frequency_baseline(batch, k)
    closed = no_association_accuracy(k, vocab - vocab // 2, distinct_values=distinct)
    if distinct:
        assert measured == pytest.approx(closed, rel=1e-12)  # every sequence scores exactly 1/K
    else:  # a mean of n per-sequence scores in [1/K, 1]: within 5 standard errors
        assert abs(measured - closed) < 5 * 0.5 / np.sqrt(n)


def test_frequency_baseline_on_a_hand_made_sequence():
    from sessa_jax.data.mqar import frequency_baseline

    # pairs (1, 9) (2, 9) (3, 8): value 9 is the most frequent; queries ask keys 1, 2, 3.
    inputs = np.array([[1, 9, 2, 9, 3, 8, 1, 0, 2, 0, 3, 0]])
    targets = np.array([[0, 0, 0, 0, 0, 0, 9, 0, 9, 0, 8, 0]])
    weights = (targets > 0).astype(np.float32)
    assert frequency_baseline(dict(inputs=inputs, targets=targets, weights=weights), 3) == pytest.approx(2 / 3)
