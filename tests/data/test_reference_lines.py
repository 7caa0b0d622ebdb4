"""SymbolSoup reference lines: block parsing, features and the fitted regressions on toy cases."""

import numpy as np
import pytest

from sessa_jax.baselines import reference as ref
from sessa_jax.data import symbol_soup as ss


def _rows(examples, seq_len):
    rows = [ss.to_training_example(ex.tokens(), ex.label, seq_len) for ex in examples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _examples(n, seed=0, lo=60, hi=90):
    labels = ss.balanced_labels(seed, 0, n)
    return [ss.sample_example(np.random.default_rng([seed, i]), int(y), lo, hi) for i, y in enumerate(labels)]


def test_blocks_features_and_labels_are_read_back_from_the_token_ids():
    exs = _examples(20)
    batch = _rows(exs, 96)
    np.testing.assert_array_equal(ref.labels_of(batch), [ex.label for ex in exs])
    uni, bi = ref.unigram_features(batch["inputs"]), ref.bigram_features(batch["inputs"])
    for ex, row, u, b in zip(exs, batch["inputs"], uni, bi):
        blocks = ref.text_blocks(row)
        want = [ex.noise[0], ex.styled[0], ex.noise[1], ex.styled[1], ex.noise[2]]
        assert len(blocks) == 5 and all(np.array_equal(g, w) for g, w in zip(blocks, want))
        symbols = np.concatenate(want)
        np.testing.assert_allclose(u, np.bincount(symbols, minlength=16) / len(symbols), rtol=0, atol=1e-15)
        pairs = np.zeros((16, 16))
        for blk in want:  # adjacent pairs inside each block only
            for a, c in zip(blk[:-1], blk[1:]):
                pairs[a, c] += 1
        np.testing.assert_allclose(b, (pairs / pairs.sum()).ravel(), rtol=0, atol=1e-15)


def test_the_markov_oracle_line_is_the_oracle_on_the_generated_styled_blocks():
    exs = _examples(40, seed=3)
    want = np.mean([ss.markov_oracle(ex.styled[0], ex.styled[1]) == ex.label for ex in exs])
    assert ref.markov_oracle_accuracy(_rows(exs, 96)) == want


def test_softmax_regression_separates_separable_classes_and_ignores_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    x = rng.normal(size=(200, 6)) * 0.1
    x[np.arange(200), y] += 1.0  # class c lights up feature c
    predict = ref.fit_softmax_regression(x, y, l2=1e-3, num_classes=4)
    assert np.mean(predict(x) == y) == 1.0
    # features independent of the labels: test accuracy stays near chance (1/4), within 5 SE
    xs, ys = rng.normal(size=(400, 6)), rng.integers(0, 4, 400)
    xt, yt = rng.normal(size=(2000, 6)), rng.integers(0, 4, 2000)
    acc = np.mean(ref.fit_softmax_regression(xs, ys, l2=1e-2, num_classes=4)(xt) == yt)
    assert abs(acc - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 2000)


def test_the_unigram_line_learns_a_label_written_in_the_symbol_counts():
    # Toy texts whose class (1 of 4) is the symbol repeated 10 times in the second block: the
    # unigram regression separates them exactly; the bigram one sees the 9 self-pairs (c, c)
    # among ~18 pairs, far above chance (0.25), though a random first block can add some.
    def toy(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, n)
        rows = []
        for c in y:
            syms = np.concatenate([rng.integers(0, 16, 10), np.full(10, c)])
            text = np.concatenate(
                [
                    [ss.BOS],
                    ss.SYMBOL0 + rng.permutation(syms[:10]),
                    [ss.SEP1],
                    ss.SYMBOL0 + syms[10:],
                    [ss.SEP, ss.LABEL],
                ]
            )
            rows.append(ss.to_training_example(text.astype(np.int32), int(c), 32))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    train, valid, test = toy(200, 0), toy(100, 1), toy(200, 2)
    assert ref.regression_accuracy(ref.unigram_features, train, valid, test)["test"] == 1.0
    assert ref.regression_accuracy(ref.bigram_features, train, valid, test)["test"] > 0.9


@pytest.mark.parametrize("features", [ref.unigram_features, ref.bigram_features])
def test_feature_rows_sum_to_one(features):
    batch = _rows(_examples(20, seed=5), 96)
    np.testing.assert_allclose(features(batch["inputs"]).sum(1), 1.0, rtol=1e-12)
