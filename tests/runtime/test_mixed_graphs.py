"""Mixed steps replayed from piecewise graphs give what eager steps give.

On the CPU a stand-in records the torch ops a piece runs (with the tensors they read and
write) and replays them on those tensors, as a CUDA graph replays its kernels on fixed
addresses: whatever a piece's capture saw of the step's values, rather than the
addresses they live at, would show as a wrong step here.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kiln
from compiler.frontend import trace_model
from compiler.pipeline import run_pipeline
from ir.graph import Graph, Input, Node, Value
from ir.ops import Binary, GatherLastTokens, Mean, PagedAttention, Reshape, Sum
from ir.types import TensorType
from runtime.batch import build_batch
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec
from runtime.mixed_graphs import MixedGraphs, is_captured, token_buckets

BLOCK, BLOCKS = 16, 24


class Recorded(TorchDispatchMode):
    """A stand-in for a CUDA graph: the ops of one run, replayed on the same tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []
        self.replays = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, kwargs or {}, out))
        return out

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, out in self.calls:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_leaves(out), tree_leaves(fresh), strict=True):
                if isinstance(old, torch.Tensor):
                    old.copy_(new)  # the captured output's memory gets this run's values

    def reset(self) -> None:
        self.calls.clear()


def recorded_capture(run, pool):
    with Recorded() as graph:
        run()
    return graph, pool


def mixed_graphs(family: str, max_tokens: int = 64):
    graph, params = run_pipeline(*trace_model(tiny_model(family)))
    executor = Executor(graph, params)
    caches = [allocate_kv_cache(kv_cache_spec(graph), BLOCKS + 1, BLOCK) for _ in "eg"]
    graphs = MixedGraphs(
        executor, graph, caches[1], max_tokens, BLOCKS, BLOCK, torch.device("cpu"),
        capture=recorded_capture,
    )  # fmt: skip
    graphs.capture()
    return executor, graphs, caches


def steps(vocab: int):
    """Batches of a few sequences' lives: prefill chunks over cached context, decodes, prompt
    logprob rows, token counts off the buckets and on the largest."""
    g = torch.Generator().manual_seed(0)
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(5)]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (23, 40, 9, 3, 50)]

    def chunk(s, start, n):
        return (prompts[s][start : start + n], start, tables[s])

    yield [chunk(0, 0, 23), chunk(1, 0, 5)], None, None  # T = 28
    yield [chunk(0, 20, 1), chunk(1, 5, 17), chunk(2, 0, 9)], None, [0, 3, 2]  # cached context
    yield [chunk(0, 22, 1), chunk(1, 22, 18), chunk(2, 8, 1)], [True, False, True], None
    yield [chunk(3, 0, 3), chunk(4, 0, 50), chunk(0, 10, 11)], None, None  # 64 tokens
    yield [chunk(s, 2, 1) for s in range(5)], None, None  # decodes only


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_piecewise_steps_equal_eager_steps(family):
    executor, graphs, (eager_kv, graph_kv) = mixed_graphs(family)
    layers = sum(isinstance(n.op, PagedAttention) for n in graphs.graph.nodes)
    # one piece before each attention layer and one after the last, up to the logits' gather
    assert sum(captured for *_, captured in graphs.pieces) == layers + 1
    first_gather = next(
        i for i, n in enumerate(graphs.graph.nodes) if isinstance(n.op, GatherLastTokens)
    )
    assert not any(graphs.flags[first_gather:])
    assert graphs.buckets == (16, 32, 64)
    assert len(graphs.shared.buffers()) == 1  # every layer's attention output, in turn
    with torch.inference_mode():  # rows past a step's tokens must never be read
        for buffer in graphs.shared.buffers():
            buffer.fill_(float("nan"))
    vocab = graphs.graph.type_of(graphs.graph.outputs[0]).shape[-1]
    for chunks, sample, prompt_logits in steps(vocab):
        batch = build_batch(chunks, BLOCK, sample=sample, prompt_logits=prompt_logits)
        assert graphs.fits(batch)
        expected = executor.forward(batch, eager_kv)
        got = graphs.run(batch)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(eager_kv, graph_kv, strict=True):
        torch.testing.assert_close(k1[:BLOCKS], k0[:BLOCKS], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1[:BLOCKS], v0[:BLOCKS], rtol=1e-5, atol=1e-5)
    replays = [g.replays for g in graphs.graphs]
    # each piece once after capture (its upload), then every step from its bucket's pieces
    assert sum(replays) == len(replays) + 5 * (layers + 1)


