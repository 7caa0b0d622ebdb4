"""Tokenizers: exact round trips (bytes, a sentencepiece model fitted here offline, a HF
tokenizer.json built here), byte tables, vocabulary following the tokenizer, clear errors."""

import os
import re

import numpy as np
import pytest

from sessa_jax.data import text
from sessa_jax.data.tokenizers import ByteTokenizer, HFTokenizer, iter_lines, make_tokenizer, train_sentencepiece
from sessa_jax.train.config import ConfigError, load_config, model_config

SAMPLES = ["def f(x):\n    return x + 1\n", "naïve café — 東京 🚀\ttabs  and   spaces\n\n", ""]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~300 kB of text already on the machine: standard library sources."""
    d = tmp_path_factory.mktemp("corpus")
    total = 0
    for doc in text.iter_documents("", 300_000):
        (d / f"doc{total}.py").write_bytes(doc.tobytes())
        total += len(doc)
    return str(d)


@pytest.fixture(scope="module")
def spm_model(corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("spm") / "spm.model")
    train_sentencepiece(corpus, path, vocab_size=400)
    return path


def test_bytes_round_trip_and_table():
    tok = ByteTokenizer()
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids.dtype == np.int32 and len(ids) == len(s.encode()) and tok.decode(ids) == s
    assert tok.vocab_size == text.VOCAB_SIZE and tok.bos_id == text.BOS
    assert tok.token_bytes().tolist() == [1] * 256 + [0]


def test_sentencepiece_fitted_offline_round_trips_and_compresses(spm_model, corpus):
    tok = make_tokenizer("sentencepiece", spm_model)
    assert 300 <= tok.vocab_size <= 400 and tok.bos_id == 1
    for s in SAMPLES:  # byte fallback + identity normalisation: every text comes back exactly
        assert tok.decode(tok.encode(s)) == s
    held_out = open(os.path.join(os.path.dirname(os.__file__), "json", "decoder.py")).read()
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(ids) < 0.8 * len(held_out.encode())  # subwords: fewer tokens than bytes (~140 merges here)
    # the byte table sums to the text's byte count (BOS/unk count 0)
    assert int(tok.token_bytes()[ids].sum()) == len(held_out.encode())


def test_hf_tokenizer_json_round_trips(corpus, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        iter_lines(corpus),
        trainers.BpeTrainer(
            vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    tok = make_tokenizer("tokenizers", path)
    assert isinstance(tok, HFTokenizer) and tok.bos_id == hf.token_to_id("<|endoftext|>")
    assert tok.vocab_size == hf.get_vocab_size()
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    ids = tok.encode(SAMPLES[0])
    assert int(tok.token_bytes()[ids].sum()) == len(SAMPLES[0].encode())


def test_vocabulary_follows_the_tokenizer_and_text_packs_with_its_bos(spm_model, corpus):
    cfg = load_config(
        "text_bytes",
        [f"data.text.path={corpus}", "data.tokenizer.kind=sentencepiece", f"data.tokenizer.path={spm_model}"],
    )
    tok = make_tokenizer("sentencepiece", spm_model)
    assert model_config(cfg).vocab_size == -(-tok.vocab_size // 8) * 8
    src = text.load_text_source(corpus, 64, 0, 0.1, 0, tok)
    ex = src[0]
    assert ex["inputs"][0] == tok.bos_id and ex["inputs"].max() < tok.vocab_size
    # rows tile the tokenized documents in order: the first row decodes to the first file's text
    first = sorted(os.listdir(corpus))[0]
    assert tok.decode(ex["inputs"][1:]) == tok.decode(tok.encode(open(os.path.join(corpus, first)).read())[:63])


def test_tokenizer_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer.kind='wordpiece' is unknown"):
        load_config("text_bytes", ["data.tokenizer.kind=wordpiece"])
    with pytest.raises(ConfigError, match=r"data.tokenizer.path='/no/such.model' is not a file"):
        load_config("text_bytes", ["data.tokenizer.kind=sentencepiece", "data.tokenizer.path=/no/such.model"])
    with pytest.raises(ConfigError, match=r"applies to data.task='text' only"):
        load_config("tiny", ["data.tokenizer.kind=sentencepiece"])
    with pytest.raises(ConfigError, match=r"needs data.tokenizer.path"):
        load_config("text_bytes", ["data.tokenizer.kind=tokenizers"])
    with pytest.raises(ValueError, match=r"vocab_size=100 must be an integer >= 260"):
        train_sentencepiece("", str(tmp_path / "x.model"), vocab_size=100)


def test_tokenizer_train_command(corpus, tmp_path, capsys):
    from sessa_jax.cli import train_main

    out = str(tmp_path / "cli.model")
    assert (
        train_main(
            ["tokenizer", "train", "--input", corpus, "--output", out, "--vocab_size", "400", "--max_bytes", "100000"]
        )
        == 0
    )
    assert os.path.isfile(out) and "use it with --config.data.tokenizer.kind=sentencepiece" in capsys.readouterr().out
    assert train_main(["tokenizer", "train", "--input", corpus, "--output", out, "--vocab_size", "270"]) == 2
    assert re.search(
        r"more distinct characters than vocab_size=270 .*raise --vocab_size to at least \d+", capsys.readouterr().err
    )


def test_prepare_streams_tokenized_shards_equal_to_the_in_memory_rows(spm_model, corpus, tmp_path):
    from sessa_jax.data.pipeline import make_source

    tok = make_tokenizer("sentencepiece", spm_model)
    counts = text.prepare(
        corpus, str(tmp_path / "shards"), seq_len=64, rows_per_shard=50, eval_fraction=0.1, tokenizer=tok
    )
    cfg = load_config(
        "text_bytes",
        [
            "data.seq_len=64",
            f"data.text.arrayrecord_dir={tmp_path / 'shards'}",
            "data.tokenizer.kind=sentencepiece",
            f"data.tokenizer.path={spm_model}",
        ],
    )
    for split, name in ((0, "train"), (1, "eval")):
        shards, mem = make_source(cfg.data, split), text.load_text_source(corpus, 64, 0, 0.1, split, tok)
        assert len(shards) == len(mem) == counts[name]
        for i in (0, len(mem) // 2, len(mem) - 1):
            assert all(np.array_equal(shards[i][k], mem[i][k]) for k in mem[i])


def test_text_bpe_fits_its_tokenizer_then_trains_evaluates_and_samples(tmp_path):
    from sessa_jax.sample import sample
    from sessa_jax.train import checkpoint as ckpt
    from sessa_jax.train import loop

    cfg = load_config(
        "text_bpe",
        [
            "data.text.max_bytes=300000",
            "data.tokenizer.vocab_size=400",
            "data.seq_len=32",
            "data.batch_size=4",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=1",
            "model.chunk_size=16",
            "model.max_len=64",
            "optim.warmup_steps=1",
            "train.steps=3",
            "train.eval_every=0",
            "train.progress=False",
            "train.loss_chunk=8",
            "checkpoint.every=0",
        ],
    )
    workdir = str(tmp_path / "run")
    lines = []
    result = loop.train(cfg, workdir, log=lines.append)
    model_file = os.path.join(workdir, "tokenizer.model")
    assert result.step == 3 and os.path.isfile(model_file) and any("fitting a sentencepiece" in x for x in lines)
    saved = ckpt.restore_config(os.path.join(workdir, "checkpoints"))
    tok = make_tokenizer("sentencepiece", model_file)
    assert saved["data"]["tokenizer"]["path"] == model_file
    assert saved["model"]["vocab_size"] == -(-tok.vocab_size // 8) * 8
    # the whole held-out split, in bits per byte of the stdlib text
    assert result.eval["eval_tokens"] > 0 and 0 < result.eval["eval_bits_per_byte"] < result.eval["eval_bits_per_token"]
    out = sample(workdir, "def ", max_new_tokens=8, temperature=0)
    assert isinstance(out, str) and len(out) > 0


def test_a_corpus_of_long_lines_fits_on_all_its_text(tmp_path):
    """sentencepiece drops lines over its length limit; a corpus of long lines (minified JSON, one
    paragraph per file) used to leave it nothing and read as 'raise --vocab_size'."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 9))) for _ in range(300)]
    lines = [",".join(rng.choice(words, 2000)) for _ in range(10)]  # ~10 kB each, no newline inside
    (tmp_path / "long.txt").write_text("\n".join(lines) + "\n")
    from sessa_jax.data.tokenizers import MAX_LINE_BYTES, split_line

    assert min(len(line.encode()) for line in lines) > MAX_LINE_BYTES
    tok = train_sentencepiece(str(tmp_path / "long.txt"), str(tmp_path / "long.model"), vocab_size=400)
    for line in lines[:2]:
        ids = tok.encode(line)
        assert tok.decode(ids) == line and len(ids) < 0.8 * len(line)  # merges were learned from these lines
    pieces = split_line("ab " * 10 + "é" * 20, limit=16)  # cuts at spaces, never inside a character
    assert "".join(pieces) == "ab " * 10 + "é" * 20 and all(len(p.encode()) <= 16 for p in pieces)


def test_a_tiny_corpus_error_does_not_say_raise_vocab_size(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match=r"no usable lines") as e:
        train_sentencepiece(str(tmp_path / "empty.txt"), str(tmp_path / "e.model"), vocab_size=400)
    assert "raise --vocab_size" not in str(e.value)
