"""What runs where: the one table from platform ("cpu", "gpu", "tpu") to the paths the ops take
by default. ``ops.dispatch`` (methods), ``ops.solve.precision`` (the "auto" tier) and
``ops.solve.recursive`` (which Pallas kernels "pallas" means) read it; nothing else decides."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class PlatformPaths:
    """Defaults of one platform.

    ``solve``: the solve method "auto" runs. ``attention``: the attention method "auto" runs
    ("vendor": cuDNN / splash where it applies, else blocked). ``float32_tier`` / ``bfloat16_tier``:
    the precision tier "auto" gives the recursive solve for float32 / bfloat16 compute.
    The recursive solve's kernels default to "xla" everywhere; ``pallas``: what the opt-in
    ``kernels="pallas"`` runs: "tpu" (the TPU kernels for the statistics pass and the pushes)
    or "gpu" (the Mosaic GPU statistics kernel; pushes in XLA). ``interpret``: whether those
    kernels run in Pallas interpret mode (the TPU kernels off a TPU, for tests).
    """

    solve: str
    attention: str
    float32_tier: str
    bfloat16_tier: str
    pallas: str
    interpret: bool


PLATFORM_PATHS: dict[str, PlatformPaths] = {
    # Every CPU dot runs at full precision anyway, so the leaner tiers would buy nothing there.
    "cpu": PlatformPaths(
        solve="blocked",
        attention="blocked",
        float32_tier="float32",
        bfloat16_tier="float32",
        pallas="tpu",
        interpret=True,
    ),
    "gpu": PlatformPaths(
        solve="recursive",
        attention="vendor",
        float32_tier="bf16x3",
        bfloat16_tier="bfloat16",
        pallas="gpu",
        interpret=False,
    ),
    "tpu": PlatformPaths(
        solve="recursive",
        attention="vendor",
        float32_tier="bf16x3",
        bfloat16_tier="bfloat16",
        pallas="tpu",
        interpret=False,
    ),
}


def platform_kind(platform: str | None = None) -> str:
    """ "gpu", "tpu" or "cpu" for a JAX platform name (None: the default backend, at trace time)."""
    platform = jax.default_backend() if platform is None else platform
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "cpu"


def platform_paths(platform: str | None = None) -> PlatformPaths:
    """The ``PLATFORM_PATHS`` entry of ``platform`` (a JAX platform name; None: the default backend)."""
    return PLATFORM_PATHS[platform_kind(platform)]
