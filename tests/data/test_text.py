"""Byte-level text: packing with segment ids, corpus errors, ArrayRecord shards, isolation in the model."""

import jax
import numpy as np
import pytest

from sessa_jax.config import SessaConfig
from sessa_jax.data import packing, text


def test_segments_and_positions():
    seg, pos = packing.segments_and_positions(np.array([7, 7, 8, 8, 8, 9]))
    assert seg.tolist() == [1, 1, 2, 2, 2, 3]
    assert pos.tolist() == [0, 1, 0, 1, 2, 0]


def test_rows_never_train_across_documents():
    docs = [np.frombuffer(s, np.uint8) for s in (b"hello world", b"ab", b"the quick brown fox jumps")]
    tokens, doc_ids = packing.pack_documents(docs, bos=text.BOS)
    src = text.PackedTextSource(tokens, doc_ids, seq_len=8)
    assert len(src) == (len(tokens) - 1) // 8
    seen = []
    for i in range(len(src)):
        ex = src[i]
        x, y, w, seg = ex["inputs"], ex["targets"], ex["weights"], ex["segment_ids"]
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
        # the target of a weighted position is the next token of the same document
        assert np.all(y[w == 0] == text.BOS) and np.all(y[w == 1] != text.BOS)
        # positions restart at each segment
        assert np.all(ex["positions"][np.r_[True, np.diff(seg) > 0]] == 0)
        seen.append(x)
    assert np.array_equal(np.concatenate(seen), tokens[: len(seen) * 8])  # rows tile the stream


def test_missing_and_empty_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.text.path='/no/such/dir' does not exist.*built-in corpus"):
        text.read_documents("/no/such/dir", 0)
    with pytest.raises(FileNotFoundError, match=r"is a directory with no files"):
        text.read_documents(str(tmp_path), 0)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match=r"no readable text files"):
        text.read_documents(str(tmp_path), 0)
    (tmp_path / "a.txt").write_bytes(b"tiny")
    with pytest.raises(ValueError, match=r"too small for one row of data.seq_len=64"):
        text.load_text_source(str(tmp_path), 64, 0, 0.5, split=0)


def test_builtin_corpus_is_available_offline():
    src = text.load_text_source("", 128, 200_000, 0.1, split=0)
    ev = text.load_text_source("", 128, 200_000, 0.1, split=1)
    assert len(src) > 100 and len(ev) >= 1 and ev.row_start == src.row_stop  # disjoint splits
    assert src[0]["inputs"][0] == text.BOS


def test_prepare_writes_shards_that_read_back_identically(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(f"document number {i} " * (10 + i))
    counts = text.prepare(str(corpus), str(tmp_path / "shards"), seq_len=16, rows_per_shard=7, eval_fraction=0.2)
    files = text.shard_files(str(tmp_path / "shards"), 0)
    assert len(files) == -(-counts["train"] // 7)
    import ml_collections as mc

    from sessa_jax.data.pipeline import make_source

    cfg = mc.ConfigDict(
        dict(task="text", seq_len=16, seed=0, text=dict(path="", arrayrecord_dir=str(tmp_path / "shards")))
    )
    shards = make_source(cfg, 0)
    mem = text.load_text_source(str(corpus), 16, 0, 0.2, split=0)
    assert len(shards) == len(mem) == counts["train"]
    for i in (0, 5, len(mem) - 1):
        assert all(np.array_equal(shards[i][k], mem[i][k]) for k in mem[i])
    with pytest.raises(FileNotFoundError, match=r"arrayrecord_dir='/nope' does not exist; write shards with"):
        text.shard_files("/nope", 0)


@pytest.mark.parametrize("kind", ["sessa", "transformer", "mamba"])
def test_packed_documents_do_not_see_each_other_in_the_model(kind):
    """Logits of a document inside a packed row equal its logits alone, for every kind."""
    from sessa_jax.model import SessaLM

    cfg = SessaConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=text.VOCAB_SIZE, chunk_size=4, max_len=32)
    model = SessaLM(cfg, kind=kind)
    docs = [np.frombuffer(b"first doc", np.uint8), np.frombuffer(b"second!", np.uint8)]
    tokens, doc_ids = packing.pack_documents(docs, bos=text.BOS)
    ex = packing.row_to_example(np.r_[tokens, 0], np.r_[doc_ids, doc_ids[-1]])
    t, cut = len(ex["inputs"]), len(docs[0]) + 1
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ex["inputs"][None])
    apply = jax.jit(lambda x, seg, pos: model.apply(params, x[None], segment_ids=seg[None], positions=pos[None])[0])

    def alone(doc):  # the document at the start of a row, padding (segment 0) after it
        n = len(doc)
        x = np.zeros(t, np.int32)
        x[:n] = doc
        return apply(x, np.r_[np.ones(n), np.zeros(t - n)].astype(np.int32), np.arange(t, dtype=np.int32))[:n]

    packed = apply(ex["inputs"], ex["segment_ids"], ex["positions"])
    tol = dict(rtol=2e-4, atol=2e-4)  # float32, different reduction lengths
    np.testing.assert_allclose(packed[:cut], alone(ex["inputs"][:cut]), **tol)
    np.testing.assert_allclose(packed[cut:], alone(ex["inputs"][cut:]), **tol)
    one_doc = apply(ex["inputs"], np.ones(t, np.int32), np.arange(t, dtype=np.int32))
    assert not np.allclose(one_doc[cut:], alone(ex["inputs"][cut:]), **tol)  # without segments it would leak


def test_max_bytes_caps_only_the_builtin_corpus(tmp_path):
    """A user corpus is read whole or refused (tests/data/test_data_integrity.py); the built-in corpus is
    its first max_bytes bytes, also inside one file."""
    docs = text.read_documents("", 1000)
    assert sum(len(d) for d in docs) == 1000
    big = bytes(range(32, 127)) * 100  # 9500 bytes of text
    (tmp_path / "big.txt").write_bytes(big)
    (tmp_path / "small.txt").write_bytes(b"x" * 600)
    assert sum(len(d) for d in text.read_documents(str(tmp_path), 0)) == len(big) + 600  # 0 = no cap


def test_arrayrecord_rows_must_match_data_seq_len(tmp_path):
    """Shards written for one seq_len must not silently feed rows of another length."""
    import ml_collections as mc

    from sessa_jax.data.pipeline import make_source

    corpus = tmp_path / "doc.txt"
    corpus.write_text("some words of text " * 40)
    text.prepare(str(corpus), str(tmp_path / "shards"), seq_len=16, eval_fraction=0.2)
    cfg = mc.ConfigDict(
        dict(task="text", seq_len=32, seed=0, text=dict(path="", arrayrecord_dir=str(tmp_path / "shards")))
    )
    with pytest.raises(ValueError, match=r"holds rows of seq_len=16.*data.seq_len=32.*--seq_len 32"):
        make_source(cfg, 0)
    cfg.seq_len = 16
    assert make_source(cfg, 1)[0]["inputs"].shape == (16,)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(seq_len=0), r"--seq_len must be >= 1; got 0"),
        (dict(seq_len=16, rows_per_shard=0), r"--rows_per_shard must be >= 1; got 0"),
        (dict(seq_len=16, eval_fraction=1.5), r"--eval_fraction must lie in \(0, 1\); got 1.5"),
    ],
)
def test_prepare_rejects_bad_arguments_by_name(tmp_path, kw, message):
    (tmp_path / "doc.txt").write_text("text " * 100)
    with pytest.raises(ValueError, match=message):
        text.prepare(str(tmp_path / "doc.txt"), str(tmp_path / "shards"), **kw)
