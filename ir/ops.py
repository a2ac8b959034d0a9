"""IR ops: frozen dataclasses of attributes, each with a shape/dtype rule (`infer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ir.types import FLOAT_DTYPES, TensorType, broadcast, normalize_dim, numel, promote

OPS: dict[str, type] = {}
UNARY_FNS = ("neg", "rsqrt", "sqrt", "silu", "gelu", "gelu_tanh", "cos", "sin", "exp", "tanh")
BINARY_FNS = ("add", "sub", "mul", "div", "pow")


def op(cls: type) -> type:
    """Register an op class under its name (checked for duplicates)."""
    if cls.__name__ in OPS:
        raise ValueError(f"op {cls.__name__} registered twice")
    OPS[cls.__name__] = cls
    return cls


Op = Any  # any class in OPS


@op
@dataclass(frozen=True, slots=True)
class Embedding:
    def infer(self, weight: TensorType, ids: TensorType) -> tuple[TensorType, ...]:
        return (TensorType((*ids.shape, weight.shape[1]), weight.dtype),)


@op
@dataclass(frozen=True, slots=True)
class Linear:
    """y = x @ weight.T (+ bias); weight is [out, in]."""

    def infer(self, x: TensorType, w: TensorType, bias: TensorType | None = None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"Linear: input {x} does not match weight {w}")
        if x.dtype != w.dtype:  # as torch's linear, which would fail on the module itself
            raise ValueError(f"Linear: input {x} and weight {w} differ in dtype")
        if bias is not None and bias.shape != (w.shape[0],):
            raise ValueError(f"Linear: bias {bias} does not match weight {w}")
        return (TensorType((*x.shape[:-1], w.shape[0]), x.dtype),)


QUANT_FORMATS = ("int4", "fp8")


def check_quant(fmt: str, group_size: int, w: TensorType) -> None:
    """Raise unless `fmt` can quantize the [out, in] weight w (see QuantizeWeight)."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r} (supported: {QUANT_FORMATS})")
    if w.rank != 2 or w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fmt}: cannot quantize {w} (a float [out, in] weight)")
    if fmt == "fp8" and group_size != 0:
        raise ValueError(f"fp8 scales each output row (group_size 0), got {group_size}")
    if fmt == "int4" and (group_size <= 0 or group_size % 8 or w.shape[1] % group_size):
        raise ValueError(f"int4: group size {group_size} must be a multiple of 8 dividing {w}")


