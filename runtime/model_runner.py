"""Model runner: owns the device state (weights, KV cache) and runs one step's batch."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace

import torch

from compiler.artifact import Artifact
from ir.graph import Graph
from runtime.batch import BatchInputs, build_batch, resolve_pending
from runtime.config import EngineConfig
from runtime.cuda_graphs import DecodeGraphs
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec
from runtime.memory import GIB, MemoryProfile, graphs_outside_margin, kv_cache_bytes
from runtime.mixed_graphs import MixedGraphs
from runtime.sampler import SamplingState, prompt_logprobs, sample
from runtime.sampling_params import MAX_LOGPROBS, SamplingParams
from runtime.scheduler import MAX_SCORED_TOKENS, ScheduledChunk

log = logging.getLogger(__name__)


def runner_device(artifact: Artifact, config: EngineConfig) -> torch.device:
    """config.device, else "cuda" for a cuda-target artifact, else "cpu"."""
    target = artifact.manifest.get("target", "cpu")
    name = config.device or ("cuda" if target == "cuda" else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "--device cuda" if config.device else f"{artifact.path} (target cuda)"
        raise ValueError(f"{why} needs a CUDA GPU, and torch sees none")
    return device


def _memory_snapshot(device: torch.device, params) -> tuple[int, int, int, int]:
    """(free, total, allocated, reserved) bytes on `device`, counting weights an in-memory
    artifact already holds there as not yet allocated: they are this engine's."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in params
        if t.is_cuda and t.device.index == index
    }
    held = sum(storages.values())
    gc.collect()  # this process's garbage and cached blocks are free memory, not another's
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    return free + held, total, allocated - held, reserved - held


def max_model_len(artifact: Artifact, config: EngineConfig) -> int:
    """The configured limit (default: the artifact's); more than the artifact was compiled
    for is refused, as vLLM refuses more than the model's."""
    compiled = artifact.manifest["max_model_len"]
    if config.max_model_len is not None and config.max_model_len > compiled:
        raise ValueError(
            f"max_model_len {config.max_model_len} is more than the {compiled} tokens "
            f"{artifact.path} was compiled for (kiln compile --max-model-len)"
        )
    return config.max_model_len or compiled


def make_runner(artifact: Artifact, config: EngineConfig) -> ModelRunner:
    """The runner an artifact needs: a sharded one runs one process per rank, this one rank 0."""
    if artifact.manifest.get("tensor_parallel_size", 1) > 1:
        from runtime.distributed import TensorParallelRunner

        return TensorParallelRunner(artifact, config)
    return ModelRunner(artifact, config)


