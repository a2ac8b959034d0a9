"""CUDA graphs of mixed steps (prefill chunks with decodes), captured piecewise.

A decode step is one graph per batch size (cuda_graphs.py). A mixed step's attention depends
on more than its token count: how many sequences, and how many new tokens each. So, as vLLM
does, such a step is cut at its attention nodes. The runs of nodes between them (norms, GEMMs,
rope tables, the MLP, all-reduces: every shape depends on the token count T alone, and every
token's row is computed on its own) are captured once per token bucket and replayed.
Attention runs eagerly between them on the step's real tokens, and so do the nodes from the
logits' gather on, whose sizes are the sampled rows'.

A step of T tokens replays the pieces of the smallest bucket S >= T. Rows T..S-1 compute on
whatever the buffers held before, and no real row reads them (the tests poison them with NaN).
Attention reads rows [0, T) of its inputs, and its output is copied into rows [0, T) of the
buffer the next piece reads. Larger steps than the largest bucket run eagerly.

Memory: the pieces of every bucket share one pool. A piece's outputs that only eager nodes read
are held as non-owning views, so their blocks go back to the pool for later pieces and buckets
to reuse. That is safe because pieces replay in capture order and an eager node's kernels read
their inputs before the next piece runs. The eager outputs that pieces read go to buffers
sized for the largest bucket, shared by values that are never live at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ir.graph import Graph, Node
from ir.ops import GatherLastTokens, Mean, PagedAttention, Reshape, Sum
from ir.reference import TORCH_DTYPES, RefContext, concrete_shape
from ir.types import TensorType
from runtime.batch import BatchInputs, build_batch
from runtime.executor import Executor

log = logging.getLogger(__name__)

TOKENS = "T"  # the symbol of the token dimension
BUCKETS = (16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 1024, 1280, 1536, 2048)


class Replayable(Protocol):
    def replay(self) -> None: ...
    def reset(self) -> None: ...


# capture(run, pool) -> (graph, pool): a graph of what run() launches (run() is called once)
Capture = Callable[[Callable[[], None], object], tuple[Replayable, object]]


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """Token counts captured: up to max_tokens, at most the last of BUCKETS (a larger step
    is GPU-bound; it runs eagerly)."""
    largest = min(max_tokens, BUCKETS[-1])
    return (*(b for b in BUCKETS if b < largest), largest)


def cuda_capture(run: Callable[[], None], pool) -> tuple[torch.cuda.CUDAGraph, object]:
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            run()
    except BaseException:
        graph.reset()
        raise
    return graph, graph.pool()


def is_captured(node: Node, graph: Graph) -> bool:
    """Whether a node can run inside a piece: not attention, nor the logits' gather; every
    shape in T alone; and no reduction across tokens."""
    if isinstance(node.op, (PagedAttention, GatherLastTokens)):
        return False
    types = [graph.type_of(x) for x in node.inputs if x] + [v.type for v in node.outputs]
    if any(isinstance(d, str) and d != TOKENS for t in types for d in t.shape):
        return False
    if any(t.shape.count(TOKENS) > 1 for t in types):
        return False
    if isinstance(node.op, (Mean, Sum)):
        x = types[0]
        return not any(isinstance(x.shape[d], str) for d in node.op.dims)
    if isinstance(node.op, Reshape):  # rows stay whole only with nothing but 1s before T
        return all(_rows_first(t) for t in types)
    return True


def _rows_first(t: TensorType) -> bool:
    """Whether t's tokens are its outermost rows: every dimension before T is 1 (or t has no
    T)."""
    dim = token_dim(t)
    return dim is None or all(d == 1 for d in t.shape[:dim])


def token_dim(t: TensorType) -> int | None:
    """The position of T in t's shape (None: none, or several, which no piece reads)."""
    dims = [i for i, d in enumerate(t.shape) if d == TOKENS]
    return dims[0] if len(dims) == 1 else None


