#!/usr/bin/env bash
# The accelerator measurements of the feedback solve, in steps that each fit a 10-minute slot.
# Run from the repository root on a GPU (or TPU) machine whose python already has jax with the
# accelerator plugin, flax and chex (no install: the package is used from the checkout):
#
#   bash scripts/accelerator_check.sh STEP [OUTDIR]
#   DRY_RUN=1 bash scripts/accelerator_check.sh STEP   # print the commands; run the inline
#                                                       # solve-paths script at toy size on CPU
#
# STEP:
#   report the whole check in one call (at most 9.7 minutes: each part has its timeout): device
#          info; the solve's bf16 accuracy and fast-path tests on the device; the solve's
#          forward + backward with and without segment ids, with the loop vs the static
#          schedule (time, and agreement with the first path); the whole layer vs the
#          Transformer layer at B=8, T=8192, D=1024, H=8, bf16 (the 2.0x yardstick); and the
#          layer at B=1, T=65536 (it must run). On a GPU the paths also time the solve with the
#          opt-in Mosaic GPU GEMM-with-epilogue kernels (kernels="gpu_gemm") next to XLA
#   kernels  the GEMM-with-epilogue kernels on a GPU: their tests against XLA run on the device
#          (tests/test_gpu_epilogue_kernels.py, feedback_solve with kernels="gpu_gemm" vs "xla"),
#          the solve's forward + backward with kernels "xla" vs "gpu_gemm" (segment ids None
#          and one segment), and the layer with them at B=8, T=8192
#   tests  device info; the recursive solve's tests (tests/test_recursive_solve.py, without the
#          pure-Python schedule cases) and the attention-backend tests, compiled on the device
#   solve  the solve alone (recursive) next to causal attention (cuDNN / splash) at B=8,
#          T=8192, D=1024, bf16; on a GPU also the bf16x3 split vs XLA's preset (accuracy, time)
#   paths  the solve's forward + backward at B=8, T=8192, D=1024, bf16: segment ids None vs one
#          segment (the masked path), and the loop schedule vs the static one
#   layer  the whole layer (recursive) next to the Transformer layer at B=8, T=4096 and 8192,
#          D=1024, H=8, bf16; and B=1, T=65536 (leaf 512, the default, and leaf 1024)
#   quick  what fits one short slot (about 8 minutes on an H100): device info, the bf16x3 split vs
#          XLA's preset (accuracy, solve time), and the whole layer vs the Transformer layer at
#          B=8, T=8192, D=1024, H=8, bf16
#   compile  no device needed: the deviceless H100 compile report (benchmarks/gpu_compile.py,
#          with the CUDA plugin; XLA, then the solve and layer with kernels="gpu_gemm") and the
#          v5e compile (benchmarks/tpu_compile.py, with libtpu)
#   all    tests, solve, paths and layer, in order
# OUTDIR (default runs/accelerator_check) receives device.txt, the pytest log and each
# benchmark's printed table (.txt) and results (.json).
set -u -o pipefail

step=${1:?usage: bash scripts/accelerator_check.sh report|tests|solve|paths|kernels|layer|quick|compile|all [OUTDIR]}
out=${2:-runs/accelerator_check}
py=${PYTHON:-python3}
dry=${DRY_RUN:-}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
layer=(benchmarks/layer.py --B 8 --D 1024 --H 8 --dtype bfloat16)

# run SECONDS LOG CMD...: CMD under a timeout, its output appended to OUTDIR/LOG (or, with
# DRY_RUN, the command printed).
run() {
  local limit=$1 log=$2
  shift 2
  if [ -n "$dry" ]; then
    echo "+ timeout $limit $* >> $out/$log"
    return 0
  fi
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$log"
}

device_info() {
  if [ -n "$dry" ]; then echo "+ device info >> $out/device.txt"; return 0; fi
  { date -u; nvidia-smi 2>/dev/null; "$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"; } 2>&1 | tee "$out/device.txt"
}

