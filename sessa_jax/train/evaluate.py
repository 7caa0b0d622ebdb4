"""Held-out evaluation: loss, accuracy, perplexity, bits per token and bits per byte.

``evaluate`` reads the eval split to its end (``num_batches`` 0, the default for text) or
its first ``num_batches`` batches, padding a last partial batch with zero-weight rows so
every held-out position counts once. Sums are accumulated over weighted target positions:

    eval_loss          = sum(ce) / N                    nats per token (N weighted targets)
    eval_perplexity    = exp(eval_loss)
    eval_bits_per_token = sum(ce) / (N ln 2)
    eval_bits_per_byte = sum(ce) / (ln 2 * sum(bytes(target)))   text runs only

``bytes(target)`` is the tokenizer's UTF-8 length of the target id (``token_bytes()``; BOS
counts 0), so bits per byte compares byte- and subword-level runs on the same text.

    sessa-eval --run runs/text_bytes               # the whole eval split, latest checkpoint
    sessa-eval --run runs/tiny --num_batches 8 --step 30

The output starts with the checkpoint step evaluated (``step`` in ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.data import EVAL, global_batch, make_dataset
from sessa_jax.data.pipeline import tokenizer_of
from sessa_jax.sample import load_run_step
from sessa_jax.train.checkpoint import CheckpointError
from sessa_jax.train.loss import loss_sums

SUMS = ("loss_sum", "correct_sum", "weight_sum", "bytes_sum")


def make_eval_step(apply_fn, loss_chunk: int = 0):
    """jitted (params, batch, token_bytes (V,) int32) -> float32 sums of SUMS for one batch."""

    @jax.jit
    def eval_step(params, batch, token_bytes_V):
        sums = loss_sums(params, apply_fn, batch, loss_chunk)
        w = batch["weights"].astype(jnp.float32)
        sums["bytes_sum"] = (token_bytes_V[batch["targets"]].astype(jnp.float32) * w).sum()
        return sums

    return eval_step


def summarize(sums: dict, per_byte: bool) -> dict:
    """Eval metrics from summed loss/correct/weight/bytes (see the module docstring)."""
    n = max(sums["weight_sum"], 1.0)
    loss = sums["loss_sum"] / n
    out = dict(
        eval_loss=loss,
        eval_accuracy=sums["correct_sum"] / n,
        eval_perplexity=math.exp(min(loss, 700.0)),
        eval_bits_per_token=loss / math.log(2),
        eval_tokens=sums["weight_sum"],
    )
    if per_byte:
        out["eval_bits_per_byte"] = sums["loss_sum"] / math.log(2) / max(sums["bytes_sum"], 1.0)
    return out


def _pad_rows(batch: dict, rows: int) -> dict:
    """A partial last batch padded to ``rows`` with zero-weight copies of its first row."""
    have = next(iter(batch.values())).shape[0]
    if have == rows:
        return batch
    out = {k: np.concatenate([v, np.repeat(v[:1], rows - have, 0)]) for k, v in batch.items()}
    out["weights"][have:] = 0
    return out


def evaluate(
    params, eval_step, eval_data, local_batch_size: int, token_bytes=None, num_batches: int = 0, sharding=None
) -> dict:
    """Eval metrics of ``params`` over ``eval_data`` (an iterable of per-process numpy batches).

    ``eval_step``: from ``make_eval_step``; ``token_bytes``: (V,) bytes per id, or None
    (no bits per byte, e.g. synthetic tasks); ``num_batches`` 0 = read ``eval_data`` to its
    end; ``sharding``: lay batches out as global arrays (``data.global_batch``), None = as is.
    """
    per_byte = token_bytes is not None
    table = jnp.asarray(np.zeros(1, np.int32) if token_bytes is None else token_bytes, jnp.int32)
    totals = dict.fromkeys(SUMS, 0.0)
    for i, batch in enumerate(eval_data):
        if num_batches and i >= num_batches:
            break
        batch = _pad_rows(batch, local_batch_size)
        batch = global_batch(batch, sharding) if sharding is not None else {k: jnp.asarray(v) for k, v in batch.items()}
        sums = jax.device_get(eval_step(params, batch, table))
        for k in SUMS:
            totals[k] += float(sums[k])
    return summarize(totals, per_byte)


def token_bytes_for(data_cfg, vocab_size: int):
    """(vocab_size,) bytes per id for text runs (model vocabulary padding counts 0); None otherwise."""
    if data_cfg.task != "text":
        return None
    table = tokenizer_of(data_cfg).token_bytes()
    out = np.zeros(vocab_size, np.int32)
    out[: len(table)] = table[:vocab_size]
    return out


def evaluate_run(run_dir: str, step: int | None = None, num_batches: int = 0, batch_size: int = 0) -> dict:
    """Eval metrics of a training run's checkpoint (latest by default) on its held-out split."""
    return evaluate_run_step(run_dir, step, num_batches, batch_size)[1]


def evaluate_run_step(
    run_dir: str, step: int | None = None, num_batches: int = 0, batch_size: int = 0, log=None
) -> tuple[int, dict]:
    """(checkpoint step evaluated, eval metrics): ``evaluate_run`` saying which step it read
    (without ``step``: the newest that restores; ``sample.load_run_step``)."""
    model, params, cfg, step = load_run_step(run_dir, step, log)
    if batch_size:
        cfg.data.batch_size = batch_size
    if cfg.data.task != "text" and not num_batches:
        num_batches = cfg.train.eval_batches or 8  # synthetic eval splits are unbounded
    eval_step = make_eval_step(model.apply, cfg.train.loss_chunk)
    data = make_dataset(cfg.data, EVAL, process_index=0, process_count=1)
    metrics = evaluate(
        params, eval_step, data, cfg.data.batch_size, token_bytes_for(cfg.data, model.config.vocab_size), num_batches
    )
    return step, metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sessa-eval", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="workdir of a sessa-train run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--num_batches", type=int, default=0, help="0 = the whole eval split (text)")
    parser.add_argument("--batch_size", type=int, default=0, help="0 = the run's data.batch_size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.num_batches < 0 or args.batch_size < 0:
        print(
            f"error: --num_batches ({args.num_batches}) and --batch_size ({args.batch_size}) must be >= 0",
            file=sys.stderr,
        )
        return 2
    try:
        step, metrics = evaluate_run_step(
            args.run, args.step, args.num_batches, args.batch_size, log=lambda line: print(line, file=sys.stderr)
        )
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"step": step, **metrics}))
    else:
        print(" | ".join([f"step {step}"] + [f"{k.removeprefix('eval_')} {v:.6g}" for k, v in metrics.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
