"""Generate from a trained run: ``sessa-sample --run DIR --prompt TEXT`` (or ``python -m sessa_jax.sample``).

Restores only the parameters (no optimizer state) of the latest (or ``--step``)
checkpoint in ``DIR/checkpoints``, rebuilds the model from the config saved with it and
samples. Text runs take the prompt as text (encoded by the run's tokenizer); synthetic-task runs take space-separated
token ids. ``kind="sessa"`` uses the cached decoder (``sessa_jax.decoding.generate``);
the baselines recompute the whole prefix per token (fine for short samples).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.data import text
from sessa_jax.data.pipeline import tokenizer_of
from sessa_jax.decoding import check_rng, check_sampling, check_token_ids, generate
from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train import workdir as wd
from sessa_jax.train.config import config_from_json
from sessa_jax.train.state import build_model, init_params


def load_run(run_dir: str, step: int | None = None):
    """(model, params, run config) of a run directory, parameters only (see ``load_run_step``)."""
    return load_run_step(run_dir, step)[:3]


def load_run_step(run_dir: str, step: int | None = None, log=None):
    """(model, params, run config, step) of a run directory, parameters only.

    ``step`` None: the newest checkpoint whose config and parameters restore and verify
    (a damaged newer one is skipped, and ``log``, when given, says so); otherwise that
    step. Raises FileNotFoundError (no checkpoints), ValueError (no such step) or
    ``checkpoint.CheckpointError`` (the step, or every step, is damaged), each naming the
    steps there are and the fix.
    """
    try:
        run_dir = wd.normalize(run_dir)
    except wd.WorkdirError as e:
        raise ValueError(f"--run: {e}") from None
    ckpt_dir = wd.join(run_dir, "checkpoints")
    if not wd.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"--run {run_dir!r} has no checkpoints/ directory; pass the --workdir of a train.py run"
        )
    manager = ckpt.make_manager(ckpt_dir, async_save=False)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
    finally:
        manager.close()
    if not steps:
        raise FileNotFoundError(
            f"no complete checkpoint in {ckpt_dir!r}; train with checkpoint.every > 0 (or let the "
            f"run finish) and point --run at its workdir"
        )
    if step is not None and step not in steps:
        raise ValueError(f"--step {step}: {ckpt_dir!r} has no checkpoint of that step; its steps are {sorted(steps)}")
    failed = []
    for s in [step] if step is not None else steps:
        try:
            cfg = config_from_json(ckpt.restore_config(ckpt_dir, s, log=_quiet))
            model = build_model(cfg)
            abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), cfg.data.seq_len))
            return model, ckpt.restore_params(ckpt_dir, abstract, s, log=_quiet), cfg, s
        except ckpt.CheckpointError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(f"step {s}:")]
            failed.append(lines[0] if lines else f"step {s}: {str(e).splitlines()[0]}")
            if log is not None and step is None:
                log(f"warning: checkpoint {failed[-1]} (damaged); trying the one before it")
    others = sorted(set(steps) - {step}) if step is not None else []
    fix = (
        f"pass another --step (the others: {others}) or leave --step out for the newest that restores"
        if others
        else "restore the checkpoints from a backup, or train again"
    )
    raise ckpt.CheckpointError(f"no checkpoint of {ckpt_dir!r} restores: " + "; ".join(failed) + f". Fix: {fix}")


def _quiet(*args, **kwargs):
    pass


def encode_prompt(prompt: str, task: str, tokenizer=None) -> np.ndarray:
    """Prompt -> ids (P,): text runs prepend BOS and use the run's tokenizer (None = bytes)."""
    if task == "text":
        if tokenizer is not None:
            return np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]).astype(np.int32)
        return np.array([text.BOS] + list(prompt.encode("utf-8")), np.int32)
    try:
        return np.array([int(t) for t in prompt.split()], np.int32)
    except ValueError as e:
        raise ValueError(
            f"a {task!r} run takes the prompt as space-separated token ids, e.g. '3 41 7'; got {prompt!r}"
        ) from e


def decode_tokens(tokens: np.ndarray, task: str, tokenizer=None) -> str:
    """Sampled ids -> text (text runs) or space-separated ids."""
    if task == "text" and tokenizer is not None:
        return tokenizer.decode(tokens)
    if task == "text":
        return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace")
    return "".join(f" {int(t)}" for t in tokens)  # continues the space-separated prompt


def generate_by_recompute(model, params, prompt, max_new_tokens: int, rng, temperature=1.0, top_k=None):
    """Samples by re-running the full model on a fixed-size buffer (one compile)."""
    check_sampling(max_new_tokens, temperature, top_k, None, model.config.vocab_size)
    rng = check_rng(rng, "generate_by_recompute")
    check_token_ids(prompt, model.config.vocab_size)
    max_new_tokens, top_k = int(max_new_tokens), None if top_k is None else int(top_k)
    b, p = prompt.shape
    buf = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)

    def body(t, carry):
        buf, rng = carry
        logits = model.apply(params, buf)[:, t - 1].astype(jnp.float32)
        if temperature == 0:
            nxt = jnp.argmax(logits, -1)
        else:
            logits = logits / temperature
            if top_k:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            nxt = jax.random.categorical(jax.random.fold_in(rng, t), logits)
        return buf.at[:, t].set(nxt.astype(jnp.int32)), rng

    return jax.jit(lambda buf, rng: jax.lax.fori_loop(p, p + max_new_tokens, body, (buf, rng))[0])(buf, rng)


def sample(
    run_dir: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    step: int | None = None,
    log=None,
) -> str:
    """Continuation of ``prompt`` sampled from the run's parameters (``load_run_step``)."""
    return _sample(run_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, step, log)[0]


def _sample(run_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, step, log):
    """(continuation, the checkpoint step it came from)."""
    model, params, cfg, step = load_run_step(run_dir, step, log)
    tok = tokenizer_of(cfg.data) if cfg.data.task == "text" else None
    tokens = jnp.asarray(encode_prompt(prompt, cfg.data.task, tok))[None]
    if tokens.shape[1] == 0:
        raise ValueError(
            f"a {cfg.data.task!r} run needs a non-empty --prompt of space-separated token ids, e.g. '3 41 7'"
        )
    rng = jax.random.PRNGKey(seed)
    if cfg.model.kind == "sessa":
        out = generate(model, params, tokens, max_new_tokens, rng, temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        if top_p is not None:
            raise ValueError(f"--top_p is supported for kind='sessa' runs only; this run is {cfg.model.kind!r}")
        out = generate_by_recompute(model, params, tokens, max_new_tokens, rng, temperature, top_k)
    return decode_tokens(np.asarray(out[0, tokens.shape[1] :]), cfg.data.task, tok), step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sessa-sample", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="workdir of a train.py run")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    try:
        out, step = _sample(
            args.run,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            args.step,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (FileNotFoundError, ValueError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"(sampled from {wd.join(args.run, 'checkpoints')} step {step})", file=sys.stderr)
    print(args.prompt + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
