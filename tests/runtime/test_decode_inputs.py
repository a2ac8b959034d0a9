"""Decode-graph inputs: the host rows a replay uploads equal what build_batch would make."""

import random

import numpy as np
import torch

from runtime.batch import build_batch, resolve_pending
from runtime.cuda_graphs import bucket_sizes, is_decode, write_decode_inputs
from runtime.sampling_params import SamplingParams
from runtime.scheduler import ScheduledChunk
from runtime.sequence import Sequence, pending

BLOCK, WIDTH, MAX_SEQS, PAD = 4, 8, 6, 99


def decode_chunks(n: int, rng: random.Random) -> list[ScheduledChunk]:
    chunks = []
    for i in range(n):
        length = rng.randint(1, BLOCK * WIDTH)  # tokens so far, the last one computed now
        seq = Sequence(i, str(i), [rng.randrange(1000) for _ in range(length)], SamplingParams())
        seq.block_table = rng.sample(range(50), -(-length // BLOCK))
        chunks.append(ScheduledChunk(seq, length - 1, 1, True))
    return chunks


def buffers():
    return np.full((3, MAX_SEQS), -1, np.int64), np.full(MAX_SEQS * (1 + WIDTH), -1, np.int32)


def test_real_rows_equal_build_batch_and_padding_owns_nothing():
    rng = random.Random(0)
    rows64, flat32 = buffers()
    write_decode_inputs(decode_chunks(6, rng), 6, BLOCK, PAD, rows64, flat32)  # stale rows
    chunks = decode_chunks(3, rng)
    write_decode_inputs(chunks, 5, BLOCK, PAD, rows64, flat32)
    batch = build_batch(
        [(c.seq.token_slice(c.start, c.start + 1), c.start, c.seq.block_table) for c in chunks],
        BLOCK,
    )
    lens, tables = flat32[:MAX_SEQS], flat32[MAX_SEQS:].reshape(MAX_SEQS, WIDTH)
    assert rows64[0, :3].tolist() == batch.token_ids.tolist()
    assert rows64[1, :3].tolist() == batch.positions.tolist()
    assert rows64[2, :3].tolist() == batch.slot_mapping.tolist()
    assert lens[:3].tolist() == batch.context_lens.tolist()
    for i, c in enumerate(chunks):
        assert tables[i, : len(c.seq.block_table)].tolist() == c.seq.block_table
    # rows 3-4 pad the graph of 5: one token in the pad block, whatever was there before
    assert rows64[:, 3:5].tolist() == [[0, 0], [0, 0], [PAD * BLOCK] * 2]
    assert lens[3:5].tolist() == [1, 1] and tables[3:5, 0].tolist() == [PAD, PAD]


def test_buckets_and_decode_steps():
    assert bucket_sizes(256)[:5] == (1, 2, 4, 8, 16) and bucket_sizes(256)[-1] == 256
    assert bucket_sizes(100)[-2:] == (96, 100) and bucket_sizes(1) == (1,)
    (chunk,) = decode_chunks(1, random.Random(1))
    assert is_decode([chunk, chunk])
    prefill = ScheduledChunk(chunk.seq, 0, 2, True)
    partial = ScheduledChunk(chunk.seq, 0, 1, False)  # a one-token prefill chunk, no sample
    assert not is_decode([chunk, prefill]) and not is_decode([partial])


def test_pending_inputs_take_the_carried_tokens():
    ids = torch.tensor([5, pending(0), 7, pending(2), 0])
    carried = torch.tensor([10, 11, 12])
    assert resolve_pending(ids, carried).tolist() == [5, 10, 7, 12, 0]
