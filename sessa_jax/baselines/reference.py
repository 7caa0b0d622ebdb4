"""Reference lines for SymbolSoup: what simple classifiers score on the same texts.

Every function reads the arrays the models read (``inputs`` (N, T) token ids as made by
``symbol_soup.to_training_example``; the class is the target at the weighted position), so
a line and a model are scored on exactly the same test texts.

* ``chance``: 1 / 20.
* ``unigram``: softmax regression on the text's symbol frequencies (16 features), fitted on
  the training texts, its L2 strength chosen on the validation texts.
* ``bigram``: the same on the frequencies of adjacent symbol pairs inside a block (256
  features; pairs that straddle a separator are not counted).
* ``markov_oracle``: knows the generating Markov chains of every style and which blocks are
  styled; picks the class whose (left, right) pair gives the two styled blocks the highest
  likelihood (``symbol_soup.markov_oracle``). Not learnable from text alone in general; an
  upper reference, not a bound (it ignores motifs and flips).
"""

from __future__ import annotations

import numpy as np

from sessa_jax.data import symbol_soup as ss

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # per-weight penalty on standardised features, chosen on valid


def labels_of(batch: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) class indices: the target at each row's weighted position minus ``CLASS0``."""
    w = np.asarray(batch["weights"])
    pos = np.argmax(w > 0, axis=1)
    return np.asarray(batch["targets"])[np.arange(len(w)), pos] - ss.CLASS0


def text_blocks(tokens: np.ndarray) -> list[np.ndarray]:
    """The symbol blocks of one text (symbol indices 0..15), split at ``<sep1>``/``<sep2>``/``<sep>``.

    A well-formed text has five: noise, styled, noise, styled, noise.
    """
    blocks, cur = [], []
    for tok in np.asarray(tokens).tolist():
        if ss.SYMBOL0 <= tok < ss.SYMBOL0 + ss.NUM_SYMBOLS:
            cur.append(tok - ss.SYMBOL0)
        elif tok in (ss.SEP1, ss.SEP2, ss.SEP):
            blocks.append(np.asarray(cur, np.int64))
            cur = []
    return blocks


def unigram_features(inputs: np.ndarray) -> np.ndarray:
    """(N, 16) float64: each text's symbol counts divided by its number of symbols."""
    x = np.asarray(inputs) - ss.SYMBOL0
    is_sym = (x >= 0) & (x < ss.NUM_SYMBOLS)
    counts = np.stack([np.bincount(row[m], minlength=ss.NUM_SYMBOLS) for row, m in zip(x, is_sym)]).astype(np.float64)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)


def bigram_features(inputs: np.ndarray) -> np.ndarray:
    """(N, 256) float64: counts of symbol pairs (a, b) adjacent inside a block, over all such pairs."""
    out = np.zeros((len(inputs), ss.NUM_SYMBOLS**2))
    for i, row in enumerate(np.asarray(inputs)):
        for b in text_blocks(row):
            if len(b) > 1:
                out[i] += np.bincount(b[:-1] * ss.NUM_SYMBOLS + b[1:], minlength=ss.NUM_SYMBOLS**2)
    return out / np.maximum(out.sum(1, keepdims=True), 1.0)


def fit_softmax_regression(x: np.ndarray, y: np.ndarray, l2: float, num_classes: int = ss.NUM_CLASSES):
    """Multinomial logistic regression (L-BFGS, float64) on standardised features.

    Minimises mean cross-entropy + ``l2`` * |W|^2 (bias not penalised). Returns a function
    mapping (M, F) features to (M,) predicted classes.
    """
    from scipy.optimize import minimize

    x = np.asarray(x, np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    n, f = z.shape
    onehot = np.eye(num_classes)[np.asarray(y)]

    def loss_grad(theta):
        w, b = theta[: f * num_classes].reshape(f, num_classes), theta[f * num_classes :]
        logits = z @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.sum(onehot * np.log(p + 1e-300), 1)) + l2 * np.sum(w * w)
        g = (p - onehot) / n
        return loss, np.concatenate([(z.T @ g + 2 * l2 * w).ravel(), g.sum(0)])

    theta = minimize(
        loss_grad, np.zeros(f * num_classes + num_classes), jac=True, method="L-BFGS-B", options=dict(maxiter=500)
    ).x
    w, b = theta[: f * num_classes].reshape(f, num_classes), theta[f * num_classes :]
    return lambda xs: np.argmax(((np.asarray(xs, np.float64) - mu) / sd) @ w + b, axis=1)


def regression_accuracy(features, train, valid, test) -> dict:
    """Test accuracy of softmax regression on ``features`` (a function of ``inputs``), L2 chosen on valid."""
    xs = {k: features(d["inputs"]) for k, d in (("train", train), ("valid", valid), ("test", test))}
    ys = {k: labels_of(d) for k, d in (("train", train), ("valid", valid), ("test", test))}
    best = None
    for l2 in L2_GRID:
        predict = fit_softmax_regression(xs["train"], ys["train"], l2)
        valid_acc = float(np.mean(predict(xs["valid"]) == ys["valid"]))
        if best is None or valid_acc > best[0]:
            best = (valid_acc, l2, float(np.mean(predict(xs["test"]) == ys["test"])))
    return dict(valid=best[0], l2=best[1], test=best[2])


def markov_oracle_accuracy(batch: dict[str, np.ndarray]) -> float:
    """Accuracy of ``symbol_soup.markov_oracle`` on the styled blocks (the 2nd and 4th) of each text."""
    y = labels_of(batch)
    hits = 0
    for row, label in zip(np.asarray(batch["inputs"]), y):
        blocks = text_blocks(row)
        hits += ss.markov_oracle(blocks[1], blocks[3]) == label
    return hits / len(y)


def soup_reference_lines(train, valid, test) -> dict[str, float]:
    """Test accuracies of the reference lines (see the module docstring) on ``test``."""
    return dict(
        chance=1.0 / ss.NUM_CLASSES,
        unigram=regression_accuracy(unigram_features, train, valid, test)["test"],
        bigram=regression_accuracy(bigram_features, train, valid, test)["test"],
        markov_oracle=markov_oracle_accuracy(test),
    )
