"""Each pass: a before graph, the expected graph (compared as printed text), and a numerical
check that both compute the same thing through the reference ops on random inputs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from compiler.passes.canonicalize import canonicalize
from compiler.passes.cse import cse
from compiler.passes.dce import eliminate_dead_code
from compiler.passes.fold_constants import fold_constants
from compiler.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from compiler.passes.fuse_elementwise import fuse_elementwise
from compiler.passes.fuse_norm_linear import fuse_norm_linear
from compiler.passes.fuse_rope_attention import fuse_rope_attention
from compiler.passes.merge_projections import merge_projections
from compiler.passes.raise_rmsnorm import raise_rmsnorm
from compiler.passes.raise_rope import raise_rope
from compiler.passes.raise_silu_mul import raise_silu_mul
from ir import ops, print_graph, verify
from ir.builder import GraphBuilder
from ir.reference import TORCH_DTYPES, RefContext, evaluate
from ir.types import TensorType

SIZES = {"T": 5, "B": 2}
# same math in the same order: exact in fp32; bf16 differs only where fusion skips a rounding
ATOL = {"float32": 1e-6, "bfloat16": 2e-2}


def random_inputs(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in graph.inputs:
        shape = [SIZES[d] if isinstance(d, str) else d for d in i.value.type.shape]
        dtype = TORCH_DTYPES[i.value.type.dtype]
        t = torch.randn(shape, generator=g) if dtype.is_floating_point else None
        out[i.value.name] = (
            t.to(dtype) if t is not None else torch.randint(0, 7, shape, generator=g)
        )
    return out


def check(pass_fn, before, expected, atol=1e-6, context=lambda: RefContext(sizes=SIZES)):
    """The pass turns `before` into `expected`, and both compute the same (each evaluation
    in a fresh `context()`: attention writes its KV cache)."""
    after = eliminate_dead_code(verify(pass_fn(verify(before))))
    assert print_graph(after, numbered=True) == print_graph(
        eliminate_dead_code(expected), numbered=True
    )
    inputs = random_inputs(before)
    ours, theirs = (evaluate(g, inputs, context()) for g in (before, after))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def f32(*shape):
    return TensorType(shape, "float32")


def test_canonicalize_drops_noops():
    b = GraphBuilder()
    x = b.input("x", f32(1, "T", 8))
    c = b.add1(ops.Cast("float32"), x)
    m = b.add1(ops.BinaryScalar("mul", 1.0), c)
    r = b.add1(ops.Reshape((1, "T", 2, 4)), m)
    r2 = b.add1(ops.Reshape(("T", 8)), r)
    t = b.add1(ops.Transpose(0, 1), r2)
    t2 = b.add1(ops.Transpose(1, 0), t)
    before = b.build((t2,))
    e = GraphBuilder()
    x = e.input("x", f32(1, "T", 8))
    expected = e.build((e.add1(ops.Reshape(("T", 8)), x),))
    check(canonicalize, before, expected)


def test_dce_keeps_attention_and_drops_unused():
    b = GraphBuilder()
    x = b.input("x", f32(1, "T", 8))
    b.input("unused", f32(3), kind="param")
    b.add1(ops.Unary("exp"), x)
    before = b.build((b.add1(ops.Unary("neg"), x),))
    after = eliminate_dead_code(before)
    assert [type(n.op).__name__ for n in after.nodes] == ["Unary"]
    assert [i.value.name for i in after.inputs] == ["x"]


def test_cse_merges_duplicates():
    b = GraphBuilder()
    x = b.input("x", f32("T", 4))
    a1, a2 = b.add1(ops.Unary("cos"), x), b.add1(ops.Unary("cos"), x)
    before = b.build((b.add1(ops.Binary("add"), a1, a2),))
    e = GraphBuilder()
    x = e.input("x", f32("T", 4))
    a = e.add1(ops.Unary("cos"), x)
    check(cse, before, e.build((e.add1(ops.Binary("add"), a, a),)))


def rmsnorm_chain(b, x, w, dtype):
    xf = b.add1(ops.Cast("float32"), x) if dtype != "float32" else x
    p = b.add1(ops.BinaryScalar("pow", 2.0), xf)
    m = b.add1(ops.Mean((-1,), True), p)
    a = b.add1(ops.BinaryScalar("add", 1e-5), m)
    r = b.add1(ops.Unary("rsqrt"), a)
    y = b.add1(ops.Binary("mul"), xf, r)
    y = b.add1(ops.Cast(dtype), y) if dtype != "float32" else y
    return b.add1(ops.Binary("mul"), w, y)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_raise_rmsnorm(dtype):
    t = TensorType((1, "T", 24), dtype)
    b = GraphBuilder()
    x, w = b.input("x", t), b.input("w", TensorType((24,), dtype), kind="param")
    before = b.build((rmsnorm_chain(b, x, w, dtype),))
    e = GraphBuilder()
    x, w = e.input("x", t), e.input("w", TensorType((24,), dtype), kind="param")
    check(raise_rmsnorm, before, e.build((e.add1(ops.RMSNorm(1e-5), x, w),)), ATOL[dtype])


def near_rmsnorm(b, x, w, dtype, case):
    """Trees that look like RMSNorm but round or square differently: none may be raised."""
    xf = b.add1(ops.Cast("bfloat16" if case == "norm in bf16" else "float32"), x)
    square = ops.BinaryScalar("pow", 2.0, scalar_first=case == "2 ** x")
    m = b.add1(ops.Mean((-1,), True), b.add1(square, xf))
    r = b.add1(ops.Unary("rsqrt"), b.add1(ops.BinaryScalar("add", 1e-5), m))
    y = b.add1(ops.Cast(dtype), b.add1(ops.Binary("mul"), xf, r))
    return b.add1(ops.Binary("mul"), w, y)


@pytest.mark.parametrize("case, dtype", [("2 ** x", "bfloat16"), ("norm in bf16", "float32")])
def test_raise_rmsnorm_leaves_what_rounds_differently(case, dtype):
    b = GraphBuilder()
    x = b.input("x", TensorType((1, "T", 24), dtype))
    w = b.input("w", TensorType((24,), "float32"), kind="param")
    before = b.build((near_rmsnorm(b, x, w, dtype, case),))
    assert "RMSNorm" not in eliminate_dead_code(raise_rmsnorm(before)).op_counts()


def test_raise_rmsnorm_weighted_in_float32_normalizes_the_float32_value():
    """Gemma's norm, (x.float() normalized * (1 + w).float()).to(x.dtype): never rounded
    before the weight, so not RMSNorm(x) (which rounds to x's dtype first) but
    RMSNorm(x.float()), the rounding back left to the cast after it."""
    t, w32 = TensorType((1, "T", 24), "bfloat16"), TensorType((24,), "float32")
    b = GraphBuilder()
    x, w = b.input("x", t), b.input("w", w32, kind="param")
    xf = b.add1(ops.Cast("float32"), x)
    m = b.add1(ops.Mean((-1,), True), b.add1(ops.BinaryScalar("pow", 2.0), xf))
    r = b.add1(ops.Unary("rsqrt"), b.add1(ops.BinaryScalar("add", 1e-5), m))
    y = b.add1(ops.Binary("mul"), b.add1(ops.Binary("mul"), xf, r), w)
    before = b.build((b.add1(ops.Cast("bfloat16"), y),))
    e = GraphBuilder()
    x, w = e.input("x", t), e.input("w", w32, kind="param")
    normed = e.add1(ops.RMSNorm(1e-5), e.add1(ops.Cast("float32"), x), w)
    check(raise_rmsnorm, before, e.build((e.add1(ops.Cast("bfloat16"), normed),)), atol=0)


def test_raise_rope():
    b = GraphBuilder()
    x, cos, sin = (
        b.input("x", f32(1, 3, "T", 8)),
        b.input("cos", f32(1, 1, "T", 8)),
        b.input("sin", f32(1, 1, "T", 8)),
    )
    lo, hi = b.add1(ops.Slice(3, 0, 4), x), b.add1(ops.Slice(3, 4, 8), x)
    rot = b.add1(ops.Concat(-1), b.add1(ops.Unary("neg"), hi), lo)
    out = b.add1(
        ops.Binary("add"), b.add1(ops.Binary("mul"), x, cos), b.add1(ops.Binary("mul"), rot, sin)
    )
    before = b.build((out,))
    e = GraphBuilder()
    names = [
        e.input(n, t.value.type) for n, t in zip(["x", "cos", "sin"], before.inputs, strict=True)
    ]
    check(raise_rope, before, e.build((e.add1(ops.Rope(), *names),)))


def test_raise_silu_mul():
    b = GraphBuilder()
    g, u = b.input("g", f32("T", 6)), b.input("u", f32("T", 6))
    before = b.build((b.add1(ops.Binary("mul"), u, b.add1(ops.Unary("silu"), g)),))
    e = GraphBuilder()
    g, u = e.input("g", f32("T", 6)), e.input("u", f32("T", 6))
    check(raise_silu_mul, before, e.build((e.add1(ops.SiluMul(), g, u),)))


def test_merge_projections_then_fold():
    b = GraphBuilder()
    x = b.input("x", f32("T", 8))
    ws = [b.input(f"w{i}", f32(n, 8), kind="param") for i, n in enumerate((8, 4, 4))]
    outs = tuple(b.add1(ops.Linear(), x, w) for w in ws)
    before = b.build(outs)
    e = GraphBuilder()
    x = e.input("x", f32("T", 8))
    ws = [e.input(f"w{i}", f32(n, 8), kind="param") for i, n in enumerate((8, 4, 4))]
    y = e.add1(ops.Linear(), x, e.add1(ops.Concat(0), *ws))
    slices = (ops.Slice(-1, 0, 8), ops.Slice(-1, 8, 12), ops.Slice(-1, 12, 16))
    check(merge_projections, before, e.build(tuple(e.add1(s, y) for s in slices)))
    merged = merge_projections(before)
    params = {k: v for k, v in random_inputs(before).items() if k.startswith("w")}
    folded, new_params = fold_constants(merged, params)
    assert [type(n.op).__name__ for n in folded.nodes] == ["Linear", "Slice", "Slice", "Slice"]
    assert len(new_params) == 1 and next(iter(new_params.values())).shape == (16, 8)


def test_merge_projections_joins_a_models_own_slices():
    """q/k/v split by the model off one Linear that merges with another (a parallel block's
    MLP): each piece becomes one slice of the merged Linear; a strided slice stays."""
    b = GraphBuilder()
    x = b.input("x", f32("T", 8))
    wqkv, wfc = b.input("wqkv", f32(12, 8), kind="param"), b.input("wfc", f32(6, 8), kind="param")
    qkv = b.add1(ops.Linear(), x, wqkv)
    q, kv = b.add1(ops.Slice(-1, 0, 4), qkv), b.add1(ops.Slice(1, 4, 99), qkv)
    strided = b.add1(ops.Slice(-1, 0, 12, 2), qkv)
    before = b.build((q, kv, strided, b.add1(ops.Linear(), x, wfc)))
    e = GraphBuilder()
    x = e.input("x", f32("T", 8))
    wqkv, wfc = e.input("wqkv", f32(12, 8), kind="param"), e.input("wfc", f32(6, 8), kind="param")
    y = e.add1(ops.Linear(), x, e.add1(ops.Concat(0), wqkv, wfc))
    qkv, fc = e.add1(ops.Slice(-1, 0, 12), y), e.add1(ops.Slice(-1, 12, 18), y)
    q, kv = e.add1(ops.Slice(-1, 0, 4), y), e.add1(ops.Slice(-1, 4, 12), y)
    check(merge_projections, before, e.build((q, kv, e.add1(ops.Slice(-1, 0, 12, 2), qkv), fc)))


def test_fuse_add_rmsnorm_redirects_later_uses():
    b = GraphBuilder()
    x, r = b.input("x", f32(1, "T", 8)), b.input("r", f32(1, "T", 8))
    w = b.input("w", f32(8), kind="param")
    s = b.add1(ops.Binary("add"), x, r)
    n = b.add1(ops.RMSNorm(1e-6), s, w)
    before = b.build((b.add1(ops.Binary("add"), s, n),))
    e = GraphBuilder()
    x, r = e.input("x", f32(1, "T", 8)), e.input("r", f32(1, "T", 8))
    w = e.input("w", f32(8), kind="param")
    n, s = e.add(ops.AddRMSNorm(1e-6), x, r, w)
    check(fuse_add_rmsnorm, before, e.build((e.add1(ops.Binary("add"), s, n),)))


def norm_then_projections(b, gate_up: int, shared_norm: bool = False):
    """An attention-shaped and an MLP-shaped block: AddRMSNorm -> Linear (-> halves ->
    SiluMul), the sums carried on. shared_norm: the first normed value has a second use."""
    x, r = b.input("x", f32(1, "T", 8)), b.input("r", f32(1, "T", 8))
    g1, g2 = b.input("g1", f32(8), kind="param"), b.input("g2", f32(8), kind="param")
    w1 = b.input("w1", f32(12, 8), kind="param")
    w2 = b.input("w2", f32(2 * gate_up, 8), kind="param")
    n, s = b.add(ops.AddRMSNorm(1e-6), x, r, g1)
    h = b.add1(ops.Linear(), n, w1)
    extra = (b.add1(ops.Unary("exp"), n),) if shared_norm else ()
    n2, s2 = b.add(ops.AddRMSNorm(1e-6), b.add1(ops.Slice(-1, 0, 8), h), s, g2)
    gu = b.add1(ops.Linear(), n2, w2)
    gate, up = (b.add1(ops.Slice(-1, i * gate_up, (i + 1) * gate_up), gu) for i in (0, 1))
    return b.build((b.add1(ops.Binary("add"), b.add1(ops.SiluMul(), gate, up), s2), *extra))


def test_fuse_norm_linear_takes_norm_and_silu_mul():
    e = GraphBuilder()
    x, r = e.input("x", f32(1, "T", 8)), e.input("r", f32(1, "T", 8))
    g1, g2 = e.input("g1", f32(8), kind="param"), e.input("g2", f32(8), kind="param")
    w1, w2 = e.input("w1", f32(12, 8), kind="param"), e.input("w2", f32(16, 8), kind="param")
    h, s = e.add(ops.NormLinear(1e-6), x, r, g1, w1)
    act, s2 = e.add(ops.NormLinear(1e-6, "silu_mul"), e.add1(ops.Slice(-1, 0, 8), h), s, g2, w2)
    expected = e.build((e.add1(ops.Binary("add"), act, s2),))
    check(fuse_norm_linear, norm_then_projections(GraphBuilder(), 8), expected)


def test_fuse_norm_linear_leaves_shared_norms_and_other_slices():
    # the first norm's output has another use: only the second norm is fused
    before = norm_then_projections(GraphBuilder(), 8, shared_norm=True)
    after = eliminate_dead_code(fuse_norm_linear(before))
    assert after.op_counts().get("AddRMSNorm") == 1
    assert after.op_counts().get("NormLinear") == 1
    assert any(n.op == ops.NormLinear(1e-6, "silu_mul") for n in after.nodes)
    # SiluMul's operands are [0, 4) and [4, 8) of 10 outputs, not the halves: no silu_mul
    b = GraphBuilder()
    x, w = b.input("x", f32(1, "T", 8)), b.input("w", f32(10, 8), kind="param")
    n, s = b.add(ops.AddRMSNorm(1e-6), x, x, b.input("g", f32(8), kind="param"))
    gu = b.add1(ops.Linear(), n, w)
    gate, up = (b.add1(ops.Slice(-1, i * 4, (i + 1) * 4), gu) for i in (0, 1))
    odd = b.build((b.add1(ops.SiluMul(), gate, up), s))
    fused = eliminate_dead_code(fuse_norm_linear(odd))
    assert [type(n.op).__name__ for n in fused.nodes] == ["NormLinear", "Slice", "Slice", "SiluMul"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fuse_elementwise_builds_expression_tree(dtype):
    t = TensorType(("T", 5), dtype)
    b = GraphBuilder()
    x, y = b.input("x", t), b.input("y", t)
    a = b.add1(ops.Binary("mul"), x, y)
    c = b.add1(ops.BinaryScalar("sub", 1.5, scalar_first=True), a)
    d = b.add1(ops.Unary("tanh"), c)
    before = b.build((d, b.add1(ops.Unary("exp"), x)))  # exp alone: nothing to fuse
    e = GraphBuilder()
    x, y = e.input("x", t), e.input("y", t)
    inner = ("mul", ("arg", 0), ("arg", 1))
    inner = inner if dtype == "float32" else ("cast", dtype, inner)
    sub = ("sub", ("const", 1.5), inner)
    sub = sub if dtype == "float32" else ("cast", dtype, sub)
    fused = e.add1(ops.FusedElementwise(("tanh", sub), dtype), x, y)
    expected = e.build((fused, e.add1(ops.Unary("exp"), x)))
    check(fuse_elementwise, before, expected, atol=0)  # explicit casts: bit-exact


def attention_context(tokens=5, dtype=torch.float32):
    """One sequence of `tokens` new tokens, block size 4, empty caches of `dtype`."""
    caches = ((torch.zeros(4, 4, 2, 8, dtype=dtype), torch.zeros(4, 4, 2, 8, dtype=dtype)),)
    return RefContext(
        {"T": tokens},
        caches,
        torch.arange(tokens),
        torch.tensor([0, tokens], dtype=torch.int32),
        torch.tensor([tokens], dtype=torch.int32),
        torch.tensor([[0, 1, 2, 3]], dtype=torch.int32),
    )


def test_fuse_rope_attention():
    attn = ops.PagedAttention(0, 4, 2, 8, 8**-0.5)
    b = GraphBuilder()
    xq, xk, xv = (b.input(n, f32(1, "T", h, 8)) for n, h in (("q", 4), ("k", 2), ("v", 2)))
    cos, sin = b.input("cos", f32(1, "T", 8)), b.input("sin", f32(1, "T", 8))
    c4, s4 = (b.add1(ops.Reshape((1, 1, "T", 8)), t) for t in (cos, sin))
    q, k, v = (b.add1(ops.Transpose(1, 2), t) for t in (xq, xk, xv))
    q, k = (b.add1(ops.Rope(), t, c4, s4) for t in (q, k))
    before = b.build((b.add1(attn, q, k, v),))
    e = GraphBuilder()
    names = [e.input(i.value.name, i.value.type) for i in before.inputs]
    fused = ops.PagedAttention(0, 4, 2, 8, 8**-0.5, layout="bthd", rope=True)
    expected = e.build((e.add1(fused, *names),))
    check(fuse_rope_attention, before, expected, context=attention_context)


def test_fuse_rope_attention_fuses_a_rope_applied_before_the_heads_move():
    """A custom module ropes q/k as [T, H, D] with [T, 1, D] tables, then kiln.attention
    views them [1, T, H, D] and transposes: fused all the same, tables viewed [1, T, D]."""
    attn = ops.PagedAttention(0, 4, 2, 8, 8**-0.5)
    b = GraphBuilder()
    yq, yk, yv = (b.input(n, f32("T", h, 8)) for n, h in (("q", 4), ("k", 2), ("v", 2)))
    cos, sin = b.input("cos", f32("T", 1, 8)), b.input("sin", f32("T", 1, 8))
    yq, yk = (b.add1(ops.Rope(), t, cos, sin) for t in (yq, yk))
    q, k, v = (
        b.add1(ops.Transpose(1, 2), b.add1(ops.Reshape((1, "T", h, 8)), t))
        for t, h in ((yq, 4), (yk, 2), (yv, 2))
    )
    before = b.build((b.add1(attn, q, k, v),))
    e = GraphBuilder()
    yq, yk, yv, cos, sin = (e.input(i.value.name, i.value.type) for i in before.inputs)
    xv = e.add1(ops.Reshape((1, "T", 2, 8)), yv)
    xq, xk = (e.add1(ops.Reshape((1, "T", h, 8)), t) for t, h in ((yq, 4), (yk, 2)))
    c, s = (e.add1(ops.Reshape((1, "T", 8)), t) for t in (cos, sin))
    fused = replace(attn, layout="bthd", rope=True)
    expected = e.build((e.add1(fused, xq, xk, xv, c, s),))
    check(fuse_rope_attention, before, expected, context=attention_context)


@pytest.mark.parametrize("leading", [True, False])
def test_fuse_rope_attention_partial_rotary(leading):
    """Rope over half of each head, the rest passed through. The first half (Phi, GPT-NeoX):
    fused, PagedAttention(rotary_dim=4) over the untransposed q/k. The last half (no kernel
    for it): the slices, ropes and concats are rebuilt over the untransposed q/k (tables
    viewed [1, T, 1, 4], once) and the attention takes layout "bthd" without a prologue."""
    attn = ops.PagedAttention(0, 4, 2, 8, 8**-0.5)
    b = GraphBuilder()
    xq, xk, xv = (b.input(n, f32(1, "T", h, 8)) for n, h in (("q", 4), ("k", 2), ("v", 2)))
    cos, sin = b.input("cos", f32(1, "T", 4)), b.input("sin", f32(1, "T", 4))
    c4, s4 = (b.add1(ops.Reshape((1, 1, "T", 4)), t) for t in (cos, sin))
    rot, rest = (0, 4), (4, 8)
    if not leading:
        rot, rest = rest, rot

    def partial(t):
        roped = b.add1(ops.Rope(), b.add1(ops.Slice(3, *rot), t), c4, s4)
        kept = b.add1(ops.Slice(3, *rest), t)
        return b.add1(ops.Concat(-1), *((roped, kept) if leading else (kept, roped)))

    q, k, v = (b.add1(ops.Transpose(1, 2), t) for t in (xq, xk, xv))
    before = b.build((b.add1(attn, partial(q), partial(k), v),))
    e = GraphBuilder()
    xq, xk, xv, cos, sin = (e.input(i.value.name, i.value.type) for i in before.inputs)
    if leading:
        fused = replace(attn, layout="bthd", rope=True, rotary_dim=4)
        expected = e.build((e.add1(fused, xq, xk, xv, cos, sin),))
        check(fuse_rope_attention, before, expected, context=attention_context)
        return
    tables: list[str] = []

    def moved(x):
        kept, sliced = e.add1(ops.Slice(-1, *rest), x), e.add1(ops.Slice(-1, *rot), x)
        if not tables:
            tables.extend(e.add1(ops.Reshape((1, "T", 1, 4)), t) for t in (cos, sin))
        return e.add1(ops.Concat(-1), kept, e.add1(ops.Rope(), sliced, *tables))

    q, k = moved(xq), moved(xk)
    expected = e.build((e.add1(replace(attn, layout="bthd"), q, k, xv),))
    check(fuse_rope_attention, before, expected, context=attention_context)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fuse_rope_attention_moves_qk_norms_after_the_transpose(dtype):
    """Gemma3: per-head q/k RMSNorms applied to [1, H, T, D] after the heads move (in bf16
    computed in float32: cast up, normed, cast back), then the rope: the norms are rebuilt
    over the untransposed q/k and the rope fuses into the attention's prologue."""
    attn = ops.PagedAttention(0, 4, 2, 8, 8**-0.5)
    t = lambda *shape: TensorType(shape, dtype)  # noqa: E731

    def norm(g, x, w):
        if dtype == "float32":
            return g.add1(ops.RMSNorm(1e-6), x, w)
        up = g.add1(ops.RMSNorm(1e-6), g.add1(ops.Cast("float32"), x), w)
        return g.add1(ops.Cast(dtype), up)

    b = GraphBuilder()
    xq, xk, xv = (b.input(n, t(1, "T", h, 8)) for n, h in (("q", 4), ("k", 2), ("v", 2)))
    wq, wk = (b.input(n, f32(8), kind="param") for n in ("wq", "wk"))
    cos, sin = b.input("cos", t(1, "T", 8)), b.input("sin", t(1, "T", 8))
    c4, s4 = (b.add1(ops.Reshape((1, 1, "T", 8)), c) for c in (cos, sin))
    q, k, v = (b.add1(ops.Transpose(1, 2), x) for x in (xq, xk, xv))
    q, k = (b.add1(ops.Rope(), norm(b, x, w), c4, s4) for x, w in ((q, wq), (k, wk)))
    before = b.build((b.add1(attn, q, k, v),))
    e = GraphBuilder()
    xq, xk, xv, wq, wk, cos, sin = (
        e.input(i.value.name, i.value.type, i.kind) for i in before.inputs
    )
    q, k = norm(e, xq, wq), norm(e, xk, wk)
    fused = replace(attn, layout="bthd", rope=True)
    expected = e.build((e.add1(fused, q, k, xv, cos, sin),))
    context = lambda: attention_context(dtype=TORCH_DTYPES[dtype])  # noqa: E731
    check(fuse_rope_attention, before, expected, atol=ATOL[dtype], context=context)


def test_fuse_norm_linear_leaves_an_odd_width_pair():
    # halves [0, 1) and [1, 3) of a 3-wide projection (SiluMul broadcasts them): no gate/up pair
    b = GraphBuilder()
    x, w = b.input("x", f32(1, "T", 8)), b.input("w", f32(3, 8), kind="param")
    n, s = b.add(ops.AddRMSNorm(1e-6), x, x, b.input("g", f32(8), kind="param"))
    h = b.add1(ops.Linear(), n, w)
    gate, up = b.add1(ops.Slice(-1, 0, 1), h), b.add1(ops.Slice(-1, 1, 3), h)
    odd = b.build((b.add1(ops.SiluMul(), gate, up), s))
    fused = eliminate_dead_code(verify(fuse_norm_linear(verify(odd))))
    assert [type(n.op).__name__ for n in fused.nodes] == ["NormLinear", "Slice", "Slice", "SiluMul"]


def test_fuse_elementwise_keeps_torch_rounding_of_inexact_narrow_scalars():
    # bf16 x - 1.01: torch rounds 1.01 to bf16 (1.0078125) first; a float32 constant in the
    # fused tree would not, and 1 / (x - s) near x = s shows it (inf against -458)
    t = TensorType((5,), "bfloat16")
    b = GraphBuilder()
    x = b.input("x", t)
    d = b.add1(ops.BinaryScalar("sub", 1.01), x)
    inv = b.add1(ops.BinaryScalar("div", 1.0, scalar_first=True), d)
    before = verify(b.build((b.add1(ops.Unary("exp"), inv),)))
    after = verify(fuse_elementwise(before))
    assert ops.BinaryScalar("sub", 1.01) in [n.op for n in after.nodes]  # left to torch
    assert after.op_counts().get("FusedElementwise") == 1  # 1 / d and exp still fuse
    xs = {"x": torch.tensor([1.0078125, 0.5, 3.0, 1.0, 0.30078125], dtype=torch.bfloat16)}
    ctx = RefContext(sizes=SIZES)
    torch.testing.assert_close(evaluate(after, xs, ctx)[0], evaluate(before, xs, ctx)[0])
    assert evaluate(after, xs, ctx)[0][0] == torch.exp(1 / (xs["x"][0] - 1.01))  # inf


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fuse_elementwise_fuses_gelu_tanh_with_its_inexact_multipliers(dtype):
    """GELU-tanh written out (Phi's gelu_new): torch multiplies a narrow tensor by a scalar in
    float32, as the fused tree does, so 0.044715 and sqrt(2/pi) fuse: one node, bit-exact.
    x**3 stays torch's (bf16 on the CPU rounds x*x first; a GPU does not)."""
    t = TensorType((1, "T", 24), dtype)
    b = GraphBuilder()
    x = b.input("x", t)
    cube = b.add1(ops.BinaryScalar("mul", 0.044715), b.add1(ops.BinaryScalar("pow", 3.0), x))
    inner = b.add1(ops.BinaryScalar("mul", 0.7978845608028654), b.add1(ops.Binary("add"), x, cube))
    tanh = b.add1(ops.BinaryScalar("add", 1.0), b.add1(ops.Unary("tanh"), inner))
    before = b.build((b.add1(ops.Binary("mul"), b.add1(ops.BinaryScalar("mul", 0.5), x), tanh),))
    after = eliminate_dead_code(verify(fuse_elementwise(verify(before))))
    assert [type(n.op).__name__ for n in after.nodes] == ["BinaryScalar", "FusedElementwise"]
    xs = {"x": (4 * torch.randn(1, 999, 24)).to(TORCH_DTYPES[dtype])}
    ctx = RefContext(sizes={"T": 999})
    assert torch.equal(evaluate(after, xs, ctx)[0], evaluate(before, xs, ctx)[0])


def test_fuse_elementwise_leaves_integer_ops():
    # the fused tree computes in float32: 2**24 + 1 would round
    t = TensorType((3,), "int64")
    b = GraphBuilder()
    x, y = b.input("x", t), b.input("y", t)
    before = verify(b.build((b.add1(ops.Binary("mul"), b.add1(ops.Binary("add"), x, y), y),)))
    after = verify(fuse_elementwise(before))
    assert "FusedElementwise" not in after.op_counts()
    xs = {"x": torch.tensor([2**24 + 1, 3, 123456789]), "y": torch.tensor([1, 1, 1])}
    assert evaluate(after, xs, RefContext(sizes=SIZES))[0].tolist() == [2**24 + 2, 4, 123456790]


def test_cse_and_canonicalize_keep_the_sign_of_zero():
    b = GraphBuilder()
    x = b.input("x", f32(3))
    pos, neg = b.add1(ops.BinaryScalar("mul", 0.0), x), b.add1(ops.BinaryScalar("mul", -0.0), x)
    inv = ops.BinaryScalar("div", 1.0, scalar_first=True)
    zeros = b.build((b.add1(inv, pos), b.add1(inv, neg)))
    assert verify(cse(zeros)).op_counts()["BinaryScalar"] == 4  # 1/(x*0) is not 1/(x*-0)
    for fn, scalar, identity in (
        ("add", 0.0, False),  # -0.0 + 0.0 = +0.0
        ("add", -0.0, True),
        ("sub", 0.0, True),
        ("sub", -0.0, False),  # -0.0 - -0.0 = +0.0
    ):
        b = GraphBuilder()
        x = b.input("x", f32(2))
        g = b.build((b.add1(inv, b.add1(ops.BinaryScalar(fn, scalar), x)),))
        after = verify(canonicalize(g))
        assert (after.op_counts()["BinaryScalar"] == 1) == identity, (fn, scalar)
        xs = {"x": torch.tensor([-0.0, 1.0])}
        ctx = RefContext(sizes=SIZES)
        torch.testing.assert_close(evaluate(after, xs, ctx)[0], evaluate(g, xs, ctx)[0])


def test_fuse_rope_attention_fuses_a_promoting_rope_cast_back():
    """OLMo: bf16 q/k rotated by float32 tables (float32 results) and cast straight back to
    bf16: the fused prologue rotates in the promoted dtype and rounds once, as the casts do."""
    attn = ops.PagedAttention(0, 4, 2, 8, 8**-0.5)
    bf16 = lambda *shape: TensorType(shape, "bfloat16")  # noqa: E731
    b = GraphBuilder()
    xq, xk, xv = (b.input(n, bf16(1, "T", h, 8)) for n, h in (("q", 4), ("k", 2), ("v", 2)))
    cos, sin = b.input("cos", f32(1, "T", 8)), b.input("sin", f32(1, "T", 8))
    c4, s4 = (b.add1(ops.Reshape((1, 1, "T", 8)), t) for t in (cos, sin))
    q, k, v = (b.add1(ops.Transpose(1, 2), t) for t in (xq, xk, xv))
    q, k = (b.add1(ops.Cast("bfloat16"), b.add1(ops.Rope(), t, c4, s4)) for t in (q, k))
    before = b.build((b.add1(attn, q, k, v),))
    e = GraphBuilder()
    names = [e.input(i.value.name, i.value.type) for i in before.inputs]
    expected = e.build((e.add1(replace(attn, layout="bthd", rope=True), *names),))
    context = lambda: attention_context(dtype=torch.bfloat16)  # noqa: E731
    check(fuse_rope_attention, before, expected, atol=0, context=context)


def test_fuse_rope_attention_leaves_a_promoting_rope():
    # bf16 q/k rotated by float32 tables give float32 (torch promotes); the fused prologue
    # rotates in q's dtype, so fusing would change the attention's dtype and its KV cache
    attn = ops.PagedAttention(0, 4, 2, 8, 8**-0.5)
    b = GraphBuilder()
    bf16 = lambda *shape: TensorType(shape, "bfloat16")  # noqa: E731
    xq, xk = (b.input(n, bf16(1, "T", h, 8)) for n, h in (("q", 4), ("k", 2)))
    xv = b.input("v", f32(1, "T", 2, 8))
    cos, sin = b.input("cos", f32(1, "T", 8)), b.input("sin", f32(1, "T", 8))
    c4, s4 = (b.add1(ops.Reshape((1, 1, "T", 8)), t) for t in (cos, sin))
    q, k, v = (b.add1(ops.Transpose(1, 2), t) for t in (xq, xk, xv))
    q, k = (b.add1(ops.Rope(), t, c4, s4) for t in (q, k))
    before = verify(b.build((b.add1(attn, q, k, v),)))
    after = verify(fuse_rope_attention(before))
    assert print_graph(after) == print_graph(before)
