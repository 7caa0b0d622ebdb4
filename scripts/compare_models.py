"""Matched Sessa / Transformer / Mamba comparison on SymbolSoup (published) and MQAR across lengths.

For every task and length, the three kinds get the same depth, heads and vocabulary; the
baselines' width is chosen so their parameter count is within 5% of Sessa's
(``baselines.match_width``; checked, the run stops otherwise). Every kind trains for the same
number of steps on the same batches (so the same token budget) with the library's optimizer
(AdamW, warmup + cosine, clipping) at each learning rate of one shared sweep, with several
seeds (initialisation and data order). The learning rate of each (task, length, kind) is chosen
on the validation split (mean over seeds); the table reports that choice's test accuracy, mean
and spread over seeds, and every cell's numbers are in the JSONL.

A run = (task, length, kind, lr, seed). Each finished run appends one JSON line to ``--out``;
a rerun skips the runs already there, so the script resumes after an interruption. A run in
progress is checkpointed (parameters, optimizer state, step, losses; orbax, under
``--checkpoint-dir``) when ``--time-limit`` seconds have passed, and every
``Scale.checkpoint_every`` steps; the next invocation continues it from there with the
same result as an uninterrupted run. So a long sweep runs in fixed-length pieces:

    until python scripts/compare_models.py --scale paper --time-limit 540; do
      [ $? -eq 3 ] || break   # 3: stopped at the time limit with runs left; anything else is an error
    done

One compiled train step serves every lr and seed of a (task, length, kind): the library
optimizer runs at peak lr 1 and the update is scaled by lr, which is exactly AdamW at that lr
(its decoupled weight decay is also scaled by lr).

    python scripts/compare_models.py --scale cpu --out results/compare_cpu.jsonl --workers 2
    python scripts/compare_models.py --scale cpu --out results/compare_cpu.jsonl --table   # table only
    python scripts/compare_models.py --scale paper --out results/compare_paper.jsonl --time-limit 540  # accelerator

``--workers N`` trains N runs at a time, each in its own process (a run uses about one core).

Scales: ``toy`` (the test, seconds), ``cpu`` (sized for about 50 minutes on a quiet 2-core machine
with ``--workers 2``; the budget is an hour), ``paper`` (T = 2048 SymbolSoup and MQAR, the paper's
125M width: for an accelerator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np

from sessa_jax.options import LAYER_KINDS as KINDS

SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
EXIT_UNFINISHED = 3  # main's exit status when --time-limit stopped it with runs left


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything one comparison holds fixed across kinds."""

    d_model: int  # Sessa's width; the baselines' is matched to its parameter count
    n_heads: int
    n_layers: int
    batch_size: int
    steps: int  # same for every kind, so the same token budget
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    soup_lengths: tuple[tuple[int, int], ...]  # (min_tokens, max_tokens); seq_len = max_tokens
    soup_sizes: tuple[int, int, int]  # train / valid / test examples
    mqar_lengths: tuple[int, ...]
    mqar_kv_pairs: int
    mqar_vocab: int
    mqar_eval: int  # valid and test sequences each
    chunk_size: int = 64
    dtype: str = "float32"
    warmup_frac: float = 0.1
    checkpoint_every: int = 0  # steps between checkpoints of the run in progress (0: only at --time-limit)
    save_params_seeds: tuple[int, ...] = (0,)  # these seeds' trained parameters go to OUT.params/ (influence)
    mqar_model: tuple[int, int] | None = None  # MQAR's own (Sessa d_model, n_heads); None: d_model, n_heads
    mqar_steps: int = 0  # MQAR's own number of steps; 0: steps


