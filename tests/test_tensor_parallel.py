"""Tensor parallelism on the CPU (gloo, 2 ranks): the shard pass, per-rank artifacts, TP=2
greedy tokens equal TP=1, and a dead worker fails the engine fast without leaking processes."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model

import kiln
from compiler.artifact import ArtifactError, load_artifact
from compiler.frontend import trace_model
from compiler.passes.shard import ShardError, shard
from compiler.pipeline import run_pipeline
from ir import ops
from ir.builder import GraphBuilder
from ir.graph import Graph, Input, Node, Value
from ir.reference import RefContext, run_op
from ir.types import TensorType
from runtime.batch import BatchInputs, build_batch
from runtime.config import EngineConfig
from runtime.distributed import TensorParallelError, TensorParallelRunner, pack_batch, unpack_batch
from runtime.engine import Engine
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec

FAMILIES = ("llama", "qwen3", "qwen2")  # GQA + llama3 rope; q/k norms; q/k/v biases
# fp32, the same products summed in another order across ranks: rounding-level differences
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = {}
    for family in FAMILIES:
        src = tmp_path_factory.mktemp(f"{family}_src")
        tiny_model(family).save_pretrained(src, safe_serialization=True)
        art = tmp_path_factory.mktemp(f"{family}_art")
        out[family] = (
            kiln.compile(str(src), art / "tp1"),
            kiln.compile(str(src), art / "tp2", tensor_parallel_size=2),
        )
    return out


@pytest.fixture(scope="module")
def optimized() -> dict[str, tuple[Graph, dict[str, torch.Tensor]]]:
    families = ("llama", "qwen2", "phi", "gpt_neox")
    return {f: run_pipeline(*trace_model(tiny_model(f))) for f in families}


def greedy(n: int) -> kiln.SamplingParams:
    return kiln.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(160) for _ in range(n)] for n in (1, 9, 23, 41, 64)]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} left behind"


def worker_pids(llm) -> list[int]:
    return [p.pid for p in llm.engine.runner.workers.procs]


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_greedy_tokens_equal_tp1(artifacts, family):
    tp1, tp2 = artifacts[family]
    ref = kiln.LLM(tp1, num_kv_blocks=64, max_num_batched_tokens=48)
    expected = [o.token_ids for o in ref.generate(prompts(), greedy(32), use_tqdm=False)]
    # 48-token steps: prefills are chunked and mixed with decodes
    llm = kiln.LLM(tp2, num_kv_blocks=64, max_num_batched_tokens=48)
    pids = worker_pids(llm)
    try:
        assert isinstance(llm.engine.runner, TensorParallelRunner) and len(pids) == 1
        env = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
        assert b"NCCL_NVLS_ENABLE=0" in env and b"TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in env
        outs = llm.generate(prompts(), greedy(32), use_tqdm=False)
        assert [o.token_ids for o in outs] == expected
        assert all(len(t) == 32 for t in expected)
    finally:
        llm.engine.runner.close()
    assert_gone(pids)


def test_tp2_of_a_single_kv_head_model_gives_tp1_tokens(tmp_path):
    """MQA: the one KV head replicated on both ranks, each caching it for its query heads."""
    model = tiny_model("qwen3", num_key_value_heads=1)
    tp1 = kiln.compile(model, tmp_path / "tp1")
    tp2 = kiln.compile(model, tmp_path / "tp2", tensor_parallel_size=2)
    with kiln.LLM(tp1, num_kv_blocks=64, max_num_batched_tokens=48) as llm:
        expected = [o.token_ids for o in llm.generate(prompts(3), greedy(24), use_tqdm=False)]
    with kiln.LLM(tp2, num_kv_blocks=64, max_num_batched_tokens=48) as llm:
        outs = llm.generate(prompts(3), greedy(24), use_tqdm=False)
    assert [o.token_ids for o in outs] == expected


def test_tp2_with_asynchronous_steps_gives_tp1_tokens(artifacts):
    """Each step launched before the last one's tokens are read back: rank 0 sends the
    workers inputs that take those tokens from its device."""
    tp1, tp2 = artifacts["llama"]
    ref = kiln.LLM(tp1, num_kv_blocks=64, max_num_batched_tokens=48, async_scheduling=False)
    expected = [o.token_ids for o in ref.generate(prompts(1), greedy(24), use_tqdm=False)]
    llm = kiln.LLM(tp2, num_kv_blocks=64, max_num_batched_tokens=48, async_scheduling=True)
    try:
        assert llm.engine.async_scheduling
        outs = llm.generate(prompts(1), greedy(24), use_tqdm=False)
        assert [o.token_ids for o in outs] == expected
    finally:
        llm.engine.runner.close()


def test_tp2_prompt_logprobs_equal_tp1(artifacts):
    """A step's scoring rows (prompt logprobs) come after its sampled rows on every rank."""
    tp1, tp2 = artifacts["llama"]
    params = kiln.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    with kiln.LLM(tp1, num_kv_blocks=64, max_num_batched_tokens=48) as llm:
        ref = llm.generate(prompts(4), params, use_tqdm=False)
    with kiln.LLM(tp2, num_kv_blocks=64, max_num_batched_tokens=48) as llm:
        outs = llm.generate(prompts(4), params, use_tqdm=False)
    for want, got in zip(ref, outs, strict=True):
        assert got.token_ids == want.token_ids
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(want.prompt_token_ids)
        for a, b in zip(want.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True):
            assert a.keys() == b.keys()
            for t in a:
                assert b[t].logprob == pytest.approx(a[t].logprob, abs=LOGITS_ATOL)