@op
@dataclass(frozen=True, slots=True)
class QuantizeWeight:
    """A Linear's [out, in] weight w quantized; only ever over parameters (folded at compile
    time into the packed weights). int4: (qweight int32 [out, in / 8], eight 4-bit codes per
    word along `in`, the lowest bits first; scales, zeros [out, in / group_size] in w's dtype),
    w ~ (q - zero) * scale in each group of group_size inputs. fp8: (qweight float8_e4m3fn
    [out, in], scales float32 [out]), w ~ q * scale in each output row."""

    format: str
    group_size: int = 0

    def infer(self, w: TensorType):
        check_quant(self.format, self.group_size, w)
        n, k = w.shape
        if self.format == "fp8":
            return (TensorType((n, k), "float8_e4m3fn"), TensorType((n,), "float32"))
        groups = TensorType((n, k // self.group_size), w.dtype)
        return (TensorType((n, k // 8), "int32"), groups, groups)


@op
@dataclass(frozen=True, slots=True)
class QuantLinear:
    """y = x @ dequantize(weight).T (+ bias), the weight dequantized to x's dtype: a Linear
    over QuantizeWeight's outputs (int4: x, qweight, scales, zeros[, bias]; fp8: x, qweight,
    scales[, bias])."""

    format: str
    group_size: int = 0

    def infer(self, x: TensorType, qweight: TensorType, *rest: TensorType):
        parts = 2 if self.format == "int4" else 1  # scales (and zeros) before the bias
        if self.format not in QUANT_FORMATS or len(rest) not in (parts, parts + 1):
            raise ValueError(f"QuantLinear({self.format}): wrong inputs {(x, qweight, *rest)}")
        n, k = qweight.shape[0], qweight.shape[1] * (8 if self.format == "int4" else 1)
        w = TensorType((n, k), x.dtype)
        check_quant(self.format, self.group_size, w)
        if (qweight, *rest[:parts]) != QuantizeWeight(self.format, self.group_size).infer(w):
            raise ValueError(f"QuantLinear({self.format}): {qweight, *rest} do not quantize {w}")
        if x.shape[-1] != k:
            raise ValueError(f"QuantLinear: input {x} does not match weight {w}")
        if rest[parts:] and rest[parts] != TensorType((n,), x.dtype):
            raise ValueError(f"QuantLinear: bias {rest[parts]} does not match weight {w}")
        return (TensorType((*x.shape[:-1], n), x.dtype),)


@op
@dataclass(frozen=True, slots=True)
class Unary:
    fn: str

    def infer(self, x: TensorType):
        if self.fn not in UNARY_FNS:
            raise ValueError(f"unknown unary function {self.fn!r}")
        return (x,)


@op
@dataclass(frozen=True, slots=True)
class Binary:
    fn: str

    def infer(self, a: TensorType, b: TensorType):
        if self.fn not in BINARY_FNS:
            raise ValueError(f"unknown binary function {self.fn!r}")
        return (TensorType(broadcast(a.shape, b.shape), promote(a.dtype, b.dtype)),)


@op
@dataclass(frozen=True, slots=True)
class BinaryScalar:
    """fn(x, scalar), or fn(scalar, x) when scalar_first."""

    fn: str
    scalar: float
    scalar_first: bool = False

    def infer(self, x: TensorType):
        if self.fn not in BINARY_FNS:
            raise ValueError(f"unknown binary function {self.fn!r}")
        return (x,)


@op
@dataclass(frozen=True, slots=True)
class Cast:
    dtype: str

    def infer(self, x: TensorType):
        return (x.with_dtype(self.dtype),)


@op
@dataclass(frozen=True, slots=True)
class Mean:
    dims: tuple[int, ...]
    keepdim: bool

    def infer(self, x: TensorType):
        return (x.with_shape(_reduced(x, self.dims, self.keepdim)),)


@op
@dataclass(frozen=True, slots=True)
class Sum:
    """As torch.sum: integers and bools sum to int64."""

    dims: tuple[int, ...]
    keepdim: bool

    def infer(self, x: TensorType):
        dtype = x.dtype if x.dtype in FLOAT_DTYPES else "int64"
        return (TensorType(_reduced(x, self.dims, self.keepdim), dtype),)


def _reduced(x: TensorType, dims: tuple[int, ...], keepdim: bool) -> tuple:
    """x's shape reduced over `dims`: each 1 (keepdim) or gone."""
    dims = {normalize_dim(d, x.rank) for d in dims}
    shape = [1 if i in dims else d for i, d in enumerate(x.shape)]
    return tuple(d for i, d in enumerate(shape) if keepdim or i not in dims)


@op
@dataclass(frozen=True, slots=True)
class Reshape:
    """Target shape: ints, symbols, and at most one -1 (inferred)."""

    shape: tuple[int | str, ...]

    def infer(self, x: TensorType):
        known = tuple(d for d in self.shape if d != -1)
        if len(known) == len(self.shape):
            out = self.shape
        elif len(known) == len(self.shape) - 1:
            (xc, xs), (kc, ks) = numel(x.shape), numel(known)
            if xs != ks or kc == 0 or xc % kc:
                raise ValueError(f"Reshape: cannot view {x} as {self.shape}")
            out = tuple(xc // kc if d == -1 else d for d in self.shape)
        else:
            raise ValueError(f"Reshape: more than one -1 in {self.shape}")
        if numel(out) != numel(x.shape):
            raise ValueError(f"Reshape: cannot view {x} as {self.shape}")
        return (x.with_shape(out),)


@op
@dataclass(frozen=True, slots=True)
class Transpose:
    dim0: int
    dim1: int

    def infer(self, x: TensorType):
        a, b = normalize_dim(self.dim0, x.rank), normalize_dim(self.dim1, x.rank)
        shape = list(x.shape)
        shape[a], shape[b] = shape[b], shape[a]
        return (x.with_shape(tuple(shape)),)


@op
@dataclass(frozen=True, slots=True)
class Slice:
    """x[..., start:end:step, ...] along `dim` (end clamped to the size)."""

    dim: int
    start: int
    end: int
    step: int = 1

    def infer(self, x: TensorType):
        d = normalize_dim(self.dim, x.rank)
        size = x.shape[d]
        if not isinstance(size, int):
            raise ValueError(f"Slice: dimension {d} of {x} is symbolic")
        start, end, _ = slice(self.start, self.end, self.step).indices(size)
        shape = list(x.shape)
        shape[d] = max(0, (end - start + self.step - 1) // self.step)
        return (x.with_shape(tuple(shape)),)


@op
@dataclass(frozen=True, slots=True)
class Concat:
    dim: int

    def infer(self, *xs: TensorType):
        d = normalize_dim(self.dim, xs[0].rank)
        sizes = [x.shape[d] for x in xs]
        if not all(isinstance(s, int) for s in sizes):
            raise ValueError("Concat: symbolic concatenation dimension")
        for x in xs:
            if x.rank != xs[0].rank or any(
                a != b for i, (a, b) in enumerate(zip(x.shape, xs[0].shape, strict=True)) if i != d
            ):
                raise ValueError(f"Concat: mismatched shapes {[str(x) for x in xs]}")
        shape = list(xs[0].shape)
        shape[d] = sum(sizes)
        dtype = xs[0].dtype
        for x in xs[1:]:
            dtype = promote(dtype, x.dtype)
        return (TensorType(tuple(shape), dtype),)


@op
@dataclass(frozen=True, slots=True)
class GatherLastTokens:
    """Rows of x at `indices` along `dim` (the logits of each sequence's last token)."""

    dim: int = 1

    def infer(self, x: TensorType, indices: TensorType):
        d = normalize_dim(self.dim, x.rank)
        return (x.with_shape((*x.shape[:d], *indices.shape, *x.shape[d + 1 :])),)


@op
@dataclass(frozen=True, slots=True)
class RMSNorm:
    """weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype)"""

    eps: float

    def infer(self, x: TensorType, weight: TensorType):
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"RMSNorm: weight {weight} does not match {x}")
        return (x.with_dtype(promote(x.dtype, weight.dtype)),)


@op
@dataclass(frozen=True, slots=True)
class LayerNorm:
    """((x - mean) * rsqrt(var + eps) * weight + bias) over the last dim, computed in float32
    and rounded once to x's dtype (torch's layer_norm); bias is optional."""

    eps: float

    def infer(self, x: TensorType, weight: TensorType, bias: TensorType | None = None):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.shape != (x.shape[-1],):
                raise ValueError(f"LayerNorm: {name} {t} does not match {x}")
        return (x,)


@op
@dataclass(frozen=True, slots=True)
class AddRMSNorm:
    """s = x + residual; returns (RMSNorm(s, weight), s)."""

    eps: float

    def infer(self, x: TensorType, residual: TensorType, weight: TensorType):
        s = TensorType(broadcast(x.shape, residual.shape), promote(x.dtype, residual.dtype))
        return (*RMSNorm(self.eps).infer(s, weight), s)


@op
@dataclass(frozen=True, slots=True)
class NormLinear:
    """AddRMSNorm whose normed output feeds one Linear: s = x + residual,
    h = RMSNorm(s, norm_weight) @ weight.T; with act "silu_mul", silu(first half of h) *
    second half (a merged gate/up projection). Returns (h, s)."""

    eps: float
    act: str | None = None

    def infer(self, x: TensorType, residual: TensorType, norm_weight: TensorType, w: TensorType):
        y, s = AddRMSNorm(self.eps).infer(x, residual, norm_weight)
        (h,) = Linear().infer(y, w)
        if self.act == "silu_mul":
            if w.shape[0] % 2:
                raise ValueError(f"NormLinear: silu_mul needs an even output width, got {w}")
            h = h.with_shape((*h.shape[:-1], w.shape[0] // 2))
        elif self.act is not None:
            raise ValueError(f"NormLinear: unknown activation {self.act!r}")
        return (h, s)


@op
@dataclass(frozen=True, slots=True)
class Rope:
    """x * cos + rotate_half(x) * sin (rotate_half: (-x2, x1) over the halves of the last dim)."""

    def infer(self, x: TensorType, cos: TensorType, sin: TensorType):
        shape = broadcast(broadcast(x.shape, cos.shape), sin.shape)
        return (TensorType(shape, promote(x.dtype, cos.dtype)),)


@op
@dataclass(frozen=True, slots=True)
class SiluMul:
    def infer(self, gate: TensorType, up: TensorType):
        return (TensorType(broadcast(gate.shape, up.shape), promote(gate.dtype, up.dtype)),)


@op
@dataclass(frozen=True, slots=True)
class AllReduce:
    """Sum of x over the ranks of the tensor-parallel group (identity on one rank)."""

    def infer(self, x: TensorType):
        return (x,)


@op
@dataclass(frozen=True, slots=True)
class FusedElementwise:
    """A tree of elementwise ops over the inputs, evaluated in float32, stored as `dtype`.

    expr nodes: ("arg", i) | ("const", value) | ("cast", dtype, e) | (unary_fn, e)
    | (binary_fn, a, b)
    """

    expr: tuple
    dtype: str

    def infer(self, *xs: TensorType):
        shape = xs[0].shape
        for x in xs[1:]:
            shape = broadcast(shape, x.shape)
        return (TensorType(shape, self.dtype),)


@op
@dataclass(frozen=True, slots=True)
class PagedAttention:
    """Causal attention of the batch's new tokens over each sequence's paged KV cache.

    Writes k/v of the new tokens into the layer's cache at `slot_mapping`, then attends
    (GQA, optional sliding window and logit soft-cap). layout "bhtd": q [1, H, T, D] and
    k/v [1, KVH, T, D] as transformers hands them over; "bthd": q [1, T, H, D] (no
    transposes). With rope, inputs are (q, k, v, cos, sin), cos/sin [1, T, R], and q/k are
    rotated in the prologue: their first R = rotary_dim columns of each head (partial rotary;
    None: all D), the rest kept. Output: [1, T, H, D].
    """

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None
    softcap: float | None = None
    layout: str = "bhtd"
    rope: bool = False
    rotary_dim: int | None = None

    def infer(self, q: TensorType, k: TensorType, v: TensorType, cos=None, sin=None):
        h_axis, t_axis = (1, 2) if self.layout == "bhtd" else (2, 1)
        expect = {id(q): self.num_heads, id(k): self.num_kv_heads, id(v): self.num_kv_heads}
        for t in (q, k, v):
            if t.rank != 4 or t.shape[h_axis] != expect[id(t)] or t.shape[3] != self.head_dim:
                raise ValueError(f"PagedAttention: bad operand {t} for layout {self.layout}")
        if self.rope != (cos is not None and sin is not None):
            raise ValueError("PagedAttention: cos/sin operands must match the rope attribute")
        if self.rotary_dim is not None and not (
            self.rope and 0 < self.rotary_dim < self.head_dim and self.rotary_dim % 2 == 0
        ):
            raise ValueError(
                f"PagedAttention: rotary_dim {self.rotary_dim} needs rope and an even width "
                f"below head_dim {self.head_dim}"
            )
        if self.rope and any(t.shape[-1] != (self.rotary_dim or self.head_dim) for t in (cos, sin)):
            raise ValueError(f"PagedAttention: cos/sin {cos}, {sin} do not span the rotary dims")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("PagedAttention: num_heads must be a multiple of num_kv_heads")
        tokens = q.shape[t_axis]
        return (TensorType((1, tokens, self.num_heads, self.head_dim), q.dtype),)
