"""Our SymbolSoup generator against the published script, statistic by statistic.

The published generator (``shared/reference/datasets/SymbolSoup.py``, found in a parent
directory of the repository or at ``$SESSA_REFERENCE_DIR``) runs in a subprocess and writes
its TSV files; we read them with our reader and compare them with ``N_OURS`` examples of our
generator at the same lengths. Every statistic is computed the same way for both, from the
text alone (the order of the two styled blocks is not in the text, so "per style" statistics
are per class, i.e. per pair of styles).

Tests and their sampling noise (``N_REF`` = 6000 published, ``N_OURS`` = 12000 ours):

* class balance: exact (every split is exactly balanced in both programs);
* length, noise-block and styled-block length distributions: two-sample chi-square on 10
  equal-count bins, p > 1e-3 each;
* (x, x+1) pair share in styled blocks: Welch t-test on per-example shares, p > 1e-3;
* unigram (16) and within-block bigram (256) counts of the styled blocks per class: the sum
  over classes of the chi-square homogeneity statistic, with its null distribution from
  ``N_PERM`` = 200 permutations of examples between the two sources within each class
  (examples are independent, symbols within one are not: permuting whole examples keeps the
  test exact); p > 0.01;
* Markov-oracle accuracy within 0.02 (sd of the difference sqrt(.2/6000 + .2/12000) = 0.0071:
  an honest pair fails with probability 0.5%).

Power, checked by ``test_the_comparison_has_power...`` at the same sample sizes: the same
statistics reject our own generator with the motif probability 0.3 -> 0.25 (measured: pair
share p < 1e-6, unigram and bigram p = 0.005, the smallest 200 permutations can give; oracle
gap 0.053) and with the preferred-bigram strength 3 -> 2, i.e. weight x4 -> x3 (bigram
p = 0.005, oracle gap 0.054). A change 3 -> 2.5 sits at the edge (bigram p 0.01-0.05).
The easy "SymbolSoup-style" task this module replaced differed far more (pair share 0.049
vs 0.473, Markov-oracle accuracy 1.0 vs 0.73).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from sessa_jax.data import symbol_soup as ss
from sessa_jax.data import symbol_soup_tsv as st
from tests.support.processes import TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_REF, N_OURS, N_PERM = 6000, 12000, 200
SEED = 0

# Runs the published script as __main__; it imports tqdm only for a progress bar, so a
# no-op stand-in is installed when tqdm is absent (the project does not depend on it).
_RUNNER = """
import runpy, sys, types
try:
    import tqdm.auto
except ImportError:
    class _Bar:
        def __init__(self, *a, **k): pass
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def update(self, n=1): pass
    auto = types.ModuleType("tqdm.auto"); auto.tqdm = _Bar
    top = types.ModuleType("tqdm"); top.auto = auto
    sys.modules["tqdm"], sys.modules["tqdm.auto"] = top, auto
script, sys.argv = sys.argv[1], sys.argv[1:]
if sys.argv[1:] == ["--dump-styles"]:  # print the published style tables as JSON
    import json
    g = runpy.run_path(script, run_name="published")
    fam = lambda p: [dict(unigram=g[p + "_UNIGRAM"][s], bigrams=sorted(map(list, g[p + "_BIGRAM"][s])),
                          motifs=g[p + "_MOTIF_WEIGHTS"][s]) for s in sorted(g[p + "_UNIGRAM"])]
    print(json.dumps(dict(left=fam("LEFT"), right=fam("RIGHT"), constants=[g["BIGRAM_STRENGTH"],
          g["MOTIF_INSERT_PROB"], g["NOISE_FLIP_PROB"]])))
else:
    runpy.run_path(script, run_name="__main__")