def test_tp2_teacher_forced_logits_equal_tp1(artifacts):
    """Rank 0's `forward` runs one eager batch on every rank: the TP benchmark's parity check
    (benchmarks/tensor_parallel.py) teacher-forces both runs along TP=1's greedy tokens."""
    from benchmarks.tensor_parallel import compare, greedy_run

    tp1, tp2 = artifacts["llama"]
    options = dict(num_kv_blocks=64, enable_prefix_caching=False)
    ref = greedy_run(kiln.LLM(tp1, **options).engine, prompts(2), 16)
    llm = kiln.LLM(tp2, **options)
    try:
        report = compare(ref, greedy_run(llm.engine, prompts(2), 16, along=ref))
    finally:
        llm.engine.runner.close()
    assert report["equal"] == 5 and report["within_tolerance"]
    assert report["max_err_std"] < 1e-4 and report["teacher_forced_argmax_agreement"] == 1.0


def test_parity_report_tells_near_ties_from_real_differences():
    from benchmarks.tensor_parallel import Greedy, compare

    logits = torch.randn(2, 3, 10).to(torch.bfloat16).float()
    logits[0, 1, 4], logits[0, 1, 7] = 5.0, 5.0 - 2 * 2**-5  # two bf16 ulps apart at 5
    ref = Greedy([[1, 4, 2], [3, 3, 3]], logits, torch.bfloat16)
    flip = compare(ref, Greedy([[1, 7, 9], [3, 3, 3]], logits.clone(), torch.bfloat16))
    assert flip["equal"] == 1 and flip["divergences"][0]["position"] == 1
    assert flip["divergences"][0]["margin_ulps"] == 2.0
    assert flip["within_tolerance"] and flip["max_err_std"] == 0.0
    logits[0, 1, 7] = 4.0  # 32 ulps behind: no rounding explains the flip
    flip = compare(ref, Greedy([[1, 7, 9], [3, 3, 3]], logits.clone(), torch.bfloat16))
    assert not flip["within_tolerance"]


@pytest.mark.parametrize("when", ["between steps", "during a step"])
def test_dead_worker_makes_generate_raise_promptly(artifacts, when):
    llm = kiln.LLM(artifacts["llama"][1], num_kv_blocks=64)
    pids = worker_pids(llm)
    try:
        llm.generate([[1, 2, 3]], greedy(2), use_tqdm=False)
        delay = 0.0 if when == "between steps" else 0.5  # into a 400-token generation
        kill = threading.Timer(delay, os.kill, (pids[0], signal.SIGKILL))
        kill.start()
        if when == "between steps":
            kill.join()
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1|step failed"):
            llm.generate(prompts(), greedy(400), use_tqdm=False)
        assert time.monotonic() - start < 30
        assert not llm.engine.requests  # generate took its requests back
        with pytest.raises(TensorParallelError):  # and the engine stays dead
            llm.generate([[1, 2, 3]], greedy(2), use_tqdm=False)
    finally:
        llm.engine.runner.close()
    assert_gone(pids)


