"""Exported aten graph -> Kiln IR, through a registry of converters keyed by aten overload."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from ir import ops
from ir.builder import GraphBuilder
from ir.reference import DTYPE_NAMES
from ir.types import TensorType

aten = torch.ops.aten
CONVERTERS: dict[object, Callable] = {}
IDENTITY = {
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.dropout.default,
    aten.lift_fresh_copy.default,
}
IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int}


class UnsupportedOpError(ValueError):
    pass


def converter(*targets) -> Callable:
    def register(fn: Callable) -> Callable:
        for t in targets:
            if t in CONVERTERS:
                raise ValueError(f"converter for {t} registered twice")
            CONVERTERS[t] = fn
        return fn

    return register


@dataclass
class Converter:
    """State of one conversion: fx node -> IR value name (a tuple of names for an op that
    returns a list of tensors, e.g. chunk), symbol -> "T"/"B", and the params it created."""

    builder: GraphBuilder
    symbols: dict[str, str]
    env: dict[fx.Node, str | tuple[str, ...]] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    def constant(self, hint: str, tensor: torch.Tensor) -> str:
        """A param the model does not hold (a weightless LayerNorm's ones)."""
        name = self.builder.fresh(hint)
        self.constants[name] = tensor
        return self.builder.input(name, self.tensor_type(tensor), kind="param")

    def value(self, x) -> str:
        return self.env[x]

    def dim(self, d) -> int | str:
        if isinstance(d, int):
            return d
        if isinstance(d, fx.Node):
            d = d.meta["val"]
        expr = str(d.node.expr) if isinstance(d, torch.SymInt) else str(d)
        if expr not in self.symbols:
            raise UnsupportedOpError(f"symbolic dimension {expr} is not a token or batch count")
        return self.symbols[expr]

    def type_of(self, node: fx.Node) -> TensorType:
        return self.tensor_type(node.meta["val"])

    def tensor_type(self, val: torch.Tensor) -> TensorType:
        return TensorType(tuple(self.dim(d) for d in val.shape), DTYPE_NAMES[val.dtype])

    def add(self, op, *inputs: str | None) -> str:
        return self.builder.add1(op, *inputs)


def convert_node(cx: Converter, node: fx.Node) -> None:
    target = node.target
    if target in IGNORED:
        return
    if target in IDENTITY:
        cx.env[node] = cx.value(node.args[0])
        return
    fn = CONVERTERS.get(target)
    if fn is None:
        raise UnsupportedOpError(f"no converter for {target}")
    result = fn(cx, node, *node.args, **node.kwargs)
    _check_types(cx, node, result)
    cx.env[node] = result


def _check_types(cx: Converter, node: fx.Node, result: str | tuple[str, ...]) -> None:
    """The converted values have the types the trace recorded (each one of a list result)."""
    names, vals = (
        (result, node.meta["val"])
        if isinstance(result, tuple)
        else ((result,), (node.meta["val"],))
    )
    if len(names) != len(vals):
        raise UnsupportedOpError(
            f"{node.target}: converted to {len(names)} values, trace says {len(vals)}"
        )
    for name, val in zip(names, vals, strict=True):
        declared = cx.tensor_type(val)
        if cx.builder.types[name] != declared:
            raise UnsupportedOpError(
                f"{node.target}: converted to {cx.builder.types[name]}, trace says {declared}"
            )


@converter(aten.embedding.default)
def _embedding(cx, node, weight, ids, *unused):
    return cx.add(ops.Embedding(), cx.value(weight), cx.value(ids))


@converter(aten.linear.default)
def _linear(cx, node, x, w, b=None):
    return cx.add(ops.Linear(), cx.value(x), cx.value(w), cx.value(b) if b is not None else None)


def _scalar(v) -> int | float:
    """A Python scalar as the IR keeps it: an int stays one (`ids + 1` is int64 arithmetic)."""
    return v if isinstance(v, int) and not isinstance(v, bool) else float(v)


def _binary(fn: str) -> Callable:
    def convert(cx, node, a, b, alpha=1):
        if alpha != 1:
            raise UnsupportedOpError(f"{node.target} with alpha={alpha}")
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return cx.add(ops.Binary(fn), cx.value(a), cx.value(b))
        if isinstance(a, fx.Node):
            return cx.add(ops.BinaryScalar(fn, _scalar(b)), cx.value(a))
        return cx.add(ops.BinaryScalar(fn, _scalar(a), scalar_first=True), cx.value(b))

    return convert


for _fn, _targets in {
    "add": (aten.add.Tensor, aten.add.Scalar),
    "sub": (aten.sub.Tensor, aten.sub.Scalar),
    "mul": (aten.mul.Tensor, aten.mul.Scalar),
    "div": (aten.div.Tensor, aten.div.Scalar),
    "pow": (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar),
}.items():
    converter(*_targets)(_binary(_fn))


@converter(aten.rsub.Scalar)
def _rsub(cx, node, x, scalar, alpha=1):
    """scalar - alpha * x (the scalar comes second in the call, first in the difference)."""
    if alpha != 1:
        raise UnsupportedOpError(f"{node.target} with alpha={alpha}")
    return cx.add(ops.BinaryScalar("sub", _scalar(scalar), scalar_first=True), cx.value(x))


@converter(aten.reciprocal.default)
def _reciprocal(cx, node, x):
    return cx.add(ops.BinaryScalar("div", 1.0, scalar_first=True), cx.value(x))


def _unary(fn: str) -> Callable:
    return lambda cx, node, x: cx.add(ops.Unary(fn), cx.value(x))


for _fn in ("neg", "rsqrt", "sqrt", "silu", "cos", "sin", "exp", "tanh"):
    converter(getattr(aten, _fn).default)(_unary(_fn))


@converter(aten.gelu.default)
def _gelu(cx, node, x, approximate="none"):
    return cx.add(ops.Unary("gelu_tanh" if approximate == "tanh" else "gelu"), cx.value(x))


@converter(aten.layer_norm.default)
def _layer_norm(cx, node, x, shape, weight=None, bias=None, eps=1e-5, *unused):
    if len(shape) != 1:
        raise UnsupportedOpError(f"layer_norm over {len(shape)} dimensions (only the last)")
    if weight is None:  # OLMo's: no affine parameters, a weight of ones
        ones = torch.ones(shape[0], dtype=x.meta["val"].dtype)
        weight = cx.constant("layer_norm_ones", ones)
    else:
        weight = cx.value(weight)
    bias = cx.value(bias) if bias is not None else None
    return cx.add(ops.LayerNorm(float(eps)), cx.value(x), weight, bias)


@converter(aten.rms_norm.default)
def _rms_norm(cx, node, x, shape, weight=None, eps=None):
    """torch.nn.RMSNorm / F.rms_norm: normalized and scaled in float32, rounded once to x's
    dtype (torch's; kiln's RMSNorm rounds before the weight, so it runs on float32 here);
    eps None is torch's: the machine epsilon of the dtype it computes in (float32 for half
    types)."""
    if len(shape) != 1:
        raise UnsupportedOpError(f"rms_norm over {len(shape)} dimensions (only the last)")
    dtype = x.meta["val"].dtype
    if weight is None:
        weight = cx.constant("rms_norm_ones", torch.ones(shape[0]))
    else:
        weight = cx.add(ops.Cast("float32"), cx.value(weight))
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps if eps is None else float(eps)
    y = cx.add(ops.RMSNorm(eps), cx.add(ops.Cast("float32"), cx.value(x)), weight)
    return cx.add(ops.Cast(DTYPE_NAMES[dtype]), y)


@converter(
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.full.default,
    aten.zeros.default,
    aten.ones.default,
)
def _factory(cx, node, *args, **kwargs):
    """A tensor made in `forward` (torch.arange for rope's frequencies, say) of a size known
    when tracing: a constant of the graph. One whose size is the token count is refused."""
    val = node.meta["val"]
    if any(isinstance(d, torch.SymInt) for d in val.shape):
        raise UnsupportedOpError(
            f"{node.target} over the token count: take it from `positions` (or make it the "
            "size of the whole context, a constant)"
        )
    kwargs = {k: v for k, v in kwargs.items() if k in ("dtype",)}
    made = node.target(*args, **kwargs, device="cpu")  # the values; a trace holds only fakes
    return cx.constant(node.target.__name__.split(".")[0], made)


@converter(
    aten.to.dtype,
    aten.to.device,
    aten._to_copy.default,
    aten.to.dtype_layout,
    aten.type_as.default,
)
def _to(cx, node, x, *args, **kwargs):
    """A cast to the traced result's dtype (type_as: to `other`'s, which the trace recorded)."""
    src, dst = node.args[0].meta["val"].dtype, node.meta["val"].dtype
    if src == dst:
        return cx.value(x)
    return cx.add(ops.Cast(DTYPE_NAMES[dst]), cx.value(x))


@converter(aten.mean.dim)
def _mean(cx, node, x, dims, keepdim=False, dtype=None):
    return cx.add(ops.Mean(tuple(dims), bool(keepdim)), cx.value(x))


@converter(aten.sum.dim_IntList, aten.sum.default)
def _sum(cx, node, x, dims=None, keepdim=False, dtype=None):
    """x.sum(dims) (every dimension when none is given); `dtype` casts x first, as torch's."""
    rank = x.meta["val"].dim()
    dims = tuple(range(rank)) if not dims else tuple(dims)  # sum(x, []) is every dimension too
    value = cx.value(x)
    if dtype is not None and dtype != x.meta["val"].dtype:
        value = cx.add(ops.Cast(DTYPE_NAMES[dtype]), value)
    return cx.add(ops.Sum(dims, bool(keepdim)), value)


@converter(
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.flatten.using_ints,
)
def _reshape(cx, node, x, *args):
    return cx.add(ops.Reshape(cx.type_of(node).shape), cx.value(x))


@converter(aten.select.int)
def _select(cx, node, x, dim, index):
    if x.meta["val"].shape[dim] != 1:
        raise UnsupportedOpError("select on a dimension of size > 1")
    return cx.add(ops.Reshape(cx.type_of(node).shape), cx.value(x))


def _pieces(cx, x, sizes: list[int], dim: int) -> tuple[str, ...]:
    """Consecutive slices of `sizes` along `dim`: what chunk and split return."""
    bounds = itertools.pairwise([0, *itertools.accumulate(sizes)])
    return tuple(cx.add(ops.Slice(dim, s, e), cx.value(x)) for s, e in bounds)


def _static_size(x, dim: int) -> int:
    size = x.meta["val"].shape[dim]
    if not isinstance(size, int):
        raise UnsupportedOpError(f"splitting the symbolic dimension {dim}")
    return size


@converter(aten.chunk.default)
def _chunk(cx, node, x, chunks, dim=0):
    size = _static_size(x, dim)
    step = -(-size // chunks)  # torch's chunk: equal pieces of ceil(size / chunks), last shorter
    return _pieces(cx, x, [min(step, size - s) for s in range(0, size, step)], dim)


@converter(aten.split.Tensor)
def _split(cx, node, x, split_size, dim=0):
    size = _static_size(x, dim)
    return _pieces(cx, x, [min(split_size, size - s) for s in range(0, size, split_size)], dim)


@converter(aten.split_with_sizes.default)
def _split_with_sizes(cx, node, x, sizes, dim=0):
    return _pieces(cx, x, list(sizes), dim)


@converter(operator.getitem)
def _getitem(cx, node, pieces, index):
    names = cx.env[pieces]
    if not isinstance(names, tuple):
        raise UnsupportedOpError(f"indexing the single output of {pieces.target}")
    return names[index]


@converter(aten.transpose.int)
def _transpose(cx, node, x, dim0, dim1):
    return cx.add(ops.Transpose(dim0, dim1), cx.value(x))


@converter(aten.slice.Tensor)
def _slice(cx, node, x, dim=0, start=None, end=None, step=1):
    size = x.meta["val"].shape[dim]
    end = size if end is None else min(end, size)
    return cx.add(ops.Slice(dim, start or 0, end, step), cx.value(x))


@converter(aten.cat.default)
def _cat(cx, node, xs, dim=0):
    return cx.add(ops.Concat(dim), *(cx.value(x) for x in xs))


@converter(aten.stack.default)
def _stack(cx, node, xs, dim=0):
    """Each input viewed with a new unit dim at `dim`, then concatenated along it."""
    shape = cx.type_of(node).shape
    d = dim % len(shape)
    unit = (*shape[:d], 1, *shape[d + 1 :])
    return cx.add(ops.Concat(d), *(cx.add(ops.Reshape(unit), cx.value(x)) for x in xs))


@converter(aten.t.default)
def _t(cx, node, x):
    rank = len(x.meta["val"].shape)
    return cx.add(ops.Transpose(0, 1), cx.value(x)) if rank == 2 else cx.value(x)


@converter(aten.index.Tensor)
def _index(cx, node, x, indices):
    given = [i for i, t in enumerate(indices) if t is not None]
    if len(given) != 1:
        raise UnsupportedOpError("advanced indexing with more than one index tensor")
    return cx.add(ops.GatherLastTokens(given[0]), cx.value(x), cx.value(indices[given[0]]))


@converter(torch.ops.kiln.attention.default)
def _attention(cx, node, q, k, v, layer, scale, sliding_window, softcap):
    _, heads, _, head_dim = q.meta["val"].shape
    op = ops.PagedAttention(
        layer=layer,
        num_heads=int(heads),
        num_kv_heads=int(k.meta["val"].shape[1]),
        head_dim=int(head_dim),
        scale=float(scale),
        sliding_window=sliding_window if sliding_window > 0 else None,
        softcap=softcap if softcap > 0 else None,
    )
    return cx.add(op, cx.value(q), cx.value(k), cx.value(v))


@converter(aten.expand.default)
def _expand(cx, node, x, shape, *unused):
    # rotary tables expand a batch dimension that is 1 in the flat-batch convention
    if tuple(x.meta["val"].shape) != tuple(node.meta["val"].shape):
        raise UnsupportedOpError(f"expand {tuple(x.meta['val'].shape)} -> {shape} broadcasts")
    return cx.value(x)


@converter(aten.matmul.default)
def _matmul(cx, node, a, b):
    # rotary tables as an outer product inv_freq[..., :, None] @ positions[..., None, :]
    if a.meta["val"].shape[-1] != 1 or b.meta["val"].shape[-2] != 1:
        raise UnsupportedOpError("matmul other than an outer product (use nn.Linear)")
    return cx.add(ops.Binary("mul"), cx.value(a), cx.value(b))