"""


def reference_script() -> str | None:
    """Path of the published SymbolSoup.py, or None."""
    env = os.environ.get("SESSA_REFERENCE_DIR")
    candidates = [os.path.join(env, "datasets", "SymbolSoup.py")] if env else []
    d = ROOT
    while os.path.dirname(d) != d:
        d = os.path.dirname(d)
        candidates.append(os.path.join(d, "shared", "reference", "datasets", "SymbolSoup.py"))
    return next((c for c in candidates if os.path.isfile(c)), None)


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory):
    script = reference_script()
    if script is None:
        pytest.skip(
            "the published generator shared/reference/datasets/SymbolSoup.py was not found in a parent "
            "directory; set SESSA_REFERENCE_DIR to the reference checkout to run this comparison"
        )
    out = tmp_path_factory.mktemp("published")
    cmd = [
        sys.executable,
        "-c",
        _RUNNER,
        script,
        "--num_train_samples",
        str(N_REF),
        "--num_valid_samples",
        "20",
        "--num_test_samples",
        "20",
        "--seed",
        str(SEED),
        "--output_dir",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=TIMEOUT_S)
    return str(out)


@functools.lru_cache(maxsize=8)
def _ours(n: int, process: ss.Process = ss.PUBLISHED, seed: int = SEED + 1):
    ex = ss.generate(seed, 0, n, *ss.LENGTHS["published"], process=process)
    return [e.tokens() for e in ex], np.array([e.label for e in ex])


def summarize(texts, labels) -> dict:
    """Per-example statistics of a split, from the token ids of its texts."""
    rows = dict(labels=np.asarray(labels), length=[], noise=[], styled=[], pair_share=[], uni=[], bi=[], oracle=[])
    for tokens, y in zip(texts, labels):
        noise, styled = st.blocks_of(tokens)
        rows["length"].append(len(tokens))
        rows["noise"].append([len(b) for b in noise])
        rows["styled"].append([len(b) for b in styled])
        steps = np.concatenate([b[1:] - b[:-1] for b in styled])
        rows["pair_share"].append(np.mean(steps == 1) if len(steps) else 0.0)
        sym = np.concatenate(styled)
        rows["uni"].append(np.bincount(sym, minlength=16))
        pairs = np.concatenate([b[:-1] * 16 + b[1:] for b in styled])
        rows["bi"].append(np.bincount(pairs, minlength=256))
        rows["oracle"].append(ss.markov_oracle(*styled) == y)
    return {k: np.asarray(v) for k, v in rows.items()}


def binned_chi2_p(a, b, bins: int = 10) -> float:
    """p-value of a two-sample chi-square test on equal-count bins of the pooled sample."""
    edges = np.unique(np.quantile(np.concatenate([a, b]), np.linspace(0, 1, bins + 1)))
    ca = np.histogram(a, edges)[0]
    cb = np.histogram(b, edges)[0]
    keep = (ca + cb) > 0
    return float(stats.chi2_contingency(np.stack([ca[keep], cb[keep]]))[1])


def _chi2_sum(counts_a, counts_b) -> float:
    """Sum over classes of the 2 x K chi-square homogeneity statistic (empty cells dropped)."""
    total = counts_a + counts_b  # (C, K)
    na, nb = counts_a.sum(1, keepdims=True), counts_b.sum(1, keepdims=True)
    exp_a, exp_b = total * na / (na + nb), total * nb / (na + nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(total > 0, (counts_a - exp_a) ** 2 / exp_a + (counts_b - exp_b) ** 2 / exp_b, 0.0)
    return float(terms.sum())


def permutation_p(x_a, y_a, x_b, y_b, n_perm: int = N_PERM, seed: int = 0) -> float:
    """p-value of the per-class count tables of two sources being exchangeable.

    ``x``: (N, K) per-example counts, ``y``: (N,) classes. Statistic: ``_chi2_sum`` of the
    per-class totals; null: whole examples permuted between sources within each class.
    """
    rng = np.random.default_rng(seed)
    observed = _chi2_sum(
        np.stack([x_a[y_a == c].sum(0) for c in range(ss.NUM_CLASSES)]),
        np.stack([x_b[y_b == c].sum(0) for c in range(ss.NUM_CLASSES)]),
    )
    null_a = np.zeros((n_perm, ss.NUM_CLASSES, x_a.shape[1]))
    null_b = np.zeros_like(null_a)
    for c in range(ss.NUM_CLASSES):
        pool = np.concatenate([x_a[y_a == c], x_b[y_b == c]]).astype(np.float64)
        n_a = int((y_a == c).sum())
        masks = np.zeros((n_perm, len(pool)))
        for p in range(n_perm):
            masks[p, rng.permutation(len(pool))[:n_a]] = 1.0
        null_a[:, c], null_b[:, c] = masks @ pool, (1.0 - masks) @ pool
    null = [_chi2_sum(null_a[p], null_b[p]) for p in range(n_perm)]
    return (1 + sum(v >= observed for v in null)) / (1 + n_perm)


def compare(a: dict, b: dict) -> dict:
    """Every p-value and the oracle gap between two ``summarize`` outputs."""
    return dict(
        length=binned_chi2_p(a["length"], b["length"]),
        noise_total=binned_chi2_p(a["noise"].sum(1), b["noise"].sum(1)),
        noise_block=binned_chi2_p(a["noise"].ravel(), b["noise"].ravel()),
        styled_block=binned_chi2_p(a["styled"].ravel(), b["styled"].ravel()),
        pair_share=float(stats.ttest_ind(a["pair_share"], b["pair_share"], equal_var=False).pvalue),
        unigram=permutation_p(a["uni"], a["labels"], b["uni"], b["labels"]),
        bigram=permutation_p(a["bi"], a["labels"], b["bi"], b["labels"]),
        oracle_gap=abs(a["oracle"].mean() - b["oracle"].mean()),
    )


@pytest.fixture(scope="module")
def published(published_dir):
    texts, labels = st.read_tsv(os.path.join(published_dir, "symbol_soup_train.tsv"))
    return summarize(texts, labels)


@pytest.fixture(scope="module")
def ours():
    return summarize(*_ours(N_OURS))


def test_style_tables_and_constants_are_the_published_ones(published_dir):
    """Every style's unigram weights, preferred bigrams and motif weights, as the published
    script builds them (imported in a subprocess), against the tables our sampler uses."""
    import json

    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, reference_script(), "--dump-styles"],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    ).stdout
    published = json.loads(out)
    p = ss.PUBLISHED
    assert published["constants"] == [p.bigram_strength, p.motif_prob, p.flip_prob]
    motif_names = ["".join(ss.ALPHABET[k] for k in m) for m in ss.motifs()]
    assert sorted(motif_names) == sorted(published["left"][0]["motifs"])
    for family, ours_family in zip(("left", "right"), ss.styles()):
        assert len(published[family]) == len(ours_family)
        for index, (pub, style) in enumerate(zip(published[family], ours_family)):
            uni = np.array([pub["unigram"][c] for c in ss.ALPHABET])
            np.testing.assert_array_equal(uni, style.unigram)
            preferred = np.zeros((16, 16))
            for a, b in pub["bigrams"]:
                preferred[ss.ALPHABET.index(a), ss.ALPHABET.index(b)] = p.bigram_strength
            weights = uni[None, :] * (1.0 + preferred)
            np.testing.assert_allclose(style.transition, weights / weights.sum(1, keepdims=True), rtol=1e-12)
            sampler = ss._sampler(int(family == "right"), index)
            ours_motif_w = np.diff([0.0] + sampler.motif_cum[5])
            ours_named = {"".join(ss.ALPHABET[k] for k in m): w for m, w in zip(sampler.motif_ids[5], ours_motif_w)}
            assert ours_named == pytest.approx(pub["motifs"], rel=1e-12)


def test_reader_reads_the_published_files_and_splits_are_exactly_balanced(published_dir, published):
    assert len(published["labels"]) == N_REF
    assert np.all(np.bincount(published["labels"], minlength=20) == N_REF // 20)
    for split, n in ((1, 20), (2, 20)):
        _, labels = st.read_tsv(st.split_file(published_dir, split))
        assert np.all(np.bincount(labels, minlength=20) == n // 20)
    _, ours_labels = _ours(N_OURS)
    assert np.all(np.bincount(ours_labels, minlength=20) == N_OURS // 20)
    with open(os.path.join(published_dir, "symbol_soup_labels.tsv")) as f:
        published_vocab = f.read()
    out = os.path.join(published_dir, "ours_labels.tsv")
    st.write_label_vocab(out)
    with open(out) as f:
        assert f.read() == published_vocab


def test_our_generator_matches_the_published_one(published, ours):
    result = compare(published, ours)
    for key in ("length", "noise_total", "noise_block", "styled_block", "pair_share"):
        assert result[key] > 1e-3, (key, result)
    for key in ("unigram", "bigram"):
        assert result[key] > 0.01, (key, result)
    assert result["oracle_gap"] <= 0.02, result
    # The headline numbers of the published task, for the record (not a tolerance of their own).
    assert 0.44 < ours["pair_share"].mean() < 0.50 and 0.70 < ours["oracle"].mean() < 0.77


@pytest.mark.parametrize(
    "changed, rejected_by",
    [
        (ss.Process(motif_prob=0.25), "pair_share"),
        (ss.Process(bigram_strength=2.0), "bigram"),
    ],
)
def test_the_comparison_has_power_against_small_changes_of_the_process(published, changed, rejected_by):
    variant = summarize(*_ours(N_OURS, changed))
    result = compare(published, variant)
    alpha = 1e-3 if rejected_by == "pair_share" else 0.01
    assert result[rejected_by] < alpha, result
    assert result["oracle_gap"] > 0.02, result


def test_export_round_trips_through_the_published_format(tmp_path):
    paths = st.export(str(tmp_path), seed=3, sizes=(40, 20, 20), min_tokens=100, max_tokens=160)
    examples = ss.generate(3, 0, 40, 100, 160)
    texts, labels = st.read_tsv(paths[0])
    assert [e.label for e in examples] == labels.tolist()
    for e, t in zip(examples, texts):
        np.testing.assert_array_equal(e.tokens(), t)
        noise, styled = st.blocks_of(t)
        assert all(np.array_equal(x, y) for x, y in zip(styled, e.styled))
        assert all(np.array_equal(x, y) for x, y in zip(noise, e.noise))
    with open(paths[0], encoding="utf-8", newline="") as f:
        head = f.read(40)
    assert head.startswith('Text\tAnswer\r\n"<bos>\n')  # csv dialect of the published files


@pytest.mark.parametrize("lengths", sorted(ss.LENGTHS))
def test_lengths_presets_and_the_2m_plus_13_rule(lengths):
    lo, hi = ss.LENGTHS[lengths]
    m_lo, m_hi = ss.symbol_bounds(lo, hi)
    for e in ss.generate(5, 2, 40, lo, hi):
        n = len(e.tokens())
        m = sum(len(b) for b in e.noise + e.styled)
        assert lo <= n <= hi and n == 2 * m + 13 and m_lo <= m <= m_hi
        assert min(len(b) for b in e.noise + e.styled) >= 1
        assert 3 <= sum(len(b) for b in e.noise) <= m - 2


def test_flips_always_change_the_symbol():
    never_flip = ss.Process(flip_prob=0.0)
    always_flip = ss.Process(flip_prob=1.0)
    a = ss.styled_block(np.random.default_rng(1), 0, 2, 500, never_flip)
    b = ss.styled_block(np.random.default_rng(1), 0, 2, 500, always_flip)
    assert np.all(a != b)  # same draws before the flips, which then hit every symbol


def test_the_training_pipeline_reads_the_published_files(published_dir):
    """``data.symbol_soup.tsv_dir`` = the published script's output: batches score the class at <label>."""
    from sessa_jax.data import EVAL, TRAIN, make_iterator
    from sessa_jax.train.config import load_config

    cfg = load_config("symbol_soup", [f"data.symbol_soup.tsv_dir={published_dir}", "data.batch_size=4"])
    texts, labels = st.read_tsv(st.split_file(published_dir, 1))
    for split in (TRAIN, EVAL):
        batch = next(make_iterator(cfg.data, split))
        assert batch["inputs"].shape == (4, 600)
        last = batch["weights"].argmax(1)
        assert np.all(batch["weights"].sum(1) == 1) and np.all(batch["inputs"][np.arange(4), last] == ss.LABEL)
        assert np.all(batch["targets"][np.arange(4), last] >= ss.CLASS0)
    eval_batch = next(make_iterator(cfg.data, EVAL))  # the eval split is the val file, in order
    first = eval_batch["inputs"][0][eval_batch["segment_ids"][0] > 0]
    np.testing.assert_array_equal(first, texts[0])
    assert eval_batch["targets"][0][len(first) - 1] == ss.CLASS0 + labels[0]
