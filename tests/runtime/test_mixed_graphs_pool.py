"""Mixed steps stay right when the pieces share one memory pool, as on a GPU.

test_mixed_graphs.py's stand-in keeps every tensor a piece touched alive, so memory a capture
gives back is never taken again: a piece output released to the pool while a later node
still reads it there (through a non-owning view) goes unseen. This stand-in tracks the memory
each piece allocates and, at replay, poisons every such block from the point where nothing
held it at capture (from there a GPU's later pieces may allocate it): a step that reads one
gives NaN or garbage rows.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import FAMILIES, tiny_model
from test_mixed_graphs import BLOCK, BLOCKS, steps
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import runtime.mixed_graphs as mixed_graphs
from compiler.frontend import trace_model
from compiler.pipeline import run_pipeline
from runtime.batch import build_batch
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec


def _view(storage, offset, size, stride, dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)


class _Spec:
    """A tensor's memory and geometry, without holding the tensor object itself."""

    def __init__(self, t: torch.Tensor) -> None:
        self.args = (t.untyped_storage(), t.storage_offset(), t.shape, t.stride(), t.dtype)

    def make(self) -> torch.Tensor:
        return _view(*self.args)


class Pool:
    def __init__(self) -> None:
        self.owners: dict[int, list[weakref.ref]] = {}  # block -> tensors made on it
        self.blocks: dict[int, torch.UntypedStorage] = {}
        self.poisoned = 0

    def free(self) -> set[int]:
        """The blocks nothing holds now (non-owning views aside)."""
        return {p for p, refs in self.owners.items() if all(r() is None for r in refs)}

    def poison(self, blocks) -> None:
        for p in blocks:
            torch.empty(0, dtype=torch.uint8).set_(self.blocks[p]).fill_(0xFF)  # NaN, -1
            self.poisoned += 1


class PoolPiece(TorchDispatchMode):
    """A piece's ops, replayed on the same memory after poisoning the pool's free blocks."""

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool, self.calls = pool, []
        self.free_at_start = pool.free()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        read = {a.untyped_storage().data_ptr() for a in tree_leaves(args) if torch.is_tensor(a)}
        for o in tree_leaves(out):
            if not torch.is_tensor(o):
                continue
            block = o.untyped_storage().data_ptr()
            if block not in read and block not in self.pool.owners and o.numel():
                self.pool.owners[block] = []  # allocated by this op
                self.pool.blocks[block] = o.untyped_storage()
            if block in self.pool.owners:
                self.pool.owners[block].append(weakref.ref(o))

        def spec(x):
            return _Spec(x) if torch.is_tensor(x) else x

        self.calls.append((func, tree_map(spec, args), tree_map(spec, kwargs), tree_map(spec, out)))
        return out

    def replay(self) -> None:
        self.pool.poison(self.free_at_start)

        def make(x):
            return x.make() if isinstance(x, _Spec) else x

        for func, args, kwargs, out in self.calls:
            fresh = func(*tree_map(make, args), **tree_map(make, kwargs))
            for old, new in zip(tree_leaves(tree_map(make, out)), tree_leaves(fresh), strict=True):
                if torch.is_tensor(old):
                    old.copy_(new)

    def reset(self) -> None:
        self.calls.clear()


def _non_owning(t: torch.Tensor) -> torch.Tensor:
    """The CPU's non-owning view: the same memory through a tensor the pool does not track."""
    return _view(t.untyped_storage(), t.storage_offset(), t.shape, t.stride(), t.dtype)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_piecewise_steps_survive_a_shared_pool(family, monkeypatch):
    monkeypatch.setattr(mixed_graphs, "non_owning", _non_owning)
    graph, params = run_pipeline(*trace_model(tiny_model(family)))
    executor = Executor(graph, params)
    eager_kv, graph_kv = (allocate_kv_cache(kv_cache_spec(graph), BLOCKS + 1, BLOCK) for _ in "eg")
    pool = Pool()

    def capture(run, handle):
        with PoolPiece(pool) as piece:
            run()
        return piece, handle

    graphs = mixed_graphs.MixedGraphs(
        executor, graph, graph_kv, 64, BLOCKS, BLOCK, torch.device("cpu"), capture=capture
    )
    graphs.capture()
    vocab = graph.type_of(graph.outputs[0]).shape[-1]
    for chunks, sample, prompt_logits in steps(vocab):
        batch = build_batch(chunks, BLOCK, sample=sample, prompt_logits=prompt_logits)
        expected = executor.forward(batch, eager_kv)
        torch.testing.assert_close(graphs.run(batch), expected, rtol=1e-5, atol=1e-5)
    assert pool.poisoned > 0  # blocks were given back during capture, and poisoned at replay
