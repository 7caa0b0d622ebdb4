"""Device meshes, logical axis rules and sharded train state (MaxText/lm1b style).

Modules name the axes of every parameter (``nn.with_logical_partitioning``) and of the
main activations (``nn.with_logical_constraint``) with *logical* names; ``RULES`` maps
them onto the physical mesh axes ``MESH_AXES = ('data', 'fsdp', 'tensor')``:

    params       embed (D) -> fsdp, mlp (the 2D of W_in/proj_fb, Mamba's E) -> tensor,
                 heads / kv_heads (H*K, Hkv*K) -> tensor, vocab (V) -> tensor
    activations  batch -> (data, fsdp), length -> -, act_embed (residual D) -> -,
                 act_mlp (gated-branch / feedback-solve width D) -> tensor,
                 act_heads -> tensor, act_vocab -> tensor

The activation names are the defaults of ``ActivationAxes``; a model with its own rules
passes ``SessaLayer(cfg, axes=ActivationAxes(batch="activation_batch", ...))`` (or
``MAXTEXT_AXES``) so the layer speaks its vocabulary. The parameter names are fixed;
``param_logical_specs`` returns them for any model containing these modules.

Tensor parallelism is Megatron-style: W_in, q/k/v and proj_fb are column-parallel,
out_proj and W_out row-parallel, so the forward heads and the width of the feedback
branch (a_bar, f, q_b, k_b, s; the solve is independent per width column once A is
known) are split over 'tensor', as is the vocabulary of the head. With no mesh and
rules active (``activate``) every constraint is a no-op, so one-device code is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class ActivationAxes:
    """Logical axis names a ``SessaLayer`` / ``SessaLM`` gives its activations.

    Each field is a logical name (looked up in the active ``nn.logical_axis_rules``) or
    None (that dimension unsharded):

        batch, length    B and T of every activation
        embed            D of the residual stream x, y (B, T, D)
        mlp              D of the gated branch and the feedback solve: a, g, a_bar, f,
                         q_b, k_b, s (B, T, D); the Megatron column/row-parallel width
        heads, kv_heads  H of q and the attention output (B, T, H, K), Hkv of k, v
        head_dim         K of q, k, v
        vocab            V of the logits (B, T, V)

    The defaults are the names of ``RULES``. ``MAXTEXT_AXES`` holds MaxText's names
    (``activation_batch``, ``activation_length``, ...). Frozen and hashable, so it can be
    a Flax module attribute of a model passed to ``jax.jit`` as a static argument.
    """

    batch: str | None = "batch"
    length: str | None = "length"
    embed: str | None = "act_embed"
    mlp: str | None = "act_mlp"
    heads: str | None = "act_heads"
    kv_heads: str | None = "act_heads"
    head_dim: str | None = None
    vocab: str | None = "act_vocab"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"ActivationAxes.{field.name} must be a logical axis name (str) or None; got {value!r}")

    @property
    def btd(self) -> tuple:
        """Residual stream (B, T, D)."""
        return (self.batch, self.length, self.embed)

    @property
    def btw(self) -> tuple:
        """Gated branch and feedback-solve width (B, T, D)."""
        return (self.batch, self.length, self.mlp)

    @property
    def bthk(self) -> tuple:
        """Queries and attention output (B, T, H, K)."""
        return (self.batch, self.length, self.heads, self.head_dim)

    @property
    def btkv(self) -> tuple:
        """Keys and values (B, T, Hkv, K)."""
        return (self.batch, self.length, self.kv_heads, self.head_dim)

    @property
    def btv(self) -> tuple:
        """Logits (B, T, V)."""
        return (self.batch, self.length, self.vocab)


DEFAULT_AXES = ActivationAxes()
MAXTEXT_AXES = ActivationAxes(
    batch="activation_batch",
    length="activation_length",
    embed="activation_embed",
    mlp="activation_mlp",
    heads="activation_heads",
    kv_heads="activation_kv_heads",
    head_dim="activation_kv",
    vocab="activation_vocab",
)

# The default names of the main activations (kept for code that imports them).
BTD = DEFAULT_AXES.btd  # residual stream x, y
BTW = DEFAULT_AXES.btw  # a, g, a_bar, f, q_b, k_b, s: split over 'tensor'
BTHK = DEFAULT_AXES.bthk  # q, k, v, attention output
BTV = DEFAULT_AXES.btv  # logits


_BOXED = contextvars.ContextVar("sessa_logical_boxes", default=False)


def logical(init, names):
    """``nn.with_logical_partitioning(init, names)`` while ``logical_boxes()`` is active.

    Outside it the plain initialiser runs, so ``model.init`` returns plain arrays (what
    tests, conversion and tree arithmetic expect). Either way the same RNG is consumed
    and the same values come out; only the ``nn.LogicallyPartitioned`` box differs.
    """
    boxed = nn.with_logical_partitioning(init, names)

    def wrapper(*args, **kwargs):
        return (boxed if _BOXED.get() else init)(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def logical_boxes():
    """Within it, parameter initialisers return ``nn.LogicallyPartitioned`` boxes."""
    token = _BOXED.set(True)
    try:
        yield
    finally:
        _BOXED.reset(token)


class MeshError(ValueError):
    """A mesh that does not fit the devices, the batch or the model; names the values."""


def dense_init(in_name, out_name, kernel_init=None, bias_init=None) -> dict:
    """``kernel_init``/``bias_init`` kwargs of ``nn.Dense`` with logical axis names.

    Same initialisers (and RNG use) as ``nn.Dense``'s defaults unless given, so wrapping
    changes no numbers; the bias takes the kernel's output name.
    """
    kernel_init = kernel_init or nn.linear.default_kernel_init
    bias_init = bias_init or nn.initializers.zeros_init()
    return dict(kernel_init=logical(kernel_init, (in_name, out_name)), bias_init=logical(bias_init, (out_name,)))


def norm_init() -> dict:
    """``scale_init``/``bias_init`` kwargs of ``nn.LayerNorm`` (replicated, 'norm')."""
    return dict(
        scale_init=logical(nn.initializers.ones_init(), ("norm",)),
        bias_init=logical(nn.initializers.zeros_init(), ("norm",)),
    )


def constrain(x, names):
    """Shards ``x`` as its logical axis ``names`` say under the active rules and mesh.

    A no-op without logical axis rules (``activate`` or ``nn.logical_axis_rules``) or
    without a mesh (``jax.set_mesh``). A name that no rule mentions leaves its dimension
    as it is: the layer never forces replication because a model's rules use other names.
    On a mesh whose axes are all ``Explicit`` (jax's default for ``jax.make_mesh``) the
    sharding is part of the type, so this reshards (``jax.sharding.reshard``, as MaxText's
    explicit mode does); otherwise it is ``jax.lax.with_sharding_constraint``.
    """
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    known = {name for name, _ in rules}
    spec = list(nn.logical_to_mesh_axes(names, rules))
    free = [isinstance(n, str) and n not in known for n in names]
    if _all_explicit(mesh):
        # Keep the current sharding of the free dimensions unless a constrained one now uses its mesh axes.
        current = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
        used = set(jax.tree_util.tree_leaves([s for s, f in zip(spec, free) if not f]))
        for d, f in enumerate(free):
            if f:
                spec[d] = None if used & set(jax.tree_util.tree_leaves(current[d])) else current[d]
        return jax.sharding.reshard(x, P(*spec))
    spec = [P.UNCONSTRAINED if f else s for s, f in zip(spec, free)]
    return jax.lax.with_sharding_constraint(x, P(*spec))


def _all_explicit(mesh) -> bool:
    return not mesh.empty and all(t == AxisType.Explicit for t in mesh.axis_types)


def explicit_mesh():
    """The ambient mesh when all its axes are ``Explicit`` (sharding in the types), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh if _all_explicit(mesh) else None


def sharding_agnostic(fn, out_like):
    """``fn`` as it runs on the ambient mesh, for ops written for XLA's sharding propagation.

    On a mesh whose axes are all ``Explicit`` the call runs with the axes ``Auto``
    (``jax.sharding.auto_axes``) and its result (an array like ``out_like``) comes back
    sharded as ``out_like`` is; elsewhere ``fn`` itself. The solve and attention kernels
    contract over widths that a tensor axis may split, which an explicit mesh would
    otherwise refuse as ambiguous.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not _all_explicit(mesh):
        return fn
    return jax.sharding.auto_axes(fn, out_sharding=jax.typeof(out_like).sharding)


def check_explicit_params(variables, where: str) -> None:
    """Refuses parameters split over the axes of an ``Explicit`` mesh, naming the first.

    On such a mesh the sharding is part of each array's type and ``nn.Dense`` has no way to
    say how a split weight's product is laid out; activations split over the batch are
    fine. Nothing is checked on other meshes or without one.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not _all_explicit(mesh):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]:
        spec = getattr(getattr(jax.typeof(leaf), "sharding", None), "spec", None) or ()
        if any(e is not None for e in spec):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise ValueError(
                f"{where}: parameter {name!r} is split as {P(*spec)} over a mesh whose axes are all Explicit; "
                f"on such a mesh only the batch may be split (replicate the parameters). For FSDP or "
                f"tensor parallelism use a mesh with Auto axes, e.g. jax.make_mesh(shape, names, "
                f"axis_types=(jax.sharding.AxisType.Auto,) * len(names)) or sessa_jax.sharding.make_mesh"
            )


