#!/usr/bin/env bash
# The accelerator measurements (issues 5 and 10), in steps that each fit a 10-minute slot.
# Run from the repository root on a GPU (or TPU) machine whose python already has jax with
# the accelerator plugin and flax (no install: the package is used from the checkout):
#
#   bash scripts/accelerator_check.sh STEP [OUTDIR]
#
# STEP:
#   solve  device info; the recursive solve's tests compiled on the device; the solve alone
#          (recursive, old pallas) next to causal attention (cuDNN) at B=8, T=8192, D=1024, bf16
#   layer  the whole layer (recursive, old pallas, Transformer) at B=8, T=4096 and 8192,
#          D=1024, H=8, bf16; and B=1, T=65536 with the recursive solve
#   tests  device info, then the compiled-kernel tests (tests/test_pallas_device.py) and the
#          interpret-mode / tiling / lowering tests beside them
#   bench  benchmarks/layer.py, the shape: B=8, D=1024, H=8, bfloat16,
#          T = 1024 ... 8192, solvers blocked and pallas, next to the causal-attention layer
#   long   the same shape at T = 16384, 32768, 65536 (pallas only, fewer repetitions)
#   fit    B=1, T=65536: does the layer's forward + backward fit in device memory
#   tune   benchmarks/pallas_tiling.py: the solve alone at B=8, T=8192, D=1024 for each
#          (chunk, block_d), next to the blocked scan, to choose the GPU tiling defaults
#   all    every step above, in order
# OUTDIR (default runs/accelerator_check) receives device.txt, the pytest log and each
# benchmark's printed table (.txt) and results (.json).
set -u -o pipefail

step=${1:?usage: bash scripts/accelerator_check.sh solve|layer|tests|bench|long|fit|tune|all [OUTDIR]}
out=${2:-runs/accelerator_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
layer=(benchmarks/layer.py --B 8 --D 1024 --H 8 --dtype bfloat16)

run_tests() {
  { date -u; nvidia-smi 2>/dev/null; "$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"; } 2>&1 | tee "$out/device.txt"
  "$py" -m pytest -q -p no:cacheprovider tests/test_pallas_device.py tests/test_pallas_tiling.py \
    tests/test_pallas_solve.py tests/test_pallas_lowering.py tests/test_pallas_attention.py 2>&1 | tee "$out/pytest.txt"
}

run_solve() {
  { date -u; nvidia-smi 2>/dev/null; "$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"; } 2>&1 | tee "$out/device.txt"
  timeout 200 "$py" -m pytest -x -q -p no:cacheprovider tests/test_recursive_solve.py -k "not schedule" 2>&1 \
    | tail -n 30 | tee "$out/pytest_recursive.txt"
  # Each cell is its own process: without this the parent and the cell both preallocate 75%.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for cell in "feedback recursive pallas" "attention auto"; do
    set -- $cell
    timeout 120 "$py" benchmarks/feedback_solve.py --ops "$1" --methods "${@:2}" --B 8 --D 1024 --H 8 \
      --dtype bfloat16 --T 8192 --reps 5 --reps-large 5 2>&1 | tee -a "$out/solve.txt"
  done
}

run_layer() {
  timeout 250 "$py" "${layer[@]}" --T 4096 8192 --solvers recursive pallas --iters 5 --warmup 2 \
    --json "$out/layer.json" 2>&1 | tee "$out/layer.txt"
  timeout 250 "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --iters 2 --warmup 1 \
    --json "$out/layer_fit.json" 2>&1 | tee "$out/layer_fit.txt"
}

run_bench() {
  "$py" "${layer[@]}" --T 1024 2048 4096 8192 --solvers blocked pallas --json "$out/layer_short.json" 2>&1 \
    | tee "$out/layer_short.txt"
}

run_long() {
  "$py" "${layer[@]}" --T 16384 32768 65536 --solvers pallas --iters 2 --warmup 1 --json "$out/layer_long.json" 2>&1 \
    | tee "$out/layer_long.txt"
}

run_fit() {
  "$py" "${layer[@]}" --B 1 --T 65536 --solvers pallas blocked --iters 2 --warmup 1 --no-transformer \
    --json "$out/layer_fit.json" 2>&1 | tee "$out/layer_fit.txt"
}

run_tune() {
  "$py" benchmarks/pallas_tiling.py --B 8 --T 8192 --D 1024 --dtype bfloat16 --json "$out/tiling.json" 2>&1 \
    | tee "$out/tiling.txt"
}

case "$step" in
  solve) run_solve ;;
  layer) run_layer ;;
  tests) run_tests ;;
  bench) run_bench ;;
  long) run_long ;;
  fit) run_fit ;;
  tune) run_tune ;;
  all) run_tests; run_bench; run_long; run_fit; run_tune ;;
  *) echo "unknown step '$step': choose solve, layer, tests, bench, long, fit, tune or all" >&2; exit 2 ;;
esac