class MixedGraphs:
    def __init__(
        self,
        executor: Executor,
        graph: Graph,
        kv_caches,
        max_tokens: int,
        pad_block: int,
        block_size: int,
        device: torch.device,
        capture: Capture = cuda_capture,
    ) -> None:
        self.executor, self.graph, self.kv_caches = executor, graph, kv_caches
        self.device, self.capture_fn = device, capture
        self.buckets = token_buckets(max_tokens)
        self.flags = [is_captured(n, graph) for n in graph.nodes]
        # (start, stop, captured) runs of the plan; an eager run is one node
        self.pieces: list[tuple[int, int, bool]] = []
        for i, flag in enumerate(self.flags):
            if flag and self.pieces and self.pieces[-1][2]:
                self.pieces[-1] = (self.pieces[-1][0], i + 1, True)
            else:
                self.pieces.append((i, i + 1, flag))
        piece_of = [p for p, (a, b, _) in enumerate(self.pieces) for _ in range(a, b)]
        slot = executor.slot
        self.producer = {slot[v.name]: i for i, n in enumerate(graph.nodes) for v in n.outputs}
        # value slot -> the last piece that reads it, for values pieces read
        self.read_by_pieces: dict[int, int] = {}
        for i, n in enumerate(graph.nodes):
            for x in n.inputs:
                if x and self.flags[i]:
                    self.read_by_pieces[slot[x]] = piece_of[i]
        self.types = {slot[name]: graph.type_of(name) for name in slot}
        self.dims = {s: token_dim(t) for s, t in self.types.items()}  # token dimension
        # eager node -> the step's values it is the last eager node to need
        last: dict[int, int] = {}
        for i, n in enumerate(graph.nodes):
            for x in n.inputs:
                if x and not self.flags[i] and not self._from_piece(slot[x]):
                    last[slot[x]] = i
        self.drop: dict[int, list[int]] = {i: [] for i, f in enumerate(self.flags) if not f}
        for s, i in last.items():
            if s != executor.output_slot:
                self.drop[i].append(s)
        for i in self.drop:
            self.drop[i] += [
                slot[v.name]
                for v in graph.nodes[i].outputs
                if slot[v.name] not in last and slot[v.name] != executor.output_slot
            ]
        # the batch's fields that pieces read, in buffers of the largest bucket
        self.inputs = {
            slot[i.value.name]: _zeros(i.value.type, self.buckets[-1], device)
            for i in graph.runtime_inputs
            if slot[i.value.name] in self.read_by_pieces
        }
        self.shared = SharedBuffers(device)  # eager outputs that pieces read
        self.pad = build_batch([([0], 0, [pad_block])], block_size, device=device)
        self.programs: dict[int, tuple[list[Replayable | EagerNode], Source]] = {}
        self.graphs: list[Replayable] = []  # every bucket's pieces
        self.memory = 0  # device bytes the capture took

    def fits(self, batch: BatchInputs) -> bool:
        """Whether a captured bucket holds the batch."""
        return bool(self.programs) and batch.num_tokens <= self.buckets[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's pieces, largest first, in one pool."""
        start = time.perf_counter()
        free_before = self._free()
        pool = None
        try:
            for size in reversed(self.buckets):
                pool = self._capture_bucket(size, pool)
            if self.executor.tp_group is None:  # see `warm`
                self.warm()
        except BaseException:
            self.close()  # graphs holding NCCL work hang the communicators' teardown
            raise
        self.memory = free_before - self._free()
        log.info(
            "captured mixed-step CUDA graphs for %d token counts (%s) in %.1f s, %d pieces "
            "each; they took %.2f GiB",
            len(self.programs),
            ", ".join(map(str, self.buckets)),
            time.perf_counter() - start,
            sum(1 for *_, captured in self.pieces if captured),
            self.memory / 2**30,
        )

    def warm(self) -> None:
        """Replay every piece once: a graph's first launch uploads it, which a step should not
        wait for (W4's TTFT p99 at 256 requests/s: 582 ms before, 63 ms after, on another H200
        host). Not with tensor parallelism: the pieces' all-reduces, replayed, have no timeout,
        so a rank that failed its capture would hang the others at start-up; there a bucket's
        first step uploads its pieces."""
        for graph in self.graphs:
            graph.replay()

    def close(self) -> None:
        """Free every graph now, whoever still holds this object; unusable afterwards."""
        for graph in self.graphs:
            graph.reset()
        self.graphs.clear()
        self.programs.clear()

    def _free(self) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    @torch.inference_mode()
    def run(self, batch: BatchInputs) -> torch.Tensor:
        """The logits rows `batch.logits_indices` picks, as an eager step gives them."""
        t = batch.num_tokens
        program, output = self.programs[next(b for b in self.buckets if b >= t)]
        ex = self.executor
        values = ex.bind(batch)
        for s, buffer in self.inputs.items():
            _narrow(buffer, self.dims[s], t).copy_(values[s])
        ctx = ex.context(batch, self.kv_caches)
        for step in program:
            if not isinstance(step, EagerNode):
                step.replay()
                continue
            fn, op, _, outs, _ = ex.plan[step.index]
            args = [None if s is None else s.read(values, t) for s in step.sources]
            result = fn(op, ctx, *args)
            results = result if len(outs) > 1 else (result,)
            for s, r, buffer in zip(outs, results, step.buffers, strict=True):
                values[s] = r
                if buffer is not None:
                    _narrow(buffer, self.dims[s], t).copy_(r)
            for s in self.drop[step.index]:
                values[s] = None
        return output.read(values, t)

    def _capture_bucket(self, size: int, pool):
        """Run one step of `size` tokens, capturing its pieces; eager nodes run on the pad
        batch (one token, in the block no sequence owns)."""
        ex = self.executor
        values = ex.bind(self.pad)  # what eager nodes read: weights, the batch, their results
        env = list(values)  # what the pieces read
        for s, buffer in self.inputs.items():
            env[s] = _narrow(buffer, self.dims[s], size)
        pieces_ctx = RefContext(sizes={TOKENS: size}, tp_group=ex.tp_group)
        eager_ctx = ex.context(self.pad, self.kv_caches)
        self.shared.release_all()
        program: list[Replayable | EagerNode] = []
        for p, (start, stop, captured) in enumerate(self.pieces):
            if captured:
                graph, pool = self.capture_fn(
                    lambda a=start, b=stop: ex.run(env, pieces_ctx, a, b), pool
                )
                program.append(graph)
                self.graphs.append(graph)
                continue
            fn, op, ins, outs, dead = ex.plan[start]
            sources = tuple(None if s is None else self._source(s, env) for s in ins)
            args = [None if s is None else s.read(values, 1) for s in sources]
            result = fn(op, eager_ctx, *args)
            buffers = []
            for s, r in zip(outs, result if len(outs) > 1 else (result,), strict=True):
                values[s] = r
                buffer = None
                if s in self.read_by_pieces:  # a later piece reads it, from a bucket's buffer
                    dim = self.dims[s]
                    whole = self.shared.take(
                        self.types[s], self.buckets[-1], p, self.read_by_pieces[s]
                    )
                    buffer = env[s] = _narrow(whole, dim, size)
                    _narrow(buffer, dim, 1).copy_(r)
                buffers.append(buffer)
            program.append(EagerNode(start, sources, tuple(buffers)))
            for s in dead:  # a piece's output read last here: its block may be taken again
                env[s] = None
            for s in self.drop[start]:
                values[s] = None
        self.programs[size] = (program, self._source(ex.output_slot, env))
        return pool

    def _source(self, slot: int, env: list) -> Source:
        """Where a value eager nodes read is at replay: a piece's output (a non-owning view of
        the bucket's tensor), else the step's own values (weights, the batch, eager results)."""
        if not self._from_piece(slot):
            return Source(slot)
        return Source(slot, non_owning(env[slot]), self.dims[slot])

    def _from_piece(self, slot: int) -> bool:
        """Whether a captured node makes the value (not an eager one, a weight or the batch)."""
        producer = self.producer.get(slot)
        return producer is not None and self.flags[producer]


@dataclass(frozen=True, slots=True)
class Source:
    """Where an eager node's input is found at replay."""

    slot: int
    tensor: torch.Tensor | None = None  # a piece's output at the bucket's size, or None
    dim: int | None = None  # the tensor's token dimension

    def read(self, values: list, tokens: int) -> torch.Tensor:
        """The value at a step of `tokens` tokens."""
        if self.tensor is None:
            return values[self.slot]
        return _narrow(self.tensor, self.dim, tokens)


@dataclass(frozen=True, slots=True)
class EagerNode:
    index: int  # in the executor's plan
    sources: tuple[Source | None, ...]  # None: an absent optional operand
    buffers: tuple[torch.Tensor | None, ...]  # per output: where later pieces read it


class SharedBuffers:
    """Buffers of the largest bucket for eager outputs that pieces read; a buffer is taken
    again once the last piece that reads its value has run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.held: dict[tuple, list[list]] = {}  # (shape, dtype) -> [buffer, busy until piece]

    def buffers(self) -> list[torch.Tensor]:
        return [entry[0] for entries in self.held.values() for entry in entries]

    def release_all(self) -> None:
        for entries in self.held.values():
            for entry in entries:
                entry[1] = -1

    def take(self, t: TensorType, tokens: int, now: int, until: int) -> torch.Tensor:
        entries = self.held.setdefault((t.shape, t.dtype), [])
        for entry in entries:
            if entry[1] < now:
                entry[1] = until
                return entry[0]
        entries.append([_zeros(t, tokens, self.device), until])
        return entries[-1][0]


class _Alias:
    """A CUDA array interface over a tensor's memory that does not keep it alive."""

    def __init__(self, t: torch.Tensor) -> None:
        size = t.element_size()
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "strides": tuple(s * size for s in t.stride()),
            "typestr": f"<i{size}",
            "data": (t.data_ptr(), False),
            "version": 3,
        }


def non_owning(t: torch.Tensor) -> torch.Tensor:
    """t's memory, without keeping it allocated (a CPU tensor is returned as it is): the pool's
    block can go to later pieces while the graphs still read it at replay."""
    if t.device.type != "cuda":
        return t
    return torch.as_tensor(_Alias(t), device=t.device).view(t.dtype)


def _narrow(t: torch.Tensor, dim: int | None, tokens: int) -> torch.Tensor:
    return t if dim is None else t.narrow(dim, 0, tokens)


def _zeros(t: TensorType, tokens: int, device: torch.device) -> torch.Tensor:
    shape = concrete_shape(t, {TOKENS: tokens})
    return torch.zeros(shape, dtype=TORCH_DTYPES[t.dtype], device=device)