SCALES = {
    "toy": Scale(
        d_model=16,
        n_heads=1,
        n_layers=1,
        batch_size=4,
        steps=3,
        lrs=(1e-3, 3e-3, 1e-2),
        seeds=(0, 1, 2),
        soup_lengths=((40, 60),),
        soup_sizes=(40, 20, 20),
        mqar_lengths=(16,),
        mqar_kv_pairs=2,
        mqar_vocab=32,
        mqar_eval=8,
        chunk_size=16,
    ),
    # cpu: one learning rate (the sweep would triple the cost; 3e-3 is where the 2-layer models learn
    # SymbolSoup, 1e-2 diverges there), 3 seeds, the longest SymbolSoup window that fits the budget
    # with two workers (--workers 2). SymbolSoup trains 2500 steps on fresh texts (80000, one pass):
    # at 1000 steps every kind sat at or below the learned-unigram line; 4000 test texts keep that
    # line's own sampling error near 0.007.
    # MQAR gets width 64 / 2 heads and 1500 steps: at width 32 / 1 head no kind learned the key-value
    # association within 3000 steps (all at 1 / pairs), at 64 / 2 heads Sessa does.
    "cpu": Scale(
        d_model=32,
        n_heads=1,
        n_layers=2,
        batch_size=32,
        steps=2500,
        lrs=(3e-3,),
        seeds=(0, 1, 2),
        soup_lengths=((200, 300),),
        soup_sizes=(80000, 1000, 4000),
        mqar_lengths=(32,),
        mqar_kv_pairs=4,
        mqar_vocab=64,
        mqar_eval=500,
        chunk_size=16,
        mqar_model=(64, 2),
        mqar_steps=1500,
    ),
    "paper": Scale(
        d_model=768,
        n_heads=12,
        n_layers=12,
        batch_size=32,
        steps=5000,
        lrs=(3e-4, 6e-4, 1.2e-3),
        seeds=(0, 1, 2),
        soup_lengths=((400, 600), (1366, 2048)),
        soup_sizes=(20000, 2000, 2000),
        mqar_lengths=(512, 2048),
        mqar_kv_pairs=32,
        mqar_vocab=8192,
        mqar_eval=2000,
        chunk_size=128,
        dtype="bfloat16",
        checkpoint_every=500,
    ),
}


def task_scale(scale: Scale, task: str) -> Scale:
    """``scale`` with MQAR's own width, heads and steps applied when ``task`` is "mqar"."""
    if task != "mqar":
        return scale
    d, h = scale.mqar_model or (scale.d_model, scale.n_heads)
    return dataclasses.replace(scale, d_model=d, n_heads=h, steps=scale.mqar_steps or scale.steps)


# --------------------------------------------------------------------------------------
# Data: fixed arrays per (task, length, split), so every kind reads the same examples
# --------------------------------------------------------------------------------------
def soup_split(scale: Scale, lengths: tuple[int, int], split: int) -> dict[str, np.ndarray]:
    """One SymbolSoup split (published process, data seed 0) as stacked (N, T) arrays."""
    from sessa_jax.data import symbol_soup as ss

    lo, hi = lengths
    src = ss.SymbolSoupSource(
        seq_len=hi, min_tokens=lo, max_tokens=hi, seed=0, split=split, num_records=scale.soup_sizes[split]
    )
    return _stack([src[i] for i in range(len(src))])


def mqar_split(scale: Scale, seq_len: int, split: int) -> dict[str, np.ndarray]:
    """MQAR sequences of one split (the training split is sampled anew each step instead)."""
    from sessa_jax.data.mqar import MQARSource

    src = MQARSource(seq_len, scale.mqar_vocab, scale.mqar_kv_pairs, seed=0, split=split)
    n = scale.mqar_eval if split != SPLIT_TRAIN else scale.steps * scale.batch_size
    return _stack([src[i] for i in range(n)])


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def task_data(scale: Scale, task: str, length) -> dict[int, dict[str, np.ndarray]]:
    make = soup_split if task == "symbol_soup" else mqar_split
    return {split: make(scale, length, split) for split in (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST)}


def seq_len_of(task: str, length) -> int:
    return length[1] if task == "symbol_soup" else length


def length_name(task: str, length) -> str:
    return f"{length[0]}-{length[1]}" if task == "symbol_soup" else str(length)


