"""Engine configuration: one validated object, handed down as narrow pieces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step (prefills are chunked to fit)
    max_model_len: int | None = None  # default: the artifact's
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # or "priority"
    device: str | None = None  # default: "cuda" for a cuda-target artifact, else "cpu"
    # KV-cache size: an explicit block count wins; else a byte budget (CPU, default 2 GiB);
    # on CUDA, what gpu_memory_utilization of the GPU leaves after the weights and the
    # largest step's activations (runtime/memory.py)
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 2 << 30
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (False: every step eager)
    # with cuda_graphs, replay the other steps from graphs captured piecewise, attention eager
    # between the pieces (False: they run eagerly)
    mixed_graphs: bool = True
    # launch each step before the last one's tokens are read back (None: on for a GPU
    # runner); `Engine.step` then returns the tokens one call later
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 1,
            "policy": self.policy in ("fcfs", "priority"),
            "num_kv_blocks": self.num_kv_blocks is None or self.num_kv_blocks >= 1,
            "kv_cache_bytes": self.kv_cache_bytes > 0,
            "gpu_memory_utilization": 0.0 < self.gpu_memory_utilization <= 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid engine config: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
            )
