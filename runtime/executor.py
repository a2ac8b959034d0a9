"""Run an IR graph with the reference ops over a flat batch and a paged KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ir.graph import Graph
from ir.ops import PagedAttention
from ir.reference import REFERENCE, TORCH_DTYPES, RefContext
from runtime.batch import BatchInputs


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def kv_cache_spec(graph: Graph) -> KVCacheSpec:
    attn = [n for n in graph.nodes if isinstance(n.op, PagedAttention)]
    if not attn:
        raise ValueError("graph has no attention layers")
    ops = [n.op for n in attn]
    dtype = TORCH_DTYPES[attn[0].outputs[0].type.dtype]
    if len({(o.num_kv_heads, o.head_dim) for o in ops}) != 1:
        raise ValueError("layers with different KV shapes are not supported")
    return KVCacheSpec(max(o.layer for o in ops) + 1, ops[0].num_kv_heads, ops[0].head_dim, dtype)


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, block_size: int, device="cpu"):
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return tuple(
        tuple(torch.zeros(shape, dtype=spec.dtype, device=device) for _ in "kv")
        for _ in range(spec.num_layers)
    )


class Executor:
    """Interprets the graph node by node; slots are precomputed so a step is a tight loop."""

    def __init__(
        self,
        graph: Graph,
        params: dict[str, torch.Tensor],
        tp_group: torch.distributed.ProcessGroup | None = None,  # what AllReduce sums over
        overrides: dict[int, Callable] | None = None,  # node index -> kernel step (cuda)
    ) -> None:
        self.tp_group = tp_group
        slot: dict[str, int] = {}
        for i in graph.inputs:
            slot[i.value.name] = len(slot)
        for n in graph.nodes:
            for v in n.outputs:
                slot[v.name] = len(slot)
        self.num_slots = len(slot)
        self.slot = slot  # value name -> its index in a step's values
        self.param_slots = [(slot[i.value.name], params[i.value.name]) for i in graph.params]
        self.input_slots = [slot[i.value.name] for i in graph.runtime_inputs]
        self.input_names = [i.value.name for i in graph.runtime_inputs]
        overrides = overrides or {}
        self.output_slot = slot[graph.outputs[0]]
        # a value is dropped after the node that reads it last: a step's peak memory is a
        # few layers' activations, not all of them (a long prefill's add up to gigabytes)
        last_use = {slot[x]: i for i, n in enumerate(graph.nodes) for x in n.inputs if x}
        dead: list[list[int]] = [[] for _ in graph.nodes]
        for s, i in last_use.items():
            if s != self.output_slot:
                dead[i].append(s)
        self.plan = [
            (
                overrides.get(i) or REFERENCE[type(n.op)],
                n.op,
                [None if x is None else slot[x] for x in n.inputs],
                [slot[v.name] for v in n.outputs],
                dead[i],
            )
            for i, n in enumerate(graph.nodes)
        ]

    @torch.inference_mode()
    def forward(self, batch: BatchInputs, kv_caches) -> torch.Tensor:
        """Logits [B, vocab] of each sequence's last token in the batch."""
        env = self.bind(batch)
        self.run(env, self.context(batch, kv_caches), 0, len(self.plan))
        return env[self.output_slot]

    def bind(self, batch: BatchInputs) -> list:
        """A step's values by slot: the weights and the batch's fields, the rest empty."""
        env: list = [None] * self.num_slots
        for s, t in self.param_slots:
            env[s] = t
        for s, name in zip(self.input_slots, self.input_names, strict=True):
            env[s] = getattr(batch, name)
        return env

    def run(self, env: list, ctx: RefContext, start: int, stop: int) -> None:
        """Run nodes [start, stop) of the plan on `env`, dropping each value after its last
        reader."""
        for fn, op, ins, outs, dead in self.plan[start:stop]:
            result = fn(op, ctx, *(None if i is None else env[i] for i in ins))
            if len(outs) == 1:
                env[outs[0]] = result
            else:
                for s, r in zip(outs, result, strict=True):
                    env[s] = r
            for s in dead:
                env[s] = None

    def context(self, batch: BatchInputs, kv_caches) -> RefContext:
        """What the ops see of this step: sizes, batch fields, caches, the TP group."""
        return RefContext(
            sizes={
                "T": batch.num_tokens,
                "B": batch.num_logits,
                "seqs": batch.num_seqs,
                "max_context_len": batch.max_context_len,
                "max_query_len": batch.max_query_len,
            },
            kv_caches=kv_caches,
            slot_mapping=batch.slot_mapping,
            query_start=batch.query_start,
            context_lens=batch.context_lens,
            block_tables=batch.block_tables,
            tp_group=self.tp_group,
        )