# The solve's forward + backward per path: segment ids None (no segment mask) vs one segment
# (the masked path), the loop schedule vs the static one (schedule.auto_static_span),
# each timed (mean of 5 calls after a warm-up) and its s and gradients compared with the first
# path's (relative Frobenius error); then, for each value of KERNELS other than "xla" (the
# solve's ``kernels``, e.g. "xla gpu_gemm"), the same with those kernels at the default schedule,
# segment ids None (and one segment with KERNEL_SEGMENTS=1). Sizes from the environment
# (B, T, D, LEAF).
paths_script() {
  cat <<'PY'
import os, sys, time
import jax, jax.numpy as jnp
from sessa_jax.ops.solve.recursive import RecursivePlan, recursive_feedback_solve
from sessa_jax.ops.dispatch import recursive_tile
from sessa_jax.ops.solve.precision import resolve_precision

b, t, d, leaf = (int(os.environ[k]) for k in ("B", "T", "D", "LEAF"))
tile = recursive_tile(t, leaf)
static = RecursivePlan.make(t, leaf, tile, "bf16x3", "cpu", 1.0, static_span="auto").static_span
platform = {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
try:
    tier = os.environ.get("TIER") or resolve_precision("auto", platform, jnp.bfloat16)
except TypeError:  # a rule by platform alone
    tier = os.environ.get("TIER") or resolve_precision("auto", platform)
ks = jax.random.split(jax.random.PRNGKey(0), 5)
q, k, f = (jax.random.normal(ks[i], (b, t, d), jnp.bfloat16) for i in range(3))
gam = 0.99 * jnp.tanh(jax.random.normal(ks[3], (b, t)))
ds = jax.random.normal(ks[4], (b, t, d), jnp.float32)
print(f"# solve paths on {jax.devices()[0].device_kind}, jax {jax.__version__}: B={b} T={t} D={d} leaf {leaf}, "
      f"tile {tile}, tier {tier}, static span of the default rule: {static}")
print("| segment ids | schedule | kernels | f+b ms | s vs first | grads vs first |")
print("|---|---|---|---|---|---|")
first = None
extra = [kern for kern in os.environ.get("KERNELS", "xla").split() if kern != "xla"]
cases = [(packed, span, "xla") for packed in (False, True) for span in (None, static)]
cases += [(packed, static, kern) for kern in extra for packed in (False, True)[:1 + (os.environ.get("KERNEL_SEGMENTS") == "1")]]
for packed, span, kern in cases:
    seg = jnp.ones((b, t), jnp.int32) if packed else None
    def loss(q, k, g, f, seg=seg, span=span, kern=kern):
        s = recursive_feedback_solve(q, k, g, f, seg, leaf_size=leaf, tile=tile, tier=tier, platform=platform,
                                     dtype=jnp.float32, static_span=span,
                                     **({} if kern == "xla" else {"kernels": kern}))
        return jnp.sum(s * ds), s
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    try:
        out = jax.block_until_ready(fn(q, k, gam, f))
    except Exception as err:  # an opt-in kernel that fails on this device: say so, keep the other rows
        if kern == "xla":
            raise
        print(f"| {'one segment' if packed else 'None'} | static span {span} | {kern} | failed: "
              f"{type(err).__name__}: {str(err).splitlines()[0][:200]} | | |", flush=True)
        continue
    t0 = time.perf_counter()
    for _ in range(5):
        out = jax.block_until_ready(fn(q, k, gam, f))
    ms = (time.perf_counter() - t0) / 5 * 1e3
    (_, s), grads = out
    flat = [s] + list(grads)
    first = first or flat
    err = [float(jnp.linalg.norm((a - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32)))
           for a, r in zip(flat, first)]
    print(f"| {'one segment' if packed else 'None'} | {'loop' if span is None else f'static span {span}'} "
          f"| {kern} | {ms:.2f} | {err[0]:.1e} | {max(err[1:]):.1e} |", flush=True)
PY
}

run_paths() {
  if [ -n "$dry" ]; then  # the inline script itself, at toy size on CPU (XLA only: the kernels need leaves of 128)
    echo "+ KERNELS=${KERNELS:-xla}: at toy size only xla"
    KERNELS=xla B=1 T=256 D=32 LEAF=32 "$py" -c "$(paths_script)" 2>&1 | tee "$out/paths.txt"
    return
  fi
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  B=8 T=8192 D=1024 LEAF=512 run "${PATHS_LIMIT:-150}" paths.txt "$py" -c "$(paths_script)"
}

# The opt-in GEMM-with-epilogue kernels against XLA on the device (GPU only).
run_kernels() {
  device_info
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  run 120 kernels_pytest.txt "$py" -m pytest -q -p no:cacheprovider tests/test_gpu_epilogue_kernels.py -k feedback_solve
  KERNELS="xla gpu_gemm" KERNEL_SEGMENTS=1 PATHS_LIMIT=240 run_paths
  run 200 kernels_layer.txt "$py" "${layer[@]}" --T 8192 --solvers recursive --kernels gpu_gemm --no-transformer \
    --iters 5 --warmup 2 --json "$out/kernels_layer.json"
}

run_quick() {
  device_info
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  run 250 quick_layer.txt "$py" "${layer[@]}" --T 8192 --solvers recursive --iters 5 --warmup 2 \
    --json "$out/quick_layer.json"
}

run_tests() {
  device_info
  run 280 pytest.txt "$py" -m pytest -x -q -p no:cacheprovider tests/test_recursive_solve.py \
    tests/test_pallas_attention.py -k "not schedule"
}

run_solve() {
  # Each cell is its own process: without this the parent and the cell both preallocate 75%.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for cell in "feedback recursive" "attention auto"; do
    set -- $cell
    run 200 solve.txt "$py" benchmarks/feedback_solve.py --ops "$1" --methods "${@:2}" --B 8 --D 1024 --H 8 \
      --dtype bfloat16 --T 8192 --reps 5 --reps-large 5
  done
}

run_layer() {
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  run 250 layer.txt "$py" "${layer[@]}" --T 4096 8192 --solvers recursive --iters 5 --warmup 2 \
    --json "$out/layer.json"
  run 250 layer_fit.txt "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --iters 2 --warmup 1 \
    --json "$out/layer_fit.json"
  # leaf 1024 at this length: ~30% fewer kernel launches in the H100 compile (benchmarks/gpu_compile.py)
  run 200 layer_fit_leaf1024.txt "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --leaf 1024 \
    --no-transformer --iters 2 --warmup 1 --json "$out/layer_fit_leaf1024.json"
}

run_report() {
  device_info
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  # the solve's bf16 accuracy tests and its fast paths against the general ones, on the device
  run 140 report_pytest.txt "$py" -m pytest -q -p no:cacheprovider tests/test_recursive_fast_paths.py \
    tests/test_recursive_bf16_accuracy.py -k "not cover"
  if [ -n "$dry" ] || command -v nvidia-smi >/dev/null; then  # + the GEMM-with-epilogue kernels, unpacked
    KERNELS="xla gpu_gemm" PATHS_LIMIT=180 run_paths
  else
    run_paths
  fi
  run 150 report_layer.txt "$py" "${layer[@]}" --T 8192 --solvers recursive --iters 5 --warmup 2 \
    --json "$out/report_layer.json"
  run 110 report_layer_fit.txt "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --no-transformer \
    --iters 1 --warmup 1 --json "$out/report_layer_fit.json"
}

run_compile() {
  run 590 gpu_compile.txt "$py" benchmarks/gpu_compile.py
  run 590 gpu_compile_gemm.txt "$py" benchmarks/gpu_compile.py --kernels gpu_gemm --programs solve-fwd solve-f+b \
    sessa-layer-f+b
  run 590 tpu_compile.txt "$py" benchmarks/tpu_compile.py --shapes 8,8192,1024 --kernels xla
}

case "$step" in
  report) run_report ;;
  tests) run_tests ;;
  solve) run_solve ;;
  paths) device_info; run_paths ;;
  kernels) run_kernels ;;
  layer) run_layer ;;
  quick) run_quick ;;
  compile) run_compile ;;
  all) run_tests; run_solve; run_paths; run_layer ;;
  *) echo "unknown step '$step': choose report, tests, solve, paths, kernels, layer, quick, compile or all" >&2; exit 2 ;;
esac
