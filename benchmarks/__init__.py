"""Benchmarks of sessa-jax, run from the repository root as ``python -m benchmarks.NAME [flags]``
(``--help`` describes each). They share one harness (``benchmarks.harness``: timing, memory,
table and JSON output, HLO array sizes) and count matrix-product work from jaxprs with
``benchmarks.jaxpr_work``.

On any machine:
  feedback_solve      speed and memory of the feedback solve and causal attention per method and T
  blocked_chunks      the blocked paths' chunk size and schedules (how chunk_size="auto" was set)
  layer               the whole layer per solver next to a Transformer layer, with the matmul peak
  train_throughput    tokens/s of the train step, Sessa vs the Transformer baseline
  vs_reference        the layer next to the published PyTorch layer, same CPU, same run
  mamba_scan          the Mamba baseline's two scans
  parity              worst errors against the published fixtures
  solve_accuracy      the recursive solve's precision tiers against a float64 oracle
  solve_work          the solve's counted work, loop steps, compile time and memory
On a GPU or TPU:
  solve_vs_attention  the feedback solve alone next to causal attention
  solve_tiles         the recursive solve per (tile, leaf)
  solve_paths         the solve with and without segment ids, loop vs static schedule
Without a device (deviceless ahead-of-time compiles):
  gpu_compile         what XLA's GPU compiler makes of the solve for an H100 (CUDA plugin)
  tpu_compile         the solve compiled for a TPU topology (libtpu)
"""