def test_worker_that_cannot_start_fails_the_engine(artifacts, tmp_path):
    broken = tmp_path / "broken"
    broken.symlink_to(artifacts["llama"][1], target_is_directory=True)
    artifact = load_artifact(broken)
    broken.unlink()  # rank 1 finds no artifact: it must not hang rank 0
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 .* exited with code 1"):
        Engine(artifact, EngineConfig(num_kv_blocks=8))
    assert time.monotonic() - start < 30
    assert not dist.is_initialized()  # rank 0 left its half-made group


def reassemble(parts: list[torch.Tensor], original: torch.Tensor, bounds) -> torch.Tensor:
    """Undo the cut: per segment, the ranks' pieces in rank order."""
    dim = next(d for d in range(original.dim()) if parts[0].shape[d] != original.shape[d])
    tp, pieces, offset = len(parts), [], 0
    for start, end in bounds or [(0, original.shape[dim])]:
        width = (end - start) // tp
        pieces += [p.narrow(dim, offset, width) for p in parts]
        offset += width
    return torch.cat(pieces, dim)


def column_bounds(graph: Graph, weight: str):
    """Segments of the Linear using `weight`, from the Slices of its output."""
    users = graph.users()
    (linear,) = users[weight]
    return sorted({(s.op.start, s.op.end) for s in users[linear.outputs[0].name]})


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shard_splits_weights_and_heads(optimized, family):
    graph, params = optimized[family]
    sharded, ranks = shard(graph, params, 2)
    counts = sharded.op_counts()
    assert counts["AllReduce"] == 2 * counts["PagedAttention"]  # after o_proj and down
    assert counts["Linear"] == graph.op_counts()["Linear"]
    for node in (n for n in sharded.nodes if isinstance(n.op, ops.PagedAttention)):
        assert (node.op.num_heads, node.op.num_kv_heads) == (2, 1)
    split = 0
    for name, original in params.items():
        if name not in ranks[0]:
            continue
        parts = [r[name] for r in ranks]
        if parts[0].shape == original.shape:  # replicated: embeddings, norms, LM head
            assert all(p is original for p in parts)
            continue
        split += 1
        if parts[0].shape[0] != original.shape[0]:  # column-parallel weight or bias
            bounds = column_bounds(graph, name if original.dim() == 2 else weight_of(graph, name))
        else:  # row-parallel: input columns
            bounds = None
        assert torch.equal(reassemble(parts, original, bounds), original)
    biases = 2 if family == "qwen2" else 0
    assert split == 4 * 2 + biases  # per layer: qkv, o, gate_up, down (+ the qkv bias)


def weight_of(graph: Graph, bias: str) -> str:
    (linear,) = graph.users()[bias]
    return linear.inputs[1]


def lockstep(graph: Graph, rank_params, batch, caches) -> list[torch.Tensor]:
    """Every rank's copy of the graph run side by side; AllReduce sums the ranks' operands."""
    inputs = {i.value.name: getattr(batch, i.value.name) for i in graph.runtime_inputs}
    envs = [{**inputs, **p} for p in rank_params]
    ctxs = [context(batch, c) for c in caches]
    for node in graph.nodes:
        args = [[env[n] if n else None for n in node.inputs] for env in envs]
        if isinstance(node.op, ops.AllReduce):
            results = [(sum(a[0] for a in args),)] * len(envs)
        else:
            results = [run_op(node.op, ctx, *a) for ctx, a in zip(ctxs, args)]
        for env, res in zip(envs, results):
            env.update((v.name, r) for v, r in zip(node.outputs, res))
    return [env[graph.outputs[0]] for env in envs]


def context(batch, caches) -> RefContext:
    return RefContext(
        {"T": batch.num_tokens, "B": batch.num_logits},
        caches,
        batch.slot_mapping,
        batch.query_start,
        batch.context_lens,
        batch.block_tables,
    )


