"""The flattened varlen batch one forward step runs over (DESIGN.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class BatchInputs:
    """B sequences, T tokens in all, prefill chunks and decodes mixed, no padding tokens."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: KV-cache slot (block * block_size + offset)
    query_start: torch.Tensor  # [B + 1] int32: sequence b owns tokens [qs[b], qs[b+1])
    context_lens: torch.Tensor  # [B] int32: cached + new tokens of each sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32: each sequence's blocks, in order
    logits_indices: torch.Tensor  # [B] int64: index in T of each sequence's last token
    max_context_len: int = 0  # max(context_lens), known on the host (kernel launch geometry)
    max_query_len: int = 0  # most new tokens of one sequence: 1 for a decode-only batch

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.query_start.shape[0] - 1

    @property
    def num_sampled(self) -> int:
        """Sequences whose logits are wanted: B, the rows of the logits."""
        return self.logits_indices.shape[0]


def build_batch(
    chunks: list[tuple[list[int], int, list[int]]],
    block_size: int,
    sample: list[bool] | None = None,
    device="cpu",
) -> BatchInputs:
    """Batch from (tokens to compute, position of the first one, block table) per sequence.

    Logits are gathered for the sequences whose `sample` flag is set (default: all).
    """
    token_ids, positions, slots, starts, lens = [], [], [], [0], []
    sample = sample if sample is not None else [True] * len(chunks)
    for tokens, start, table in chunks:
        token_ids += tokens
        pos = range(start, start + len(tokens))
        positions += pos
        slots += [table[p // block_size] * block_size + p % block_size for p in pos]
        starts.append(starts[-1] + len(tokens))
        lens.append(start + len(tokens))
    width = max(len(t) for _, _, t in chunks)
    tables = [t + [0] * (width - len(t)) for _, _, t in chunks]

    def tensor(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

    return BatchInputs(
        token_ids=tensor(token_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        slot_mapping=tensor(slots, torch.int64),
        query_start=tensor(starts, torch.int32),
        context_lens=tensor(lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        max_context_len=max(lens),
        max_query_len=max(len(t) for t, _, _ in chunks),
        logits_indices=tensor(
            [end - 1 for end, keep in zip(starts[1:], sample, strict=True) if keep], torch.int64
        ),
    )
