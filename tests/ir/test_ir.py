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