def vocab_of(scale: Scale, task: str) -> int:
    from sessa_jax.data import symbol_soup as ss

    v = ss.VOCAB_SIZE if task == "symbol_soup" else scale.mqar_vocab
    return -(-v // 8) * 8


def reference_lines(scale: Scale, task: str, data: dict) -> dict[str, float]:
    """Test accuracies of the reference lines on the test split the models are scored on.

    SymbolSoup (``sessa_jax.baselines.reference``): chance, learned unigram and bigram
    regressions (fitted on the same training texts, L2 chosen on valid) and the Markov
    oracle. MQAR: chance (1 / number of values), the no-association line in closed form
    (``mqar.no_association_accuracy``) and the same predictor measured on the test split.
    ``test_n`` is the number of scored test answers.
    """
    if task == "symbol_soup":
        from sessa_jax.baselines.reference import soup_reference_lines

        lines = soup_reference_lines(data[SPLIT_TRAIN], data[SPLIT_VALID], data[SPLIT_TEST])
    else:
        from sessa_jax.data.mqar import frequency_baseline, no_association_accuracy

        num_values = scale.mqar_vocab - scale.mqar_vocab // 2
        lines = dict(
            chance=1.0 / num_values,
            no_association=no_association_accuracy(scale.mqar_kv_pairs, num_values),
            no_association_measured=frequency_baseline(data[SPLIT_TEST], scale.mqar_kv_pairs),
        )
    lines["test_n"] = int(np.sum(data[SPLIT_TEST]["weights"] > 0))
    return {k: float(v) if k != "test_n" else v for k, v in lines.items()}


# --------------------------------------------------------------------------------------
# Models and training: one compiled step per (task, length, kind)
# --------------------------------------------------------------------------------------
def model_configs(scale: Scale, task: str, length) -> dict:
    """SessaConfig per kind; baselines width-matched to Sessa's parameter count (within 5%)."""
    import jax.numpy as jnp

    from sessa_jax.baselines import count_params, match_width
    from sessa_jax.config import SessaConfig

    t = seq_len_of(task, length)
    base = SessaConfig(
        d_model=scale.d_model,
        n_heads=scale.n_heads,
        n_layers=scale.n_layers,
        vocab_size=vocab_of(scale, task),
        max_len=t,
        chunk_size=min(scale.chunk_size, t),
        dtype=jnp.dtype(scale.dtype),
    )
    configs = {k: match_width(base, k) for k in KINDS}
    target = count_params(base, "sessa")
    for kind, c in configs.items():
        n = count_params(c, kind)
        if abs(n - target) > 0.05 * target:
            raise RuntimeError(
                f"{kind} at d_model={c.d_model} has {n:,} parameters, more than 5% from Sessa's "
                f"{target:,}: the comparison would not be matched; change the scale's d_model/n_heads"
            )
    return configs


class Trainer:
    """Compiled train and eval steps of one (model config, kind), shared by every lr and seed."""

    def __init__(self, config, kind: str, scale: Scale):
        import jax
        import jax.numpy as jnp
        import ml_collections as mc
        import optax

        from sessa_jax.model import SessaLM
        from sessa_jax.train.config import base_config
        from sessa_jax.train.optimizer import make_optimizer
        from sessa_jax.train.step import loss_and_metrics

        self.model, self.scale, self.seq_len = SessaLM(config, kind=kind), scale, config.max_len
        optim = mc.ConfigDict(base_config().optim.to_dict())
        optim.update(lr=1.0, warmup_steps=max(1, int(scale.warmup_frac * scale.steps)))
        self.tx = make_optimizer(optim, scale.steps)  # peak lr 1; the step scales updates by lr
        apply = self.model.apply

        def train_step(params, opt_state, batch, lr):
            def loss_fn(p):
                return loss_and_metrics(p, apply, batch)

            (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
            return optax.apply_updates(params, updates), opt_state, loss

        def eval_sums(params, batch):
            return loss_and_metrics(params, apply, batch)[1]

        def init(key):
            params = self.model.init(key, jnp.zeros((1, self.seq_len), jnp.int32))
            return params, self.tx.init(params)

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_sums = jax.jit(eval_sums)
        self._init = jax.jit(init)

    def init(self, seed: int):
        """Fresh parameters and optimizer state of ``seed``."""
        import jax

        return self._init(jax.random.PRNGKey(seed))

    def accuracy(self, params, data: dict[str, np.ndarray]) -> float:
        """Accuracy on the weighted positions of ``data`` (all of it, in batches)."""
        b, n = self.scale.batch_size, len(data["inputs"])
        correct = weight = 0.0
        for start in range(0, n, b):
            batch = {k: v[start : start + b] for k, v in data.items()}
            if len(batch["inputs"]) < b:  # pad the last batch with unscored rows (one compiled shape)
                pad = b - len(batch["inputs"])
                batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            sums = self.eval_sums(params, batch)
            correct += float(sums["correct_sum"])
            weight += float(sums["weight_sum"])
        return correct / max(weight, 1.0)

    def _save(self, path: str, params, opt_state, step: int, losses: list, seconds: float) -> None:
        """One atomic orbax checkpoint of the run in progress (replaces the previous one)."""
        import orbax.checkpoint as ocp

        padded = np.zeros(self.scale.steps, np.float32)
        padded[:step] = np.asarray([float(x) for x in losses[:step]], np.float32)
        tree = dict(params=params, opt_state=opt_state, step=np.int32(step), losses=padded, seconds=np.float32(seconds))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.abspath(path), tree, force=True)

    def _restore(self, path: str, params, opt_state):
        """(params, opt_state, step, losses, seconds) saved by ``_save`` for this run's shapes."""
        import jax
        import orbax.checkpoint as ocp

        like = dict(
            params=params,
            opt_state=opt_state,
            step=np.int32(0),
            losses=np.zeros(self.scale.steps, np.float32),
            seconds=np.float32(0),
        )
        abstract = jax.eval_shape(lambda tree: tree, like)
        with ocp.StandardCheckpointer() as ckptr:
            got = ckptr.restore(os.path.abspath(path), abstract)
        step = int(got["step"])
        return (
            got["params"],
            got["opt_state"],
            step,
            [float(x) for x in np.asarray(got["losses"])[:step]],
            float(got["seconds"]),
        )

    def run(
        self, lr: float, seed: int, data: dict, checkpoint: str | None = None, deadline: float | None = None
    ) -> dict | None:
        """Trains one model (init and data order from ``seed``); accuracies on valid and test.

        With ``checkpoint`` (a directory path) the run continues from the state saved there,
        saves it every ``scale.checkpoint_every`` steps, and when ``time.monotonic()`` passes
        ``deadline`` after a step (at least one step is taken) it saves and returns None.
        The result does not depend on where the run was interrupted.
        """
        import jax.numpy as jnp

        start, cpu_start = time.perf_counter(), time.process_time()
        params, opt_state = self.init(seed)
        first, losses, before = 0, [], 0.0
        if checkpoint and os.path.isdir(checkpoint):
            params, opt_state, first, losses, before = self._restore(checkpoint, params, opt_state)
        train, b, steps = data[SPLIT_TRAIN], self.scale.batch_size, self.scale.steps
        n = len(train["inputs"])
        order = np.concatenate(
            [np.random.default_rng([seed, epoch]).permutation(n) for epoch in range(math.ceil(steps * b / n))]
        )
        every = self.scale.checkpoint_every
        for step in range(first, steps):
            idx = order[step * b : (step + 1) * b]
            params, opt_state, loss = self.train_step(
                params, opt_state, {k: v[idx] for k, v in train.items()}, jnp.float32(lr)
            )
            losses.append(loss)
            taken = step + 1
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if checkpoint and taken < steps and (out_of_time or (every and taken % every == 0)):
                self._save(checkpoint, params, opt_state, taken, losses, before + time.perf_counter() - start)
                if out_of_time:
                    return None
        losses = [float(x) for x in losses]
        if not np.isfinite(losses[-1]):
            valid = test = float("nan")
        else:
            valid, test = self.accuracy(params, data[SPLIT_VALID]), self.accuracy(params, data[SPLIT_TEST])
        self.last_params = params  # the trained parameters, for --save of influence checkpoints
        return dict(
            final_loss=float(np.mean(losses[-max(1, len(losses) // 10) :])),
            valid_accuracy=valid,
            test_accuracy=test,
            seconds=before + time.perf_counter() - start,
            cpu_seconds=time.process_time() - cpu_start,
        )  # this process's CPU time (all threads)


# --------------------------------------------------------------------------------------
# The sweep, resumable through the JSONL file
# --------------------------------------------------------------------------------------
def run_key(r: dict) -> tuple:
    return (r["scale"], r["task"], r["length"], r["kind"], float(r["lr"]), int(r["seed"]))


def params_path(out: str, task: str, name: str, kind: str, lr: float, seed: int) -> str:
    """Where a finished run's trained parameters are saved (flax msgpack)."""
    return os.path.join(os.path.abspath(out) + ".params", f"{task}-{name}-{kind}-lr{lr:g}-seed{seed}.msgpack")


def save_params(path: str, params) -> None:
    """Writes ``params`` (flax msgpack) atomically."""
    from flax import serialization

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(serialization.to_bytes(params))
    os.replace(path + ".tmp", path)


def load_params(path: str, like):
    """Parameters saved by ``save_params``, restored into the structure of ``like``."""
    from flax import serialization

    with open(path, "rb") as f:
        return serialization.from_bytes(like, f.read())


def read_results(path: str) -> list[dict]:
    """Finished runs in ``path`` (a missing file is no runs; a torn last line is ignored)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # an interrupted write; that run is redone
    return out


def _end_with_newline(path: str) -> None:
    """Closes a line torn by an interrupted write, so the next result starts a line of its own."""
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a") as f:
                f.write("\n")


def plan(scale: Scale, tasks) -> list[tuple[str, object]]:
    """(task, length) pairs, shortest lengths of every task first."""
    per_task = [[(t, n) for n in (scale.soup_lengths if t == "symbol_soup" else scale.mqar_lengths)] for t in tasks]
    return [
        pair
        for rank in range(max(map(len, per_task)))
        for pair in (lengths[rank] for lengths in per_task if rank < len(lengths))
    ]


def checkpoint_path(checkpoint_dir: str, task: str, name: str, kind: str, lr: float, seed: int) -> str:
    """Where the run in progress (task, length name, kind, lr, seed) keeps its checkpoint."""
    return os.path.join(checkpoint_dir, f"{task}-{name}-{kind}-lr{lr:g}-seed{seed}")


def parse_overrides(items) -> dict:
    """``["steps=2000", "soup_lengths=((100, 150),)"]`` -> {field: value} for ``Scale`` (Python literals)."""
    import ast

    fields = {f.name for f in dataclasses.fields(Scale)}
    out = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(
                f"--set {item!r}: the value must be a Python literal, e.g. steps=2000 or "
                f'"soup_lengths=((100, 150),)" ({err})'
            ) from None
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def compare(
    scale_name: str,
    out: str,
    tasks=("mqar", "symbol_soup"),
    kinds=KINDS,
    log=print,
    time_limit: float | None = None,
    checkpoint_dir: str | None = None,
    redo_lines: bool = False,
    overrides: dict | None = None,
    claims: str | None = None,
) -> list[dict] | None:
    """Runs every missing (task, length, kind, lr, seed) of ``scale_name``; returns all its rows.

    With ``time_limit`` (seconds) it stops once that much time has passed, saving the run in
    progress under ``checkpoint_dir`` (default: ``out`` + ".runs"), and returns None; calling
    it again continues. It always makes progress (at least one train step per call).
    ``redo_lines`` computes every cell's reference lines again (appended; the last ones count).
    ``overrides`` ({Scale field: value}) change the scale for pilot runs: write them to their own
    ``out``, since rows are keyed by the scale's name and not by its fields.
    ``claims`` (a directory shared by the workers of one ``--workers`` call): a run is taken only
    by the process that creates its entry there first, so workers split the runs between them.
    """
    from sessa_jax.baselines import count_params

    if scale_name not in SCALES:
        raise ValueError(f"--scale {scale_name!r} is unknown; choose one of {sorted(SCALES)}")
    unknown = sorted(set(tasks) - {"symbol_soup", "mqar"}) + sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown task(s)/kind(s) {unknown}; tasks: symbol_soup, mqar; kinds: {KINDS}")
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"--time-limit must be a number of seconds >= 0; got {time_limit!r}")
    scale = dataclasses.replace(SCALES[scale_name], **(overrides or {}))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    checkpoint_dir = checkpoint_dir or os.path.abspath(out) + ".runs"
    deadline = None if time_limit is None else time.monotonic() + time_limit
    progressed = False
    rows_so_far = read_results(out)
    done = {run_key(r) for r in rows_so_far if "kind" in r}
    have_lines = (
        set()
        if redo_lines
        else {(r["task"], r["length"]) for r in rows_so_far if "reference" in r and r["scale"] == scale_name}
    )
    _end_with_newline(out)
    for task, length in plan(scale, tasks):
        name = length_name(task, length)
        todo = [
            (s, lr, k)
            for s in scale.seeds
            for lr in scale.lrs
            for k in kinds
            if (scale_name, task, name, k, float(lr), int(s)) not in done
        ]
        if not todo and (task, name) in have_lines:
            continue
        t0 = time.perf_counter()
        tscale = task_scale(scale, task)
        data = task_data(tscale, task, length)
        log(f"{task} {name}: data made ({time.perf_counter() - t0:.0f}s)")
        if (task, name) not in have_lines and _claim(claims, f"lines-{task}-{name}"):
            t0 = time.perf_counter()
            lines = reference_lines(tscale, task, data)
            with open(out, "a") as f:
                f.write(json.dumps(dict(scale=scale_name, task=task, length=name, reference=lines)) + "\n")
            log(
                f"{task} {name} reference lines (test accuracy): "
                + ", ".join(f"{k} {v:.3f}" for k, v in lines.items() if k != "test_n")
                + f" ({time.perf_counter() - t0:.0f}s)"
            )
        configs = model_configs(tscale, task, length)
        trainers = {}  # one compiled step per kind, reused by every lr and seed
        # seed-major order: an interrupted sweep has every kind and lr for the seeds it finished
        for seed, lr, kind in todo:
            if progressed and deadline is not None and time.monotonic() >= deadline:
                log(
                    f"--time-limit {time_limit:g} s reached before {task} {name} {kind} lr {lr:g} seed {seed}; "
                    "rerun the same command to continue"
                )
                return None
            if not _claim(claims, f"{task}-{name}-{kind}-lr{lr:g}-seed{seed}"):
                continue  # another worker of this call has it
            if kind not in trainers:
                trainers[kind] = Trainer(configs[kind], kind, tscale)
            ckpt = checkpoint_path(checkpoint_dir, task, name, kind, lr, seed)
            result = trainers[kind].run(lr, seed, data, checkpoint=ckpt, deadline=deadline)
            progressed = True
            if result is None:
                log(
                    f"--time-limit {time_limit:g} s reached in {task} {name} {kind} lr {lr:g} seed {seed}: "
                    f"saved to {ckpt}; rerun the same command to continue"
                )
                return None
            row = dict(
                scale=scale_name,
                task=task,
                length=name,
                seq_len=seq_len_of(task, length),
                kind=kind,
                lr=float(lr),
                seed=int(seed),
                d_model=configs[kind].d_model,
                params=count_params(configs[kind], kind),
                steps=tscale.steps,
                tokens=tscale.steps * tscale.batch_size * seq_len_of(task, length),
                **result,
            )
            if seed in scale.save_params_seeds:
                save_params(params_path(out, task, name, kind, lr, seed), trainers[kind].last_params)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            shutil.rmtree(ckpt, ignore_errors=True)  # after the row is written: a crash between keeps both
            log(
                f"{task} {name} {kind:>11} lr {lr:g} seed {seed}: valid {row['valid_accuracy']:.3f} "
                f"test {row['test_accuracy']:.3f} loss {row['final_loss']:.3f} ({row['seconds']:.0f}s)"
            )
    return scale_rows(out, scale_name)


def _claim(claims: str | None, name: str) -> bool:
    """True when this process may do ``name``: always without ``claims``; with it, only the first
    process to create ``claims/name`` (``os.mkdir`` is atomic)."""
    if claims is None:
        return True
    try:
        os.mkdir(os.path.join(claims, name))
        return True
    except FileExistsError:
        return False


def run_workers(argv: list[str], workers: int, out: str, log=print) -> int:
    """Runs this script's ``argv`` (without ``--workers``) in ``workers`` processes that share
    the runs through one claims directory; returns ``EXIT_UNFINISHED`` if any worker stopped at
    its time limit, 0 when all finished, and raises if one failed."""
    import subprocess
    import tempfile

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    claims = tempfile.mkdtemp(prefix=os.path.basename(out) + ".claims-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), *argv, "--claims", claims, "--worker-id", str(i)]
            )
            for i in range(workers)
        ]
        codes = [proc.wait() for proc in procs]
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    failed = [(i, c) for i, c in enumerate(codes) if c not in (0, EXIT_UNFINISHED)]
    if failed:
        raise RuntimeError(
            f"compare_models: worker(s) {', '.join(f'{i} (exit {c})' for i, c in failed)} failed; their "
            f"finished runs are in {out} and a rerun of the same command continues from there"
        )
    log(f"{workers} workers done")
    return EXIT_UNFINISHED if EXIT_UNFINISHED in codes else 0


def scale_rows(out: str, scale_name: str) -> list[dict]:
    """The finished runs of ``scale_name`` in ``out``."""
    return [r for r in read_results(out) if r["scale"] == scale_name and "kind" in r]


def scale_lines(out: str, scale_name: str) -> dict[tuple[str, str], dict]:
    """Reference lines of ``scale_name`` in ``out`` per (task, length name)."""
    return {
        (r["task"], r["length"]): r["reference"]
        for r in read_results(out)
        if r["scale"] == scale_name and "reference" in r
    }


KEY_LINE = {"symbol_soup": "unigram", "mqar": "no_association"}  # the line a kind must beat to show learning


def summarize(rows: list[dict], lines: dict | None = None) -> list[dict]:
    """Per (task, length, kind): the lr with the best mean validation accuracy, its test accuracy
    (mean, sd, standard error, 95% t-interval clipped to [0, 1], min, max over seeds) and every lr's
    mean test accuracy.

    With ``lines`` ((task, length) -> reference lines), ``line`` is the task's key line
    (``KEY_LINE``) and ``margin_se`` is (mean - line) / sqrt(se^2 + line(1 - line) / test_n):
    the seeds' spread and the line's own sampling error on the test answers.
    """
    from scipy.stats import t as student_t

    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["length"], r["kind"]), {}).setdefault(r["lr"], []).append(r)
    out = []
    for (task, length, kind), by_lr in sorted(
        groups.items(), key=lambda kv: (kv[0][0], _length_key(kv[0][1]), KINDS.index(kv[0][2]))
    ):

        def mean(lr, key):
            vals = [x[key] for x in by_lr[lr]]
            return float(np.mean(vals)) if all(np.isfinite(vals)) else -1.0

        best = max(by_lr, key=lambda lr: mean(lr, "valid_accuracy"))
        test = np.array([x["test_accuracy"] for x in by_lr[best]])
        first = by_lr[best][0]
        n = len(test)
        sd = float(np.std(test, ddof=1)) if n > 1 else 0.0
        se = sd / math.sqrt(n) if n > 1 else float("nan")
        half = float(student_t.ppf(0.975, n - 1)) * se if n > 1 else float("nan")
        row = dict(
            task=task,
            length=length,
            kind=kind,
            params=first["params"],
            d_model=first["d_model"],
            tokens=first["tokens"],
            best_lr=best,
            seeds=n,
            test_mean=float(np.mean(test)),
            test_sd=sd,
            test_se=se,
            ci95=(max(0.0, float(np.mean(test)) - half), min(1.0, float(np.mean(test)) + half)),
            test_min=float(test.min()),
            test_max=float(test.max()),
            per_lr={f"{lr:g}": round(mean(lr, "test_accuracy"), 4) for lr in sorted(by_lr)},
            complete=min(len(v) for v in by_lr.values()),
        )
        ref = (lines or {}).get((task, length))
        if ref is not None:
            line = ref[KEY_LINE[task]]
            err = math.sqrt((se if n > 1 else 0.0) ** 2 + line * (1 - line) / ref["test_n"])
            row.update(line_name=KEY_LINE[task], line=line, margin_se=(row["test_mean"] - line) / err)
        out.append(row)
    return out


def _length_key(name: str) -> int:
    return int(name.split("-")[-1])


def table(summary: list[dict], lines: dict | None = None) -> str:
    """Markdown tables: the reference lines per (task, length), then the ``summarize`` rows."""
    out = []
    if lines:
        out += ["| task | length | reference line: test accuracy |", "| --- | --- | --- |"]
        for (task, length), ref in sorted(lines.items(), key=lambda kv: (kv[0][0], _length_key(kv[0][1]))):
            vals = ", ".join(f"{k} {v:.3f}" for k, v in ref.items() if k != "test_n")
            out.append(f"| {task} | {length} | {vals} (n = {ref['test_n']} test answers) |")
        out.append("")
    out += [
        "| task | length | kind | params | d_model | tokens/run | lr | seeds | test acc mean ± sd "
        "| 95% CI | min-max | key line | (mean - line) / SE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        sd = f"{s['test_sd']:.3f}" if s["seeds"] > 1 else "n/a (1 seed)"
        ci = f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s["seeds"] > 1 else "n/a"
        line = f"{s['line_name']} {s['line']:.3f}" if "line" in s else "n/a"
        margin = f"{s['margin_se']:+.1f}" if "line" in s else "n/a"
        out.append(
            f"| {s['task']} | {s['length']} | {s['kind']} | {s['params']:,} | {s['d_model']} | "
            f"{s['tokens']:,} | {s['best_lr']:g} | {s['seeds']} | {s['test_mean']:.3f} ± {sd} | {ci} "
            f"| {s['test_min']:.3f}-{s['test_max']:.3f} | {line} | {margin} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), required=True)
    p.add_argument("--out", help="results JSONL (appended; finished runs are skipped)")
    p.add_argument("--tasks", default="mqar,symbol_soup", help="in this order (the cheaper MQAR first)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--table", action="store_true", help="print the table of --out without running anything")
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds; then save the run in progress and exit with status 3 (rerun to continue)",
    )
    p.add_argument("--checkpoint-dir", help="checkpoints of runs in progress (default: OUT.runs)")
    p.add_argument("--redo-lines", action="store_true", help="compute the reference lines again (the last ones count)")
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="change a field of the scale for a pilot (e.g. steps=2000, seeds=(0,), lrs=(0.01,), "
        '"soup_lengths=((100, 150),)"); use its own --out',
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="train this many runs at a time, each in its own process (a run uses about one core)",
    )
    p.add_argument("--claims", help=argparse.SUPPRESS)  # set by --workers for its worker processes
    p.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    out = a.out or os.path.join("results", f"compare_{a.scale}.jsonl")
    if a.workers < 1:
        p.error(f"--workers must be >= 1; got {a.workers}")
    if a.workers > 1 and not a.table:
        code = run_workers(_without_workers(argv), a.workers, out)
        lines = scale_lines(out, a.scale)
        print(table(summarize(scale_rows(out, a.scale), lines), lines))
        if code:
            sys.exit(code)
        return
    if a.claims is not None:
        prefix = f"[worker {a.worker_id}] "
        print_log = lambda message: print(prefix + message, flush=True)  # noqa: E731
    else:
        print_log = print
    rows = (
        None
        if a.table
        else compare(
            a.scale,
            out,
            tuple(a.tasks.split(",")),
            tuple(a.kinds.split(",")),
            time_limit=a.time_limit,
            checkpoint_dir=a.checkpoint_dir,
            redo_lines=a.redo_lines,
            overrides=parse_overrides(a.set),
            claims=a.claims,
            log=print_log,
        )
    )
    unfinished = rows is None and not a.table
    if a.claims is not None:  # a worker: the parent prints the table
        if unfinished:
            sys.exit(EXIT_UNFINISHED)
        return
    lines = scale_lines(out, a.scale)
    print(table(summarize(scale_rows(out, a.scale) if rows is None else rows, lines), lines))
    if unfinished:
        sys.exit(EXIT_UNFINISHED)


def _without_workers(argv: list[str]) -> list[str]:
    """``argv`` without its ``--workers N`` / ``--workers=N``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--workers":
            skip = True
        elif not item.startswith("--workers="):
            out.append(item)
    return out


if __name__ == "__main__":
    main()
