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
    # [R] int64: the rows of the logits, as indices in T: each sampled sequence's last token,
    # then any tokens whose logits score the prompt (prompt logprobs)
    logits_indices: torch.Tensor
    max_context_len: int = 0  # max(context_lens), known on the host (kernel launch geometry)
    max_query_len: int = 0  # most new tokens of one sequence: 1 for a decode-only batch

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.query_start.shape[0] - 1

    @property
    def num_logits(self) -> int:
        """R, the rows of the logits."""
        return self.logits_indices.shape[0]


def build_batch(
    chunks: list[tuple[list[int], int, list[int]]],
    block_size: int,
    sample: list[bool] | None = None,
    prompt_logits: list[int] | None = None,
    device="cpu",
) -> BatchInputs:
    """Batch from (tokens to compute, position of the first one, block table) per sequence.

    Logits are gathered for the last token of the sequences whose `sample` flag is set
    (default: all), then for the first `prompt_logits[b]` tokens of each sequence b.
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
    tables = [x for _, _, t in chunks for x in t + [0] * (width - len(t))]
    sampled = [end - 1 for end, keep in zip(starts[1:], sample, strict=True) if keep]
    for first, count in zip(starts[:-1], prompt_logits or [0] * len(chunks), strict=True):
        sampled += range(first, first + count)
    max_context_len = max(lens)
    wide, narrow = _to_device(
        (token_ids, positions, slots, sampled), (starts, lens, tables), torch.device(device)
    )
    token_ids, positions, slots, sampled = wide
    starts, lens, tables = narrow
    return BatchInputs(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slots,
        query_start=starts,
        context_lens=lens,
        block_tables=tables.view(len(chunks), width),
        max_context_len=max_context_len,
        max_query_len=max(len(t) for t, _, _ in chunks),
        logits_indices=sampled,
    )


def resolve_pending(token_ids: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """token_ids with each pending input (`sequence.pending(j)`, negative) replaced by
    carried[j], the tokens the last step sampled, on the device: no wait for the host."""
    rows = torch.where(token_ids < 0, ~token_ids, 0)  # ~x == -1 - x
    return torch.where(token_ids < 0, carried[rows], token_ids)


def _to_device(wide: tuple[list[int], ...], narrow: tuple[list[int], ...], device: torch.device):
    """The int64 fields and the int32 fields, each packed into one host tensor (pinned when
    bound for a GPU, so the copy is asynchronous): two copies a step, not seven."""
    out = []
    for fields, dtype in ((wide, torch.int64), (narrow, torch.int32)):
        values = [x for f in fields for x in f]
        # pinned from torch's caching host allocator (a block is reused once its copy is done)
        host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
        packed = host.to(device, non_blocking=True)
        out.append(packed.split([len(f) for f in fields]))
    return out
