#!/usr/bin/env bash
# The accelerator measurements of the feedback solve, in steps that each fit a 10-minute slot.
# Run from the repository root on a GPU (or TPU) machine whose python already has jax with the
# accelerator plugin, flax and chex (no install: the package is used from the checkout):
#
#   bash scripts/accelerator_check.sh STEP [OUTDIR]
#   DRY_RUN=1 bash scripts/accelerator_check.sh STEP   # print the commands; the paths step runs the
#                                                       # solve-paths benchmark at toy size on CPU
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
#          (tests/ops/test_gpu_epilogue_kernels.py, feedback_solve with kernels="gpu_gemm" vs "xla";
#          tests/ops/test_accumulate_kernel.py, the in-place accumulating product, its operands
#          in parts, and the add-and-cast product vs XLA; tests/ops/test_leaf_kernel.py, the
#          leaf steps and the residual vs XLA's; the triangles the kernels skip, with NaN where
#          they must not read; the solve's unfilled buffers (uninitialized on the device) read
#          only where written),
#          the solve's forward + backward with kernels "xla" vs "gpu_gemm" (segment ids None
#          and one segment), and the layer with them at B=8, T=8192
#   tests  device info; the recursive solve's tests (tests/ops/test_recursive.py, without the
#          pure-Python schedule cases) and the attention-backend tests, compiled on the device
#   solve  the solve alone (recursive) next to causal attention (cuDNN / splash) at B=8,
#          T=8192, D=1024, bf16; and the solve at the bfloat16 tier with the bf16x3 tier's
#          accuracy as this device compiles it (python -m benchmarks.solve_vs_attention --accuracy)
#   paths  the solve's forward + backward at B=8, T=8192, D=1024, bf16: segment ids None vs one
#          segment (the masked path), and the loop schedule vs the static one
#          (python -m benchmarks.solve_paths)
#   layer  the whole layer (recursive) next to the Transformer layer at B=8, T=4096 and 8192,
#          D=1024, H=8, bf16, at leaf_size "auto" (the default: 1024 on a GPU from T=4096) and
#          at T=8192 with leaf 512; and B=1, T=65536 (leaf auto and leaf 512)
#   quick  what fits one short slot (about 8 minutes on an H100): device info, the solve at the
#          bfloat16 tier with the bf16x3 tier's accuracy on the device, the whole layer vs the Transformer
#          layer at B=8, T=8192, D=1024, H=8, bf16
#   compile  no device needed: the deviceless H100 compile report (benchmarks.gpu_compile,
#          with the CUDA plugin; XLA, then the solve and layer with kernels="gpu_gemm") and the
#          v5e compile (benchmarks.tpu_compile, with libtpu)
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
layer=(-m benchmarks.layer --B 8 --D 1024 --H 8 --dtype bfloat16)
tiers=(-m benchmarks.solve_vs_attention --B 8 --T 8192 --D 1024 --tiers bfloat16 --accuracy)

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

# The solve's forward + backward per path (benchmarks/solve_paths.py): segment ids None vs one
# segment, the loop schedule vs the static one, each timed and compared with the first path;
# then the kernel sets in KERNELS other than "xla" (e.g. KERNELS="xla gpu_gemm"), unpacked (and
# packed with KERNEL_SEGMENTS=1).
run_paths() {
  if [ -n "$dry" ] && [ "$step" = paths ]; then  # the benchmark itself, at toy size on CPU (XLA only: the kernels need leaves of 128)
    echo "+ KERNELS=${KERNELS:-xla}: at toy size only xla"
    "$py" -m benchmarks.solve_paths --B 1 --T 256 --D 32 --leaf 32 2>&1 | tee "$out/paths.txt"
    return
  fi
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  local extra=()
  if [ "${KERNEL_SEGMENTS:-}" = 1 ]; then extra=(--kernel-segments); fi
  run "${PATHS_LIMIT:-150}" paths.txt "$py" -m benchmarks.solve_paths --B 8 --T 8192 --D 1024 --leaf 512 \
    --kernels ${KERNELS:-xla} "${extra[@]}" --json "$out/paths.json"
}

