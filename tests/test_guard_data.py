"""Data integrity (problem 3): no silent corpus truncation, a safe ``prepare``, every shard's seq_len checked."""

import os

import ml_collections as mc
import pytest

from sessa_jax.data import text
from sessa_jax.data.pipeline import make_source

LINE = bytes(range(32, 127))  # 95 bytes of printable text


def _corpus(tmp_path, sizes):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, n in enumerate(sizes):
        (d / f"doc{i}.txt").write_bytes((LINE * (n // len(LINE) + 1))[:n])
    return d


def test_a_corpus_larger_than_max_bytes_is_refused_with_its_size_and_the_key(tmp_path):
    d = _corpus(tmp_path, [4000, 4000, 4000])
    with pytest.raises(ValueError, match=r"more than data.text.max_bytes=10000 .*up to 12000 in all.*"
                                         r"data.text.max_bytes=0 \(no cap\) or >= 12000"):
        text.read_documents(str(d), 10_000)
    with pytest.raises(ValueError, match=r"max_bytes=1000 .*up to 4000"):
        text.read_documents(str(d / "doc0.txt"), 1000)  # one file larger than the cap: not cut either


def test_every_file_of_a_directory_is_read(tmp_path):
    d = _corpus(tmp_path, [300, 500, 700])
    docs = text.read_documents(str(d), 1500)
    assert [len(x) for x in docs] == [300, 500, 700]
    assert [len(x) for x in text.read_documents(str(d), 0)] == [300, 500, 700]


def _cfg(shards, seq_len):
    return mc.ConfigDict(dict(task="text", seq_len=seq_len, seed=0, text=dict(path="", arrayrecord_dir=str(shards))))


def test_prepare_refuses_a_non_empty_output_unless_told_to_overwrite(tmp_path):
    d = _corpus(tmp_path, [3000])
    out = tmp_path / "shards"
    text.prepare(str(d), str(out), seq_len=16, rows_per_shard=50, eval_fraction=0.2)
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=r"--output .* is not empty .*pass --overwrite"):
        text.prepare(str(d), str(out), seq_len=32, eval_fraction=0.2)
    assert sorted(os.listdir(out)) == before  # untouched
    counts = text.prepare(str(d), str(out), seq_len=32, rows_per_shard=1000, eval_fraction=0.2, overwrite=True)
    assert sorted(os.listdir(out)) == ["eval-00000.array_record", "train-00000.array_record"]  # no stale shards
    assert len(make_source(_cfg(out, 32), 0)) == counts["train"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("mine")
    with pytest.raises(ValueError, match=r"not shards \(\['README'\]\)"):
        text.prepare(str(d), str(tmp_path / "notes"), seq_len=16, eval_fraction=0.2, overwrite=True)
    assert (tmp_path / "notes" / "README").read_text() == "mine"


def test_a_failed_prepare_leaves_nothing_behind(tmp_path):
    (tmp_path / "tiny.txt").write_bytes(b"abc")  # too small for one row of 64
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=r"too small for one row"):
        text.prepare(str(tmp_path / "tiny.txt"), str(out), seq_len=64, eval_fraction=0.2)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("shards")]  # no temporary directory either
    assert text.main(["prepare", "--input", str(tmp_path / "tiny.txt"), "--output", str(out), "--seq_len", "64"]) == 2


def test_every_shard_seq_len_is_checked_not_only_the_first(tmp_path):
    d = _corpus(tmp_path, [3000])
    out, other = tmp_path / "shards", tmp_path / "other"
    text.prepare(str(d), str(out), seq_len=16, rows_per_shard=1000, eval_fraction=0.2)
    text.prepare(str(d), str(other), seq_len=32, rows_per_shard=1000, eval_fraction=0.2)
    # a stale shard of another seq_len sorted after the good one
    os.replace(other / "train-00000.array_record", out / "train-00001.array_record")
    with pytest.raises(ValueError, match=r"seq_len=32 \(in train-00001.array_record\), but data.seq_len=16"):
        make_source(_cfg(out, 16), 0)