def test_buckets_and_what_fits():
    assert token_buckets(2048)[-1] == token_buckets(8192)[-1] == 2048
    assert token_buckets(100) == (16, 32, 64, 96, 100)
    _, graphs, _ = mixed_graphs("llama", max_tokens=20)
    assert graphs.buckets == (16, 20)
    table = list(range(2))
    assert graphs.fits(build_batch([([1] * 20, 0, table)], BLOCK))
    assert not graphs.fits(build_batch([([1] * 21, 0, table)], BLOCK))
    graphs.close()
    assert not graphs.graphs and not graphs.programs


def test_only_nodes_that_keep_each_token_s_row_whole_are_captured():
    """A piece runs on the bucket's padded rows: a node that mixes rows across tokens, or whose
    shape has another symbol, must run eagerly on the step's real tokens."""
    x = Value("x", TensorType((1, "T", 4, 2), "float32"))
    m = Value("m", TensorType(("T", "T"), "float32"))

    def node(op, inputs, shape):
        return Node(op, inputs, (Value("y", TensorType(shape, "float32")),))

    graph = Graph((Input(x), Input(m)), (), ())
    assert is_captured(node(Reshape(("T", 8)), ("x",), ("T", 8)), graph)
    assert is_captured(node(Reshape((1, "T", 8)), ("x",), (1, "T", 8)), graph)
    assert not is_captured(node(Reshape((1, 4, "T", 2)), ("x",), (1, 4, "T", 2)), graph)
    assert not is_captured(node(Reshape((2, "T", 4)), ("x",), (2, "T", 4)), graph)
    assert not is_captured(node(Binary("add"), ("m", "m"), ("T", "T")), graph)
    assert not is_captured(node(Reshape(("B", 8)), ("x",), ("B", 8)), graph)
    for reduce in (Mean, Sum):  # over a token's own values, or across the tokens
        assert is_captured(node(reduce((-1,), True), ("x",), (1, "T", 4, 1)), graph)
        assert not is_captured(node(reduce((1,), True), ("x",), (1, 1, 4, 2)), graph)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_an_engine_stepping_through_the_pieces_gives_the_eager_engine_s_tokens(tmp_path, overlap):
    """Chunked prefills next to decodes, through the runner's dispatch (and, asynchronous, with
    inputs pending on the last step's tokens): the tokens of an engine whose steps run eagerly."""
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, safe_serialization=True)
    artifact = kiln.compile(str(src), tmp_path / "art")
    rng = random.Random(0)
    prompts = [[rng.randrange(160) for _ in range(rng.randint(1, 120))] for _ in range(12)]
    params = [
        kiln.SamplingParams(max_tokens=rng.randint(1, 20), temperature=0.0, ignore_eos=True)
        for _ in prompts
    ]
    options = dict(num_kv_blocks=96, max_num_batched_tokens=64, async_scheduling=overlap)
    eager = kiln.LLM(artifact, **options).generate(prompts, params, use_tqdm=False)
    llm = kiln.LLM(artifact, **options)
    runner = llm.engine.runner
    runner.mixed = MixedGraphs(
        runner.executor, runner.artifact.graph, runner.kv_caches, 64, runner.num_blocks - 1,
        runner.block_size, runner.device, capture=recorded_capture,
    )  # fmt: skip
    runner.mixed.capture()
    warm = sum(g.replays for g in runner.mixed.graphs)
    piecewise = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in piecewise] == [o.outputs[0].token_ids for o in eager]
    per_step = sum(captured for *_, captured in runner.mixed.pieces)
    steps = (sum(g.replays for g in runner.mixed.graphs) - warm) / per_step
    assert steps >= 10  # prefill chunks (and, on the CPU, decodes too) ran from the pieces
