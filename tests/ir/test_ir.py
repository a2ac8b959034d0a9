"""IR: type rules, verifier, printer, JSON round-trip, reference-op sanity."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from compiler.frontend import trace_model
from compiler.pipeline import run_pipeline
from ir import (
    Graph,
    Node,
    TensorType,
    Value,
    VerifyError,
    graph_from_json,
    graph_to_json,
    ops,
    print_graph,
    verify,
)
from ir.builder import GraphBuilder
from ir.reference import RefContext, run_op


def test_reshape_infers_minus_one_with_symbols():
    t = TensorType((1, "T", 96), "float32")
    assert ops.Reshape((1, "T", -1, 16)).infer(t)[0].shape == (1, "T", 6, 16)
    with pytest.raises(ValueError):
        ops.Reshape((1, -1, 7)).infer(t)


def test_verify_rejects_bad_graphs():
    x = Value("x", TensorType(("T", 4), "float32"))
    from ir import Input

    wrong_type = Node(ops.Unary("neg"), ("x",), (Value("y", TensorType(("T", 5), "float32")),))
    with pytest.raises(VerifyError, match="inferred"):
        verify(Graph((Input(x),), (wrong_type,), ("y",)))
    undefined = Node(ops.Unary("neg"), ("z",), (Value("y", x.type),))
    with pytest.raises(VerifyError, match="undefined"):
        verify(Graph((Input(x),), (undefined,), ("y",)))
    twice = Node(ops.Unary("neg"), ("x",), (Value("x", x.type),))
    with pytest.raises(VerifyError, match="twice"):
        verify(Graph((Input(x),), (twice,), ("x",)))
    with pytest.raises(VerifyError, match="not defined"):
        verify(Graph((Input(x),), (), ("nope",)))


def test_json_round_trip_of_a_compiled_model_is_identical():
    graph, _ = run_pipeline(*trace_model(tiny_model("qwen3")))
    text = graph_to_json(graph)
    again = graph_from_json(text)
    assert again == graph
    assert print_graph(again) == print_graph(graph)
    assert graph_to_json(again) == text


def test_json_loader_rejects_unknown_ops_and_attributes():
    b = GraphBuilder()
    b.add1(ops.Unary("neg"), b.input("x", TensorType((3,), "float32")))
    text = graph_to_json(b.build(("unary",)))
    with pytest.raises(ValueError, match="unknown op"):
        graph_from_json(text.replace('"Unary"', '"Exec"'))
    with pytest.raises(ValueError, match="unknown attributes"):
        graph_from_json(text.replace('"fn"', '"code"'))


def test_reference_attention_is_causal_over_paged_cache():
    """Two sequences in one flat batch equal each run alone with plain causal attention."""
    op = ops.PagedAttention(0, 4, 2, 8, 8**-0.5, layout="bthd")
    g = torch.Generator().manual_seed(0)
    lens = (5, 3)
    q = torch.randn(1, sum(lens), 4, 8, generator=g)
    k, v = torch.randn(2, 1, sum(lens), 2, 8, generator=g)
    caches = ((torch.full((6, 4, 2, 8), float("nan")), torch.full((6, 4, 2, 8), float("nan"))),)
    tables = torch.tensor([[3, 1], [0, 5]], dtype=torch.int32)
    slots = torch.tensor([12, 13, 14, 15, 4, 0, 1, 2])
    ctx = RefContext(
        {"T": 8},
        caches,
        slots,
        torch.tensor([0, 5, 8], dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
        tables,
    )
    (out,) = run_op(op, ctx, q, k, v)
    start = 0
    for n in lens:
        qs, ks, vs = (t[0, start : start + n].transpose(0, 1) for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(
            qs, ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0), is_causal=True
        )
        torch.testing.assert_close(out[0, start : start + n], ref.transpose(0, 1))
        start += n


def test_layernorm_infers_the_input_type_and_checks_its_operands():
    x = TensorType((1, "T", 48), "bfloat16")
    w, b = TensorType((48,), "float32"), TensorType((48,), "float32")
    assert ops.LayerNorm(1e-5).infer(x, w, b) == (x,)  # the input's dtype, as torch's
    assert ops.LayerNorm(1e-5).infer(x, w) == (x,)
    with pytest.raises(ValueError, match="weight"):
        ops.LayerNorm(1e-5).infer(x, TensorType((47,), "float32"))
    with pytest.raises(ValueError, match="bias"):
        ops.LayerNorm(1e-5).infer(x, w, TensorType((1, 48), "float32"))


def test_layernorm_json_round_trip_with_and_without_bias():
    b = GraphBuilder()
    x = b.input("x", TensorType((1, "T", 37), "bfloat16"))
    w, bias = (b.input(n, TensorType((37,), "bfloat16"), kind="param") for n in ("w", "b"))
    with_bias = b.add1(ops.LayerNorm(1e-6), x, w, bias)
    graph = verify(b.build((b.add1(ops.LayerNorm(1e-5), with_bias, w, None),)))
    again = graph_from_json(graph_to_json(graph))
    assert again == graph and print_graph(again) == print_graph(graph)
    assert "LayerNorm(eps=1e-06)(%x, %w, %b)" in print_graph(graph)
    assert [n.inputs[2] for n in again.nodes] == ["b", None]


# one float32 layer norm rounded once, as torch's own bf16 kernel does: torch's default
# tolerance per dtype (rounding-level: the variance may be summed in another order)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [37, 48, 4099])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layernorm_reference_matches_torch(dtype, width, with_bias):
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(3, 5, width, generator=g) * 3 + 1).to(dtype)
    w, b = (torch.randn(width, generator=g).to(dtype) for _ in "wb")
    bias = b if with_bias else None
    (out,) = run_op(ops.LayerNorm(1e-5), RefContext({}), x, w, bias)
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (width,), w, bias, 1e-5))


def test_layernorm_reference_of_mixed_dtypes_has_the_inferred_dtype():
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    w, b = torch.randn(16), torch.randn(16)
    (out,) = run_op(ops.LayerNorm(1e-5), RefContext({}), x, w, b)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.layer_norm(x.float(), (16,), w, b, 1e-5).to(torch.bfloat16)
    torch.testing.assert_close(out, ref)
