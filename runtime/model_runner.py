"""Model runner: owns the device state (weights, KV cache) and runs one step's batch."""

from __future__ import annotations

import logging

import torch

from compiler.artifact import Artifact
from runtime.batch import build_batch
from runtime.config import EngineConfig
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec
from runtime.scheduler import ScheduledChunk

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, artifact: Artifact, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.block_size = artifact.manifest["block_size"]
        params = {k: v.to(self.device) for k, v in artifact.params.items()}
        self.executor = Executor(artifact.graph, params)
        self.spec = kv_cache_spec(artifact.graph)
        self.num_blocks = config.num_kv_blocks or self._blocks_for(config)
        self.kv_caches = allocate_kv_cache(self.spec, self.num_blocks, self.block_size, self.device)
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_tokens,
            self.num_tokens * self.spec.bytes_per_token / 2**20,
        )

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _blocks_for(self, config: EngineConfig) -> int:
        budget = config.kv_cache_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * config.gpu_memory_utilization)
        return max(1, budget // (self.spec.bytes_per_token * self.block_size))

    def execute(self, chunks: tuple[ScheduledChunk, ...]) -> torch.Tensor:
        """Logits [number of sampling chunks, vocab], in chunk order."""
        batch = build_batch(
            [
                (c.seq.token_slice(c.start, c.start + c.num_tokens), c.start, c.seq.block_table)
                for c in chunks
            ],
            self.block_size,
            sample=[c.sample for c in chunks],
            device=self.device,
        )
        return self.executor.forward(batch, self.kv_caches)
