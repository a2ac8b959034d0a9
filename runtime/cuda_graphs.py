"""CUDA graphs of decode steps: one per batch-size bucket, captured once, replayed every step.

A decode step (every sequence computes one token) is replayed from the graph of the smallest
bucket that holds it. Its inputs are written into pinned host buffers and copied into the
graph's static device buffers; the rows past the real sequences are padding: one token at
position 0 whose KV goes to a block no sequence owns (`pad_block`), so padding never touches
a real sequence's cache. Attention is captured for the longest allowed context: each token
splits its own context over the graph's blocks, and splits past a short context return at once.
A token still pending on the device (asynchronous scheduling) is taken, inside the graph, from
`carried`, where each step copies the tokens the last one sampled.

The graphs' GEMMs are captured through torch's cuBLASLt backend with a 32 KiB workspace: at a
few rows, cuBLAS given its default 32 MiB splits K over thread blocks and adds a reduce kernel,
which costs more than it saves (H200, Llama-3.1-8B's O and down at one row: 14.6 and 33.2 us
with the split, 11.8 and 31.0 us without). Eager steps keep cuBLAS and its full workspace.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from runtime.batch import BatchInputs, resolve_pending
from runtime.executor import Executor
from runtime.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

LT_WORKSPACE_KIB = 32

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket_sizes(max_num_seqs: int) -> tuple[int, ...]:
    return (*(b for b in BUCKETS if b < max_num_seqs), max_num_seqs)


@contextmanager
def decode_gemms() -> Iterator[None]:
    """GEMMs run (and are captured) through cuBLASLt and its small workspace, which has no
    room for split-K's partial sums at one row (measured: Llama-3.1-8B's O and down). torch
    reads the size at its first cuBLASLt call in the process; a size the user set before
    (CUBLASLT_WORKSPACE_SIZE) is kept."""
    os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", str(LT_WORKSPACE_KIB))
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def is_decode(chunks: Sequence[ScheduledChunk]) -> bool:
    return all(c.num_tokens == 1 and c.sample for c in chunks)


def write_decode_inputs(
    chunks: Sequence[ScheduledChunk],
    size: int,
    block_size: int,
    pad_block: int,
    rows64: np.ndarray,  # [3, n]: token ids, positions, KV slots
    flat32: np.ndarray,  # [n + n * width]: context lengths, then the block tables row by row
) -> None:
    """Write a decode step's inputs for a graph of `size` sequences, padding past the chunks."""
    n = rows64.shape[1]
    tokens, positions, slots = rows64
    lens, tables = flat32[:n], flat32[n:].reshape(n, -1)
    for i, c in enumerate(chunks):
        table, pos = c.seq.block_table, c.start
        tokens[i] = c.seq.token_slice(pos, pos + 1)[0]
        positions[i] = pos
        slots[i] = table[pos // block_size] * block_size + pos % block_size
        lens[i] = pos + 1
        tables[i, : len(table)] = table
    pad = slice(len(chunks), size)
    tokens[pad], positions[pad], slots[pad] = 0, 0, pad_block * block_size
    lens[pad], tables[pad, 0] = 1, pad_block


class DecodeGraphs:
    def __init__(
        self,
        executor: Executor,
        kv_caches,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        pad_block: int,
        device: torch.device,
    ) -> None:
        self.executor, self.kv_caches = executor, kv_caches
        self.block_size, self.max_model_len, self.pad_block = block_size, max_model_len, pad_block
        n, self.width = max_num_seqs, -(-max_model_len // block_size)
        self.buckets = bucket_sizes(n)
        # token_ids, positions, slot_mapping as rows of one int64 buffer; context_lens, then
        # the block tables, in one int32 buffer: two copies per step. The device's int64
        # buffer has a fourth row: the tokens the last step sampled (`carried`), copied there
        # on the device.
        self.host64 = torch.zeros((3, n), dtype=torch.int64).pin_memory()
        self.host32 = torch.zeros(n * (1 + self.width), dtype=torch.int32).pin_memory()
        self.dev64 = torch.zeros((4, n), dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(n * (1 + self.width), dtype=torch.int32, device=device)
        self.np64, self.np32 = self.host64.numpy(), self.host32.numpy()
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self.carried = self.dev64[3]
        self.copied = torch.cuda.Event()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.memory = 0  # device bytes the capture took (the graphs' pool, their workspaces)

    def batch(self, size: int) -> BatchInputs:
        """The static inputs of the graph for `size` sequences (views of the device buffers)."""
        n = self.dev64.shape[1]
        tables = self.dev32[n:].view(n, self.width)
        return BatchInputs(
            token_ids=resolve_pending(self.dev64[0, :size], self.carried),
            positions=self.dev64[1, :size],
            slot_mapping=self.dev64[2, :size],
            query_start=self.query_start[: size + 1],
            context_lens=self.dev32[:size],
            block_tables=tables[:size],
            logits_indices=self.logits_indices[:size],
            max_context_len=self.max_model_len,
            max_query_len=1,
        )

    def capture(self) -> None:
        """Capture every bucket, largest first, all sharing one memory pool."""
        start = time.perf_counter()
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info(self.dev64.device)[0]
        largest = self.buckets[-1]
        self._fill((), largest)
        self._upload(largest)
        made: list[torch.cuda.CUDAGraph] = []
        try:
            with decode_gemms():
                self.executor.forward(self.batch(largest), self.kv_caches)  # warm-up: handles
                torch.cuda.synchronize()
                pool = None
                for size in reversed(self.buckets):
                    made.append(graph := torch.cuda.CUDAGraph())
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self.executor.forward(self.batch(size), self.kv_caches)
                    pool = graph.pool()
                    self.graphs[size] = (graph, logits)
            torch.cuda.synchronize()
        except BaseException:
            # the traceback keeps these frames alive: free the graphs now, the one whose
            # capture failed too (graphs holding NCCL work hang the communicators' teardown)
            for graph in made:
                graph.reset()
            self.graphs.clear()
            raise
        self.memory = free_before - torch.cuda.mem_get_info(self.dev64.device)[0]
        log.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s; they took %.2f GiB",
            len(self.graphs),
            ", ".join(map(str, self.buckets)),
            time.perf_counter() - start,
            self.memory / 2**30,
        )

    def close(self) -> None:
        """Free every graph now, whoever still holds this object; unusable afterwards."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def fits(self, chunks: Sequence[ScheduledChunk]) -> bool:
        return len(chunks) <= self.buckets[-1] and is_decode(chunks)

    def run(self, chunks: Sequence[ScheduledChunk], carried: torch.Tensor | None) -> torch.Tensor:
        """Logits [len(chunks), vocab]: valid until the next replay. `carried`: the tokens
        pending inputs stand for (`resolve_pending`)."""
        return self.replay(self.stage(chunks, carried), len(chunks))

    def stage(self, chunks: Sequence[ScheduledChunk], carried: torch.Tensor | None) -> int:
        """Copy a decode step's inputs into the device buffers; returns its bucket."""
        size = next(b for b in self.buckets if b >= len(chunks))
        if carried is not None:
            self.carried[: carried.shape[0]].copy_(carried)
        self.copied.synchronize()  # the last step's copies have read the host buffers
        self._fill(chunks, size)
        self._upload(size)
        return size

    def inputs(self, size: int) -> tuple[torch.Tensor, ...]:
        """The device buffers the graph of `size` reads (staged on rank 0, broadcast from it
        to the other ranks of tensor parallelism)."""
        n = self.dev64.shape[1]
        return self.dev64, self.dev32[: n + size * self.width]

    def replay(self, size: int, count: int) -> torch.Tensor:
        """Replay the graph of `size` on the staged inputs: the first `count` rows of logits."""
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:count]

    def _fill(self, chunks: Sequence[ScheduledChunk], size: int) -> None:
        write_decode_inputs(chunks, size, self.block_size, self.pad_block, self.np64, self.np32)

    def _upload(self, size: int) -> None:
        n = self.dev64.shape[1]
        self.dev64[:3].copy_(self.host64, non_blocking=True)
        used = n + size * self.width  # the context lengths, then `size` block-table rows
        self.dev32[:used].copy_(self.host32[:used], non_blocking=True)
        self.copied.record()
