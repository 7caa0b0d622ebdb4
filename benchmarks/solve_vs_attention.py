"""The feedback solve alone next to causal attention, on the default device (GPU measurements).

    python benchmarks/solve_vs_attention.py bf16x3 bfloat16 float32   # recursive solve per tier
    python benchmarks/solve_vs_attention.py attn                      # cuDNN and XLA attention

B=8, T=8192, D=1024 (attention: H=8 heads of 128), bf16 inputs; prints the mean wall time of
5 calls after a warm-up, forward and forward + backward. The README quotes its H100 output.
"""
import sys, time, traceback, os
import jax, jax.numpy as jnp
from sessa_jax.ops import feedback_solve, causal_attention
B, T, D = 8, 8192, 1024
ks = jax.random.split(jax.random.PRNGKey(0), 5)
q, k, f = (jax.random.normal(ks[i], (B, T, D), jnp.bfloat16) for i in range(3))
g = 0.9 * jnp.tanh(jax.random.normal(ks[3], (B, T)))
def timeit(fn, *a, n=5):
    out = fn(*a); jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n): out = fn(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n
def attempt(name, fn, *a):
    try:
        print(name, "%.2f ms" % (1e3 * timeit(fn, *a)), flush=True)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:3000], flush=True)
which = sys.argv[1:]
for prec in ["float32", "bf16x3", "bfloat16"]:
    if prec not in which: continue
    fwd = jax.jit(lambda q, k, g, f: feedback_solve(q, k, g, f, method="recursive", precision=prec))
    attempt(f"recursive fwd {prec}", fwd, q, k, g, f)
    fb = jax.jit(jax.grad(lambda q, k, g, f: jnp.sum(feedback_solve(q, k, g, f, method="recursive", precision=prec).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
    attempt(f"recursive f+b {prec}", fb, q, k, g, f)
if "attn" in which:
    H = 8
    qa, ka, va = (x.reshape(B, T, H, D // H) for x in (q, k, f))
    for impl in ["cudnn", "xla"]:
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
        attempt(f"attention fwd {impl}", fn, qa, ka, va)
        fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl).astype(jnp.float32)), argnums=(0, 1, 2)))
        attempt(f"attention f+b {impl}", fb, qa, ka, va)
