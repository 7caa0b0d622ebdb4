#!/usr/bin/env bash
# The accelerator measurements of the feedback solve (issue 10), in steps that each fit a
# 10-minute slot. Run from the repository root on a GPU (or TPU) machine whose python already
# has jax with the accelerator plugin, flax and chex (no install: the package is used from
# the checkout):
#
#   bash scripts/accelerator_check.sh STEP [OUTDIR]
#
# STEP:
#   tests  device info; the recursive solve's tests (tests/test_recursive_solve.py, without the
#          pure-Python schedule cases) and the attention-backend tests, compiled on the device
#   solve  the solve alone (recursive) next to causal attention (cuDNN / splash) at B=8,
#          T=8192, D=1024, bf16; on a GPU also the bf16x3 split vs XLA's preset (accuracy, time)
#   layer  the whole layer (recursive) next to the Transformer layer at B=8, T=4096 and 8192,
#          D=1024, H=8, bf16; and B=1, T=65536 (leaf 512, the default, and leaf 1024)
#   quick  what fits one short slot (about 8 minutes on an H100): device info, the bf16x3 split vs
#          XLA's preset (accuracy, solve time), and the whole layer vs the Transformer layer at
#          B=8, T=8192, D=1024, H=8, bf16 (the yardstick)
#   all    tests, solve and layer, in order
# OUTDIR (default runs/accelerator_check) receives device.txt, the pytest log and each
# benchmark's printed table (.txt) and results (.json).
set -u -o pipefail

step=${1:?usage: bash scripts/accelerator_check.sh quick|tests|solve|layer|all [OUTDIR]}
out=${2:-runs/accelerator_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
layer=(benchmarks/layer.py --B 8 --D 1024 --H 8 --dtype bfloat16)

device_info() {
  { date -u; nvidia-smi 2>/dev/null; "$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"; } 2>&1 | tee "$out/device.txt"
}

run_quick() {
  device_info
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  timeout 200 "$py" scripts/gpu_bf16x3_split_check.py 2>&1 | tee "$out/bf16x3_split.txt"
  timeout 250 "$py" "${layer[@]}" --T 8192 --solvers recursive --iters 5 --warmup 2 \
    --json "$out/quick_layer.json" 2>&1 | tee "$out/quick_layer.txt"
}

run_tests() {
  device_info
  timeout 280 "$py" -m pytest -x -q -p no:cacheprovider tests/test_recursive_solve.py tests/test_pallas_attention.py \
    -k "not schedule" 2>&1 | tail -n 30 | tee "$out/pytest.txt"
}

run_solve() {
  # Each cell is its own process: without this the parent and the cell both preallocate 75%.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for cell in "feedback recursive" "attention auto"; do
    set -- $cell
    timeout 200 "$py" benchmarks/feedback_solve.py --ops "$1" --methods "${@:2}" --B 8 --D 1024 --H 8 \
      --dtype bfloat16 --T 8192 --reps 5 --reps-large 5 2>&1 | tee -a "$out/solve.txt"
  done
  if command -v nvidia-smi >/dev/null; then
    timeout 200 "$py" scripts/gpu_bf16x3_split_check.py 2>&1 | tee "$out/bf16x3_split.txt"
  fi
}

run_layer() {
  timeout 250 "$py" "${layer[@]}" --T 4096 8192 --solvers recursive --iters 5 --warmup 2 \
    --json "$out/layer.json" 2>&1 | tee "$out/layer.txt"
  timeout 250 "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --iters 2 --warmup 1 \
    --json "$out/layer_fit.json" 2>&1 | tee "$out/layer_fit.txt"
  # leaf 1024 at this length: ~30% fewer kernel launches in the H100 compile (benchmarks/gpu_compile.py)
  timeout 200 "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --leaf 1024 --no-transformer --iters 2 \
    --warmup 1 --json "$out/layer_fit_leaf1024.json" 2>&1 | tee "$out/layer_fit_leaf1024.txt"
}

case "$step" in
  tests) run_tests ;;
  solve) run_solve ;;
  layer) run_layer ;;
  quick) run_quick ;;
  all) run_tests; run_solve; run_layer ;;
  *) echo "unknown step '$step': choose quick, tests, solve, layer or all" >&2; exit 2 ;;
esac