def param_logical_specs(module: nn.Module, *init_args, **init_kwargs):
    """Logical ``PartitionSpec`` of every parameter of ``module.init(*init_args, **init_kwargs)``.

    Shapes only (``jax.eval_shape``; nothing is allocated). The tree has the structure of
    the variables ``init`` returns; SessaLayer/SessaLM parameters carry the names
    ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``, ``norm`` (and ``layers`` for the
    stacked axis of ``scan_layers``); parameters a model boxes itself
    (``nn.with_logical_partitioning``) keep their names, unboxed ones get ``P()``. Map it to
    shardings with ``nn.logical_to_mesh_sharding(specs, mesh, rules)`` and initialise with
    ``jax.jit(module.init, out_shardings=...)``.
    """
    # No rules while tracing: only the names are wanted, and Flax would otherwise constrain each new
    # parameter to its sharding (an assertion that fails on an Explicit mesh).
    with logical_boxes(), nn.logical_axis_rules(()):
        abstract = jax.eval_shape(lambda *a: module.init(*a, **init_kwargs), *init_args)
    return nn.get_partition_spec(abstract)


# Mesh --------------------------------------------------------------------------------
def mesh_shape(axes: dict, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one ``-1`` filled by the remaining devices."""
    sizes = [axes.get(name, 1) for name in MESH_AXES]
    desc = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
    if any(isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1) for s in sizes):
        raise MeshError(f"mesh axes must be positive integers or -1; got {desc}")
    if sizes.count(-1) > 1:
        raise MeshError(f"at most one mesh axis may be -1 (fill with the remaining devices); got {desc}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise MeshError(
                f"mesh {desc}: the fixed axes need a multiple of {fixed} devices, but there are {device_count} devices"
            )
        sizes[sizes.index(-1)] = device_count // fixed
    if math.prod(sizes) != device_count:
        raise MeshError(
            f"mesh {desc} has {math.prod(sizes)} devices but there are {device_count} devices; "
            f"make data x fsdp x tensor = {device_count} (or set one axis to -1)"
        )
    return tuple(sizes)


def make_mesh(axes: dict, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; ``axes`` like ``{'data': -1, 'tensor': 2}``.

    ``jax.make_mesh`` orders devices for the physical topology (TPU ICI, GPU NVLink) so
    'tensor' (the last, most communicating axis) stays within a host.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(axes, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def validate_mesh(
    mesh: Mesh,
    model_config,
    global_batch: int,
    grad_accum: int = 1,
    process_count: int | None = None,
    kind: str = "sessa",
) -> None:
    """Raises MeshError, naming the values, for any batch/head/width the mesh cannot split."""
    pc = jax.process_count() if process_count is None else process_count
    dp, fsdp, tp = mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["tensor"]
    split = grad_accum * dp * fsdp
    if global_batch % split:
        raise MeshError(
            f"global batch {global_batch} is not divisible by grad_accum x data x fsdp = "
            f"{grad_accum} x {dp} x {fsdp} = {split}"
        )
    if global_batch % pc:
        raise MeshError(f"global batch {global_batch} is not divisible by the {pc} processes")
    c = model_config
    checks = [
        ("d_model", c.d_model, tp, "tensor"),
        ("vocab_size", c.vocab_size, tp, "tensor"),
        ("d_model", c.d_model, fsdp, "fsdp"),
    ]
    if kind != "mamba":  # attention heads are split over 'tensor'
        checks[:0] = [("n_heads", c.n_heads, tp, "tensor"), ("kv_heads", c.kv_heads, tp, "tensor")]
    for name, value, size, axis in checks:
        if value % size:
            raise MeshError(
                f"model {name}={value} is not divisible by the {axis} axis ({axis}={size}); "
                f"choose {axis} among the divisors of {value}"
            )
    if pc > 1 and tp * fsdp > 1 and jax.local_device_count() % tp:
        raise MeshError(
            f"tensor={tp} must divide the {jax.local_device_count()} devices of each process "
            f"(the tensor axis stays within a host)"
        )


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
    """Makes ``mesh`` the ambient mesh and ``rules`` the logical rules (for tracing)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# Shardings -----------------------------------------------------------------------------
def logical_specs(boxed_tree):
    """Logical PartitionSpecs of a tree with ``nn.LogicallyPartitioned`` leaves (P() otherwise)."""
    return nn.get_partition_spec(boxed_tree)


def shardings_of(boxed_tree, mesh: Mesh, rules=RULES):
    """NamedShardings (plain-array tree structure) of a boxed tree under ``mesh``/``rules``."""
    return nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches (B, T): rows split over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def shard_shapes(tree) -> dict:
    """{path: per-device shard shape} of the arrays of ``tree`` (for tests and reports)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        out[key] = tuple(x.sharding.shard_shape(x.shape))
    return out
