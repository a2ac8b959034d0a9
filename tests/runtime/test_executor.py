"""The executor drops each value after the node that reads it last."""

from __future__ import annotations

import weakref

import torch
from conftest import tiny_model

from compiler.frontend import trace_model
from compiler.pipeline import run_pipeline
from runtime.batch import build_batch
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec


def test_values_are_released_after_their_last_use():
    graph, params = run_pipeline(*trace_model(tiny_model("llama")))
    executor = Executor(graph, params)
    kv = allocate_kv_cache(kv_cache_spec(graph), 8, 16)
    batch = build_batch([([5, 7, 11, 13, 17, 19], 0, [0])], 16)
    expected = executor.forward(batch, kv)

    made: list[weakref.ref] = []  # every tensor a node returned this step
    alive = []  # how many of them each node found alive when it ran

    def watched(fn):
        def run(op, ctx, *args):
            alive.append(sum(r() is not None for r in made))
            out = fn(op, ctx, *args)
            made.extend(weakref.ref(t) for t in (out if isinstance(out, tuple) else (out,)))
            return out

        return run

    executor.plan = [(watched(fn), *rest) for fn, *rest in executor.plan]
    torch.testing.assert_close(executor.forward(batch, kv), expected, rtol=0, atol=0)
    nodes = len(graph.nodes)
    # a layer's worth at most (the residual stream and the values in flight), not all of them
    assert max(alive) <= 8 < nodes, (max(alive), nodes)
