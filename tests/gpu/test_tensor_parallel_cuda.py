"""Tensor parallelism over two GPUs (NCCL): TP=2 gives TP=1's greedy tokens, with decode
steps replayed from CUDA graphs that hold the all-reduces, and with every step eager; every
family that shards (and a custom module) does so in float32."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from serving import children

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


def tiny_source(kind: str) -> torch.nn.Module:
    from conftest import tiny_model
    from custom_decoder import decoder

    if kind == "mqa":
        return tiny_model("qwen3", num_key_value_heads=1)
    if kind == "softcap":
        return decoder(layers=2, logit_softcap=2.0)
    return decoder(layers=3) if kind == "custom" else tiny_model(kind)


# phi: merged q/k/v + fc1, partial rotary, row-parallel biases; gpt_neox: parallel residual,
# LayerNorm; olmo: weightless LayerNorm; mqa: one KV head, replicated on both ranks; custom:
# a decoder written from scratch (kiln.attention); softcap: one capping its logits
KINDS = ["phi", "gpt_neox", "olmo", "mqa", "custom", "softcap"]


@pytest.mark.parametrize("kind", KINDS)
def test_tp2_families_in_float32_give_tp1_greedy_tokens(kind, tmp_path):
    import kiln

    model = tiny_source(kind)  # float32 parameters: a float32 artifact
    options = dict(target="cuda", max_model_len=128)
    tp1 = kiln.compile(model, tmp_path / "tp1", **options)
    tp2 = kiln.compile(model, tmp_path / "tp2", tensor_parallel_size=2, **options)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (1, 7, 30, 61)]
    params = kiln.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine = dict(num_kv_blocks=64, max_num_batched_tokens=32)  # chunked, mixed prefills
    with kiln.LLM(tp1, **engine) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with kiln.LLM(tp2, **engine) as llm:
        assert llm.engine.runner.graphs is not None  # decode steps replay graphs
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    print(f"TP=2 {kind} float32: {sum(a == b for a, b in zip(got, want))}/4 equal to TP=1")
    assert got == want and all(len(t) == 24 for t in want)


@pytest.mark.timeout(300, method="thread")  # a hang ends the session with every stack
def test_rank0_failing_its_graph_capture_fails_the_engine(tmp_path, monkeypatch):
    """Rank 0 runs out of memory while capturing (as next to another process's cache):
    the engine raises and the worker is gone, instead of hanging in NCCL's teardown."""
    import torch.distributed as dist

    from benchmarks.models import random_model, sharded_artifact
    from runtime.config import EngineConfig
    from runtime.cuda_graphs import DecodeGraphs
    from runtime.distributed import TensorParallelError
    from runtime.engine import Engine

    capture = DecodeGraphs.capture

    def out_of_memory_at_second_graph(graphs):
        forward, calls = graphs.executor.forward, [0]

        def failing(*args):  # 1: the warm-up step, 2: the largest graph, 3: the next one
            calls[0] += 1
            if calls[0] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 0)")
            return forward(*args)

        graphs.executor.forward = failing
        try:
            capture(graphs)
        finally:
            del graphs.executor.forward

    monkeypatch.setattr(DecodeGraphs, "capture", out_of_memory_at_second_graph)
    model = random_model("qwen3-0.6b", num_hidden_layers=2)
    artifact = sharded_artifact(model, "qwen3-2l", tmp_path / "tp2", 2)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="injected on rank 0"):
        Engine(artifact, EngineConfig(num_kv_blocks=64, max_num_seqs=8))
    print(f"rank 0's failed capture raised in {time.monotonic() - start:.1f} s")
    assert time.monotonic() - start < 60
    assert not dist.is_initialized() and not children(os.getpid())