# The opt-in GEMM-with-epilogue kernels against XLA on the device (GPU only).
run_kernels() {
  device_info
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  run 150 kernels_pytest.txt "$py" -m pytest -q -p no:cacheprovider tests/ops/test_gpu_epilogue_kernels.py \
    tests/ops/test_accumulate_kernel.py tests/ops/test_leaf_kernel.py \
    -k "feedback_solve or leaf_loops or in_place or parts or add_product or leaf_solve_matches or residual or never_read or unwritten or lower_triangular or diagonal_panel or overwrite or s_parts or partial_sums or float32_lambda"
  KERNELS="xla gpu_gemm" KERNEL_SEGMENTS=1 PATHS_LIMIT=240 run_paths
  run 190 kernels_layer.txt "$py" "${layer[@]}" --T 8192 --solvers recursive --kernels gpu_gemm --no-transformer \
    --iters 5 --warmup 2 --json "$out/kernels_layer.json"
}

run_quick() {
  device_info
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  run 200 solve_tiers.txt "$py" "${tiers[@]}"
  run 250 quick_layer.txt "$py" "${layer[@]}" --T 8192 --solvers recursive --iters 5 --warmup 2 \
    --json "$out/quick_layer.json"
}

run_tests() {
  device_info
  run 280 pytest.txt "$py" -m pytest -x -q -p no:cacheprovider tests/ops/test_recursive.py \
    tests/ops/test_attention_backends.py -k "not schedule"
}

run_solve() {
  # Each cell is its own process: without this the parent and the cell both preallocate 75%.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for cell in "feedback recursive" "attention auto"; do
    set -- $cell
    run 200 solve.txt "$py" -m benchmarks.feedback_solve --ops "$1" --methods "${@:2}" --B 8 --D 1024 --H 8 \
      --dtype bfloat16 --T 8192 --reps 5 --reps-large 5
  done
  run 200 solve_tiers.txt "$py" "${tiers[@]}"
}

run_layer() {
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  run 250 layer.txt "$py" "${layer[@]}" --T 4096 8192 --solvers recursive --iters 5 --warmup 2 \
    --json "$out/layer.json"
  run 250 layer_fit.txt "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --iters 2 --warmup 1 \
    --json "$out/layer_fit.json"
  # leaf 512 next to the default (1024 on a GPU at these lengths, ops.dispatch.recursive_leaf):
  # the rule rests on the deviceless H100 compile (fewer launches for more leaf FLOPs)
  run 200 layer_leaf512.txt "$py" "${layer[@]}" --T 8192 --solvers recursive --leaf 512 \
    --no-transformer --iters 5 --warmup 2 --json "$out/layer_leaf512.json"
  run 200 layer_fit_leaf512.txt "$py" "${layer[@]}" --B 1 --T 65536 --solvers recursive --leaf 512 \
    --no-transformer --iters 2 --warmup 1 --json "$out/layer_fit_leaf512.json"
}

run_report() {
  device_info
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  # the solve's bf16 accuracy tests and its fast paths against the general ones, on the device
  run 140 report_pytest.txt "$py" -m pytest -q -p no:cacheprovider tests/ops/test_recursive_fast_paths.py \
    tests/ops/test_recursive_bf16_accuracy.py -k "not cover"
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
  run 590 gpu_compile.txt "$py" -m benchmarks.gpu_compile
  run 590 gpu_compile_gemm.txt "$py" -m benchmarks.gpu_compile --kernels gpu_gemm --programs solve-fwd solve-f+b \
    sessa-layer-f+b
  run 590 tpu_compile.txt "$py" -m benchmarks.tpu_compile --shapes 8,8192,1024 --kernels xla
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