class ModelRunner:
    tp_group = None  # the process group of the graph's AllReduce nodes (runtime/distributed.py)
    graphs: DecodeGraphs | None = None  # decode CUDA graphs, once captured
    mixed: MixedGraphs | None = None  # piecewise CUDA graphs of the other steps, once captured
    memory_profile: MemoryProfile | None = None  # cuda: what sized the KV cache

    def __init__(self, artifact: Artifact, config: EngineConfig) -> None:
        self.device = runner_device(artifact, config)
        self.artifact = artifact
        self.block_size = artifact.manifest["block_size"]
        if self.device.type == "cuda":  # what this engine finds, before it takes anything
            self._memory_at_start = _memory_snapshot(self.device, artifact.params.values())
        start = time.perf_counter()
        self.params = {k: v.to(self.device) for k, v in artifact.params.items()}
        log.info("weights on %s in %.1f s", self.device, time.perf_counter() - start)
        self.executor = self._executor(artifact.graph, self.params)
        self.spec = kv_cache_spec(artifact.graph)
        self.num_blocks = config.num_kv_blocks or self._blocks_for(config)
        graphs = config.cuda_graphs and self.device.type == "cuda"
        # one more block than the scheduler hands out: CUDA-graph padding writes its KV there
        allocated = self.num_blocks + (1 if graphs else 0)
        self.kv_caches = allocate_kv_cache(self.spec, allocated, self.block_size, self.device)
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_tokens,
            self.num_tokens * self.spec.bytes_per_token / 2**20,
        )
        if graphs:
            self._capture_graphs(artifact, config)

    def close(self) -> None:
        """Drop the CUDA graphs (and, tensor parallel, stop the worker processes); the runner
        is unusable afterwards."""
        self._free_graphs()

    def _free_graphs(self) -> None:
        for graphs in (self.graphs, self.mixed):
            if graphs is not None:
                graphs.close()
        self.graphs = self.mixed = None

    def _capture_graphs(self, artifact: Artifact, config: EngineConfig) -> None:
        """Decode graphs, then the mixed steps' pieces; on a failure, every graph is freed
        before the error goes on (graphs holding NCCL work hang the communicators'
        teardown)."""
        try:
            self.graphs = DecodeGraphs(
                self.executor,
                self.kv_caches,
                self.block_size,
                config.max_num_seqs,
                max_model_len(artifact, config),
                pad_block=self.num_blocks,
                device=self.device,
            )
            self.graphs.capture()
            taken = self.graphs.memory
            if config.mixed_graphs:
                self.mixed = MixedGraphs(
                    self.executor,
                    artifact.graph,
                    self.kv_caches,
                    config.max_num_batched_tokens,
                    pad_block=self.num_blocks,
                    block_size=self.block_size,
                    device=self.device,
                )
                self.mixed.capture()
                taken += self.mixed.memory
        except BaseException:  # graphs only: a tensor-parallel rank 0 stops its workers later
            self._free_graphs()
            raise
        if self.memory_profile is not None:  # measured: the KV cache's size was not given
            utilization = config.gpu_memory_utilization
            warning = graphs_outside_margin(self.memory_profile, utilization, taken)
            if warning:
                log.warning(warning)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _executor(self, graph: Graph, params: dict[str, torch.Tensor]) -> Executor:
        if self.device.type != "cuda":
            return Executor(graph, params, self.tp_group)
        from runtime.cubin import kernel_node_fn, load_cubin_ops

        self.cubin_ops = load_cubin_ops(self.artifact, self.device)
        overrides = {i: kernel_node_fn(graph.nodes[i], op) for i, op in self.cubin_ops.items()}
        return Executor(graph, params, self.tp_group, overrides=overrides)

    def _blocks_for(self, config: EngineConfig) -> int:
        budget = config.kv_cache_bytes
        if self.device.type == "cuda":
            self.memory_profile = self._profile_memory(config)
            budget = kv_cache_bytes(self.memory_profile, config.gpu_memory_utilization)
            log.info(
                "GPU memory: %s; the KV cache gets %.2f GiB (--gpu-memory-utilization %s of "
                "%.1f GiB)",
                self.memory_profile.describe(),
                budget / GIB,
                config.gpu_memory_utilization,
                self.memory_profile.total / GIB,
            )
        return max(1, budget // (self.spec.bytes_per_token * self.block_size))

    def _profile_memory(self, config: EngineConfig) -> MemoryProfile:
        """Run the largest step the scheduler can make (max_num_batched_tokens tokens over up
        to max_num_seqs sequences, each sampled with every filter and logprobs, and scoring
        its prompt for prompt logprobs) in a cache of its own, and measure the memory it
        takes."""
        free_at_start, total, allocated_at_start, reserved_at_start = self._memory_at_start
        device = self.device
        torch.cuda.synchronize(device)
        weights = torch.cuda.memory_allocated(device) - allocated_at_start
        seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        tokens = min(config.max_num_batched_tokens, seqs * max_model_len(self.artifact, config))
        lengths = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
        tables, first = [], 0
        for n in lengths:
            tables.append(list(range(first, first + -(-n // self.block_size))))
            first += len(tables[-1])
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        kv = allocate_kv_cache(self.spec, first, self.block_size, device)
        scored, left = [], MAX_SCORED_TOKENS  # as many as the scheduler lets a step score
        for n in lengths:
            scored.append(min(n - 1, left))
            left -= scored[-1]
        batch = build_batch(
            [([0] * n, 0, t) for n, t in zip(lengths, tables, strict=True)],
            self.block_size,
            prompt_logits=scored,
            device=device,
        )
        params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, logprobs=5)
        states = [SamplingState(params, [0], [], (), None) for _ in lengths]
        logits = self.executor.forward(batch, kv)
        sample(logits[: len(lengths)], states)
        rows = list(range(len(lengths), batch.num_logits))
        prompt_logprobs(logits, rows, [0] * len(rows), [MAX_LOGPROBS] * len(rows))
        torch.cuda.synchronize(device)
        cache = first * self.block_size * self.spec.bytes_per_token
        activations = torch.cuda.max_memory_allocated(device) - before - cache
        del kv, batch, logits
        torch.cuda.empty_cache()
        used = free_at_start - torch.cuda.mem_get_info(device)[0]
        in_torch = torch.cuda.memory_reserved(device) - reserved_at_start
        return MemoryProfile(
            total, free_at_start, weights, activations, non_torch=max(0, used - in_torch)
        )

    def execute(
        self, chunks: tuple[ScheduledChunk, ...], carried: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [rows, vocab]: one per sampling chunk, then each chunk's `prompt_logits`
        rows, in chunk order. `carried`: the tokens the last step sampled, still on the
        device, for the inputs pending on them."""
        # a decode chunk scores no prompt token: graphs gather only the sampled rows
        if self.graphs is not None and self.graphs.fits(chunks):
            return self.replay(chunks, carried)
        batch = build_batch(
            [
                (c.seq.token_slice(c.start, c.start + c.num_tokens), c.start, c.seq.block_table)
                for c in chunks
            ],
            self.block_size,
            sample=[c.sample for c in chunks],
            prompt_logits=[c.prompt_logits for c in chunks],
            device=self.device,
        )
        if carried is not None:
            batch = replace(batch, token_ids=resolve_pending(batch.token_ids, carried))
        return self.forward(batch)

    def forward(self, batch: BatchInputs) -> torch.Tensor:
        """A step from a batch (piecewise graphs where they hold it, else eager): the logits
        rows `batch.logits_indices` picks."""
        if self.mixed is not None and self.mixed.fits(batch):
            return self.mixed.run(batch)
        return self.executor.forward(batch, self.kv_caches)

    def replay(self, chunks: tuple[ScheduledChunk, ...], carried: torch.Tensor | None):
        """A decode step from its CUDA graph."""
        return self.graphs.run(chunks, carried)