# phi: q/k/v and fc1 merged into one column-parallel projection, partial rotary (slices,
# ropes and concats of split heads), biases on the row-parallel dense and fc2; gpt_neox: a
# per-head [q|k|v] projection and a lone up-projection, each one column-parallel segment
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi", "gpt_neox"])
def test_sharded_ranks_compute_the_unsharded_logits(optimized, family):
    assert_ranks_compute_the_unsharded_logits(*optimized[family])


def test_a_lone_k_projection_of_one_kv_head_is_replicated():
    """k without the bias q and v have: not merged with them, its own Linear, whose one
    segment is cut into num_kv_heads parts as a merged k slice would be."""
    model = tiny_model("qwen2", num_key_value_heads=1)
    for layer in model.model.layers:
        layer.self_attn.k_proj.bias = None
    graph, params = run_pipeline(*trace_model(model))
    assert graph.op_counts()["Linear"] > 4 * 2 + 1  # k stayed apart
    assert_ranks_compute_the_unsharded_logits(graph, params, 2)


def assert_ranks_compute_the_unsharded_logits(graph: Graph, params, tp: int = 2) -> None:
    sharded, ranks = shard(graph, params, tp)
    full = Executor(graph, params)
    full_cache = allocate_kv_cache(kv_cache_spec(graph), 4, 16)
    rank_caches = [allocate_kv_cache(kv_cache_spec(sharded), 4, 16) for _ in ranks]
    rng = random.Random(1)
    seqs = [[rng.randrange(160) for _ in range(n)] for n in (7, 13)]
    steps = [  # a prefill of both sequences, then a decode of both over the cache
        [(seqs[0], 0, [2]), (seqs[1], 0, [0])],
        [([5], 7, [2]), ([11], 13, [0])],
    ]
    for chunks in steps:
        batch = build_batch(chunks, 16)
        expected = full.forward(batch, full_cache)
        for logits in lockstep(sharded, ranks, batch, rank_caches):
            torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)


def test_shard_refuses_what_it_cannot_split(optimized):
    graph, params = optimized["llama"]  # 4 heads, 2 KV heads
    with pytest.raises(ShardError, match="num_heads=4 is not divisible by tensor_parallel_size=3"):
        shard(graph, params, 3)
    graph, params = run_pipeline(*trace_model(tiny_model("llama", num_attention_heads=12)))
    with pytest.raises(ShardError, match="num_kv_heads=2 neither is divisible by nor divides"):
        shard(graph, params, 3)  # 12 heads split, but 2 KV heads cannot be shared by 3 ranks


