"""Tensor parallelism over two GPUs (NCCL): TP=2 gives TP=1's greedy tokens, with decode
steps replayed from CUDA graphs that hold the all-reduces, and with every step eager."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs"),
]


def test_tp2_on_two_gpus_gives_tp1_greedy_tokens(tmp_path):
    from benchmarks.models import in_memory_artifact, random_model, sharded_artifact
    from benchmarks.tensor_parallel import compare, free, greedy_run, w3_config
    from runtime.distributed import STOP_TIMEOUT_S
    from runtime.engine import Engine

    name = "llama-3.1-8b"
    model = random_model(name, num_hidden_layers=4)  # the 8B's layers, four of them
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(16, 300, (16,), generator=g).tolist()
    prompts = [torch.randint(0, 128256, (n,), generator=g).tolist() for n in lengths]
    tp1 = in_memory_artifact(model, name, tmp_path / "tp1")
    tp2 = sharded_artifact(model, name, tmp_path / "tp2", 2)
    del model
    engine = Engine(tp1, w3_config())
    ref = greedy_run(engine, prompts, 32)
    engine.close()
    del engine, tp1
    free()

    for graphs in (True, False):
        engine = Engine(tp2, replace(w3_config(), cuda_graphs=graphs))
        runner, replays = engine.runner, [0]
        pids = [p.pid for p in runner.workers.procs]
        assert (runner.graphs is not None) == graphs and engine.async_scheduling
        replay = runner.replay

        def counted(chunks, carried, replay=replay, replays=replays):
            replays[0] += 1
            return replay(chunks, carried)

        runner.replay = counted
        start = time.perf_counter()
        report = compare(ref, greedy_run(engine, prompts, 32, along=ref))
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        engine.close()
        closing = time.perf_counter() - start
        del engine, runner, replay, counted
        free()
        print(
            f"TP=2 graphs={graphs}: {replays[0]} graph replays, {seconds:.1f} s, closed in "
            f"{closing:.2f} s: {report}"
        )
        assert closing < STOP_TIMEOUT_S  # every worker stopped by itself, none was killed
        assert replays[0] >= (31 if graphs else 0) and (replays[0] > 0) == graphs
        # the same kernels as TP=1 but for sums split across the ranks: rounding-level
        # differences only (a wrong shard or a lost all-reduce moves the logits by ~1 std)
        assert report["mean_err_std"] < 0.02
        assert report["within_tolerance"], report["divergences"]  # flips only at near-ties
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # workers gone
