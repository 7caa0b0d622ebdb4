"""Data integrity: no silent corpus truncation, a safe ``prepare``, every shard's seq_len checked."""

import json
import os
import subprocess
import sys
import zlib

import ml_collections as mc
import numpy as np
import pytest

from sessa_jax.data import text
from sessa_jax.data.pipeline import make_source
from tests.support.processes import TIMEOUT_S

LINE = bytes(range(32, 127))  # 95 bytes of printable text


def _corpus(tmp_path, sizes):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, n in enumerate(sizes):
        (d / f"doc{i}.txt").write_bytes((LINE * (n // len(LINE) + 1))[:n])
    return d


def test_a_corpus_larger_than_max_bytes_is_refused_with_its_size_and_the_key(tmp_path):
    d = _corpus(tmp_path, [4000, 4000, 4000])
    with pytest.raises(
        ValueError,
        match=r"more than data.text.max_bytes=10000 .*up to 12000 in all.*"
        r"data.text.max_bytes=0 \(no cap\) or >= 12000",
    ):
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
    assert sorted(os.listdir(out)) == [
        "eval-00000.array_record",
        "manifest.json",
        "train-00000.array_record",
    ]  # no stale shards
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
    with pytest.raises(text.ShardError, match=r"train-00001.array_record: not in manifest.json"):
        make_source(_cfg(out, 16), 0)
    # a shard of the right name but another seq_len, swapped in: its size differs from the manifest's
    os.replace(out / "train-00001.array_record", out / "train-00000.array_record")
    with pytest.raises(text.ShardError, match=r"train-00000.array_record: \d+ (bytes|records), manifest.json records"):
        make_source(_cfg(out, 16), 0)


# ---- unreadable files, the text CLI ----


def test_an_unreadable_corpus_file_is_named_not_skipped(tmp_path):
    d = _corpus(tmp_path, [300, 500])
    os.symlink(tmp_path / "gone.txt", d / "doc2.txt")  # listed, but opening it fails
    with pytest.raises(text.UnreadableFileError, match=r"'.*doc2.txt' cannot be read .*fix its permissions or remove"):
        text.read_documents(str(d), 0)


def test_python_m_text_runs_without_a_runpy_warning():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "sessa_jax.data.text", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr and "prepare" in out.stdout


# ---- shards: manifest, tokenizer, verification at open, ids in range ----


def _shards(tmp_path, rows_per_shard=20, seq_len=16):
    d = _corpus(tmp_path, [2000, 3000, 2500])
    out = tmp_path / "shards"
    counts = text.prepare(str(d), str(out), seq_len=seq_len, rows_per_shard=rows_per_shard, eval_fraction=0.2)
    return out, counts


def _text_cfg(shards, seq_len=16, **tokenizer):
    return mc.ConfigDict(
        dict(
            task="text",
            seq_len=seq_len,
            seed=0,
            batch_size=4,
            num_threads=0,
            prefetch=2,
            text=dict(path="", arrayrecord_dir=str(shards), max_bytes=0, eval_fraction=0.2, verify_checksums=True),
            tokenizer=dict(dict(kind="bytes", path="", vocab_size=4096), **tokenizer),
        )
    )


def test_the_manifest_records_the_tokenizer_rows_and_each_shard(tmp_path):
    out, counts = _shards(tmp_path)
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["seq_len"] == 16 and manifest["rows"] == counts
    assert manifest["tokenizer"] == dict(kind="bytes", vocab_size=257, bos_id=256, file="", sha256="")
    names = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
    assert sorted(e["name"] for e in manifest["shards"]) == names
    for e in manifest["shards"]:  # each entry computed independently here
        data = (out / e["name"]).read_bytes()
        assert e["bytes"] == len(data) and e["crc32"] == zlib.crc32(data)
    assert sum(e["records"] for e in manifest["shards"] if e["split"] == "train") == counts["train"]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="sentencepiece tokenizers need the sentencepiece package")
    from sessa_jax.data.tokenizers import train_sentencepiece

    d = tmp_path_factory.mktemp("spm")
    (d / "c.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    return str(train_sentencepiece(str(d / "c.txt"), str(d / "spm.model"), vocab_size=300).path)


def test_shards_from_another_tokenizer_are_refused_naming_both(tmp_path, spm_path):
    out, _ = _shards(tmp_path)  # bytes
    with pytest.raises(
        text.ShardError,
        match=r"prepared with the tokenizer bytes \(vocab 257\), but this run uses "
        r"sentencepiece 'spm.model' \(vocab 300.*data.tokenizer.kind",
    ):
        make_source(_text_cfg(out, kind="sentencepiece", path=spm_path), 0)
    # the same kind and vocabulary but another model file: ids would mean other text
    from sessa_jax.data.tokenizers import make_tokenizer

    sp_out = tmp_path / "sp_shards"
    text.prepare(
        str(tmp_path / "corpus"),
        str(sp_out),
        seq_len=16,
        eval_fraction=0.2,
        tokenizer=make_tokenizer("sentencepiece", spm_path),
    )
    assert len(make_source(_text_cfg(sp_out, kind="sentencepiece", path=spm_path), 0)) > 0
    from sessa_jax.data.tokenizers import train_sentencepiece

    (tmp_path / "other.txt").write_text("pack my box with five dozen liquor jugs\n" * 200)
    other = train_sentencepiece(str(tmp_path / "other.txt"), str(tmp_path / "other.model"), vocab_size=300).path
    assert make_tokenizer("sentencepiece", other).vocab_size == make_tokenizer("sentencepiece", spm_path).vocab_size
    with pytest.raises(
        text.ShardError,
        match=r"prepared with the tokenizer sentencepiece 'spm.model'.* but this run "
        r"uses sentencepiece 'other.model'",
    ):
        make_source(_text_cfg(sp_out, kind="sentencepiece", path=str(other)), 0)


def test_damaged_shards_fail_at_open_and_every_bad_file_is_named(tmp_path):
    out, _ = _shards(tmp_path)
    names = sorted(n for n in os.listdir(out) if n.startswith("train-"))
    assert len(names) >= 3
    (out / names[0]).write_bytes(b"")  # zero bytes
    full = (out / names[1]).read_bytes()
    (out / names[1]).write_bytes(full[: len(full) // 2])  # truncated
    flipped = bytearray((out / names[2]).read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF  # same size, same index: only the checksum sees it
    (out / names[2]).write_bytes(bytes(flipped))
    with pytest.raises(text.ShardError) as e:
        make_source(_text_cfg(out), 1)  # opening the eval split checks the train shards too
    msg = str(e.value)
    assert "3 shard file(s) do not match manifest.json" in msg
    assert f"{names[0]}: 0 bytes" in msg and "(empty)" in msg
    assert f"{names[1]}: {len(full) // 2} bytes" in msg and "(truncated)" in msg
    assert f"{names[2]}: CRC-32" in msg and "bytes changed since prepare" in msg
    (out / names[1]).unlink()
    with pytest.raises(text.ShardError, match=rf"{names[1]}: missing"):
        make_source(_text_cfg(out), 0)


def test_shards_without_a_manifest_are_refused_with_the_fix(tmp_path):
    out, _ = _shards(tmp_path)
    (out / "manifest.json").unlink()
    with pytest.raises(text.ShardError, match=r"has no manifest.json .*prepare --input CORPUS --output .*--overwrite"):
        make_source(_text_cfg(out), 0)


def _rewrite_record(out, name, index, edit):
    """Rewrites shard ``name`` with record ``index`` changed by ``edit`` and its manifest entry
    updated to match: shards that verify but hold what another tool wrote."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    path = str(out / name)
    reader = ArrayRecordReader(path)
    records = list(reader.read_all())
    reader.close()
    row = np.frombuffer(records[index], np.int32).copy()
    edit(row)
    records[index] = row.tobytes()
    writer = ArrayRecordWriter(path, "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    for e in manifest["shards"]:
        if e["name"] == name:
            e["bytes"], e["crc32"] = os.path.getsize(path), text.file_crc32(path)
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("bad", [257, 100_000, -1])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_shard(tmp_path, bad):
    out, _ = _shards(tmp_path)
    _rewrite_record(out, "train-00001.array_record", 3, lambda row: row.__setitem__(5, bad))
    source = make_source(_text_cfg(out), 0)
    assert source[0]["inputs"].shape == (16,)  # other records read as before
    with pytest.raises(
        text.ShardError,
        match=rf"train-00001.array_record': record 3 holds token id {bad}, "
        r"outside \[0, 257\)",
    ):
        source[20 + 3]  # rows_per_shard=20: record 3 of the second shard
    # through the training pipeline: the error reaches the caller, shard named
    from sessa_jax.data import TRAIN, make_iterator

    it = make_iterator(_text_cfg(out), TRAIN)
    with pytest.raises(text.ShardError, match=r"train-00001.array_record': record 3 holds token id"):
        for _ in range(len(source)):
            next(it)


def test_flipped_bytes_without_checksums_fail_at_read_naming_the_shard(tmp_path):
    """verify_checksums=False skips the full read at open; ArrayRecord's own chunk hashes still catch
    the damage when the record is read, and the error names the shard and record."""
    out, _ = _shards(tmp_path)
    name = "train-00000.array_record"
    data = bytearray((out / name).read_bytes())
    data[1000] ^= 0x01  # inside the records' chunks (the file is mostly padding after them)
    (out / name).write_bytes(bytes(data))
    cfg = _text_cfg(out)
    with pytest.raises(text.ShardError, match=rf"{name}: CRC-32"):
        make_source(cfg, 0)
    cfg.text.verify_checksums = False
    with pytest.raises(text.ShardError, match=rf"{name}'(: record \d+)? cannot be (read|opened)"):
        source = make_source(cfg, 0)
        for i in range(len(source)):
            source[i]


def test_the_verify_command_checks_what_training_checks(tmp_path, capsys):
    out, counts = _shards(tmp_path)
    assert text.main(["verify", "--dir", str(out)]) == 0
    assert f"{sum(counts.values())} rows of seq_len=16" in capsys.readouterr().out
    (out / "eval-00000.array_record").write_bytes(b"")
    assert text.main(["verify", "--dir", str(out), "--no_checksums"]) == 2
    assert "eval-00000.array_record: 0 bytes" in capsys.readouterr().err
