"""grain pipelines: per-process shards are disjoint, iterator state resumes exactly."""

import numpy as np
import pytest

from sessa_jax.data import EVAL, TRAIN, make_iterator
from sessa_jax.train.config import base_config


def _data(task, **kw):
    c = base_config().data
    c.update(task=task, seq_len=32, batch_size=4, **kw)
    c.mqar.update(vocab_size=32, num_kv_pairs=4)
    c.symbol_soup.update(min_tokens=24, max_tokens=32)
    c.text.update(max_bytes=100_000, eval_fraction=0.05)
    return c


def _rows(batch):
    return [r.tobytes() for r in batch["inputs"]]


@pytest.mark.parametrize("task", ["mqar", "symbol_soup", "text"])
def test_iterator_state_resumes_without_repeats_or_skips(task):
    cfg = _data(task)
    it = make_iterator(cfg, TRAIN)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(3)]
    resumed = make_iterator(cfg, TRAIN)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(3)]
    for a, b in zip(rest, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    rows = sum((_rows(b) for b in first + rest), [])
    assert len(set(rows)) == len(rows)  # nothing repeated within the stream


@pytest.mark.parametrize("task", ["mqar", "text"])
def test_processes_read_disjoint_slices_of_one_stream(task):
    cfg = _data(task)
    whole = make_iterator(cfg, TRAIN, process_index=0, process_count=1)
    parts = [make_iterator(cfg, TRAIN, process_index=p, process_count=2) for p in range(2)]
    b0, b1 = next(parts[0]), next(parts[1])
    assert b0["inputs"].shape == (2, 32)  # batch_size is global
    assert not set(_rows(b0)) & set(_rows(b1))
    assert set(_rows(b0)) | set(_rows(b1)) == set(_rows(next(whole)))


def test_train_and_eval_do_not_overlap():
    cfg = _data("mqar")
    tr = set(_rows(next(make_iterator(cfg, TRAIN))))
    ev = set(_rows(next(make_iterator(cfg, EVAL))))
    assert not tr & ev


def _small_text(tmp_path, n_bytes, **kw):
    (tmp_path / "doc.txt").write_bytes(b"abcdefgh" * (n_bytes // 8))
    cfg = _data("text")
    cfg.update(**kw)
    cfg.text.update(path=str(tmp_path / "doc.txt"), max_bytes=0)
    return cfg


def test_eval_split_smaller_than_one_batch_is_an_error(tmp_path):
    """Fewer eval rows than one batch gave zero eval batches and eval loss/accuracy 0 without a word."""
    cfg = _small_text(tmp_path, 800, seq_len=8, batch_size=8)  # 801 tokens: 100 rows, 1 for eval
    cfg.text.eval_fraction = 0.01
    with pytest.raises(ValueError, match=r"eval split has 1 rows.*data.batch_size=8.*data.text.eval_fraction"):
        make_iterator(cfg, EVAL)
    assert next(make_iterator(cfg, TRAIN))["inputs"].shape == (8, 8)  # train repeats: fine


def test_processes_read_the_same_number_of_eval_batches(tmp_path):
    """An uneven eval split must not give one process more batches (a collective hang multi-host)."""
    cfg = _small_text(tmp_path, 80, seq_len=8, batch_size=2)  # 81 tokens: 10 rows, 5 for eval
    cfg.text.eval_fraction = 0.5
    counts = [sum(1 for _ in make_iterator(cfg, EVAL, process_index=p, process_count=2)) for p in range(2)]
    assert counts[0] == counts[1] == 2, counts