# fewer KV heads than ranks: each KV head replicated on tp // num_kv_heads ranks (vLLM's
# rule); qwen3's k norm sits between its k slice and the attention
@pytest.mark.parametrize(
    ("family", "kv_heads", "tp"), [("llama", 1, 2), ("llama", 2, 4), ("qwen3", 1, 4)]
)
def test_fewer_kv_heads_than_ranks_are_replicated(family, kv_heads, tp):
    graph, params = run_pipeline(*trace_model(tiny_model(family, num_key_value_heads=kv_heads)))
    sharded, ranks = shard(graph, params, tp)
    for node in (n for n in sharded.nodes if isinstance(n.op, ops.PagedAttention)):
        assert (node.op.num_heads, node.op.num_kv_heads) == (4 // tp, 1)
    qkv = next(  # layer 0's merged q/k/v projection: three segments
        n.inputs[1]
        for n in graph.nodes
        if isinstance(n.op, ops.Linear) and len(column_bounds(graph, n.inputs[1])) == 3
    )
    (_, q_end), (_, k_end), _ = column_bounds(graph, qkv)
    head_dim = (k_end - q_end) // kv_heads
    for r, rank in enumerate(ranks):  # q rows, then KV head r * kv_heads // tp's k and v rows
        head = r * kv_heads // tp
        q = params[qkv][r * q_end // tp : (r + 1) * q_end // tp]
        k = params[qkv][q_end + head * head_dim :][:head_dim]
        v = params[qkv][k_end + head * head_dim :][:head_dim]
        assert torch.equal(rank[qkv], torch.cat([q, k, v]))
    assert_ranks_compute_the_unsharded_logits(graph, params, tp)


def test_a_row_parallel_bias_is_added_once_after_the_sum(optimized):
    graph, params = optimized["llama"]
    o_proj = next(
        n for n in graph.nodes if isinstance(n.op, ops.Linear) and n.inputs[2:] == (None,)
    )
    bias = Input(
        Value("o_bias", TensorType((o_proj.outputs[0].type.shape[-1],), "float32")), "param"
    )
    with_bias = Graph(
        (*graph.inputs, bias),
        tuple(
            Node(n.op, (*n.inputs[:2], "o_bias"), n.outputs) if n is o_proj else n
            for n in graph.nodes
        ),
        graph.outputs,
    )
    params = {**params, "o_bias": torch.randn(48, generator=torch.Generator().manual_seed(0))}
    sharded, ranks = shard(with_bias, params, 2)
    (add,) = sharded.users()["o_bias"]
    assert isinstance(add.op, ops.Binary) and add.op.fn == "add"
    assert all(r["o_bias"] is params["o_bias"] for r in ranks)  # replicated, not cut
    assert_ranks_compute_the_unsharded_logits(with_bias, params)


def linear_then(op, *operands: str) -> Graph:
    """x @ w, then `op` of it and the runtime inputs `operands` ([1, T, 4] each)."""
    b = GraphBuilder()
    x = b.input("x", TensorType((1, "T", 8), "float32"))
    y = b.add1(ops.Linear(), x, b.input("w", TensorType((4, 8), "float32"), kind="param"))
    others = [b.input(n, TensorType((1, "T", 4), "float32")) for n in operands]
    return b.build((b.add1(op, y, *others),))


def test_shard_refuses_unrecognized_linears():
    w = {"w": torch.zeros(4, 8)}
    with pytest.raises(ShardError, match="Binary -> %binary: mixing split and replicated"):
        shard(linear_then(ops.Binary("mul"), "z"), w, 2)
    with pytest.raises(ShardError, match=r"cannot shard Mean .* cannot take a tensor-parallel"):
        shard(linear_then(ops.Mean((-1,), True)), w, 2)
    with pytest.raises(ShardError, match="graph output %slice would be split"):
        shard(linear_then(ops.Slice(-1, 0, 4)), w, 2)
    # elementwise ops of its output alone up to the graph output: an LM head, kept whole
    graph, ranks = shard(linear_then(ops.Unary("tanh")), w, 2)
    assert all(r["w"] is w["w"] for r in ranks) and "AllReduce" not in graph.op_counts()


def test_artifact_holds_weights_per_rank(artifacts, optimized):
    tp1, tp2 = artifacts["llama"]
    assert "tensor_parallel_size" not in load_artifact(tp1).manifest
    assert (tp1 / "weights" / "shard-00000.safetensors").is_file()
    with pytest.raises(ArtifactError, match="no rank 1"):
        load_artifact(tp1, rank=1)
    ranks = [load_artifact(tp2, rank=r) for r in range(2)]
    assert ranks[0].manifest["tensor_parallel_size"] == 2
    assert ranks[0].manifest["architecture"]["num_heads"] == 4  # of the whole model
    _, expected = shard(*optimized["llama"], 2)
    for art, want in zip(ranks, expected):
        assert art.params.keys() == want.keys()
        assert all(torch.equal(art.params[k], want[k]) for k in want)
    with pytest.raises(ArtifactError, match="no rank 2"):
        load_artifact(tp2, rank=2)


def test_batch_survives_packing():
    rng = random.Random(3)
    chunks = [
        ([rng.randrange(160) for _ in range(n)], start, rng.sample(range(50), k))
        for n, start, k in ((5, 0, 1), (1, 37, 3), (12, 16, 2))
    ]
    batch = build_batch(chunks, 16, sample=[True, True, False], prompt_logits=[4, 0, 2])
    assert batch.num_logits == 2 + 4 + 2
    header, payload = pack_batch(1, batch)
    back = unpack_batch(header.tolist(), payload)
    for f in fields(BatchInputs):  # every field, so one added later cannot be left behind
        want, got = getattr(batch, f.name), getattr(back, f.name)
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want), f.name
        else:
            assert got == want, f.name
