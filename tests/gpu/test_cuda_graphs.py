"""Decode steps replayed from CUDA graphs give what eager steps give."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_graph_replay_equals_eager_steps(tmp_path):
    import kiln
    from benchmarks.models import in_memory_artifact, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.outputs import merge_update

    # float32: the graphs split attention into other context splits (captured for the longest
    # context), which only reorders float32 sums: far below the gaps between the logits
    model = random_model("qwen3-0.6b", "cuda", torch.float32, logit_scale=10.0, num_hidden_layers=4)
    artifact = in_memory_artifact(model, "qwen3-small", tmp_path)
    config = dict(num_kv_blocks=512, max_num_seqs=32, max_model_len=1024)
    g = torch.Generator().manual_seed(2)
    lengths = (3, 77, 300, 1, 129, 16, 17, 40, 5, 250, 64)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]

    def run(engine):
        """Greedy tokens (outputs of several lengths, so the batch shrinks through the
        buckets), the number of graph replays and the host time of decode steps."""
        replays, host = [0], []
        execute, graphs = engine.runner.execute, engine.runner.graphs

        def counted(chunks, carried=None):
            start = time.perf_counter()
            logits = execute(chunks, carried)
            if all(c.num_tokens == 1 for c in chunks):
                host.append(time.perf_counter() - start)
            replays[0] += graphs is not None and graphs.fits(chunks)
            return logits

        engine.runner.execute = counted
        for i, p in enumerate(prompts):
            params = kiln.SamplingParams(max_tokens=8 + 3 * i, temperature=0.0, ignore_eos=True)
            engine.add_request(str(i), p, params)
        results = {}
        while engine.has_unfinished():
            for u in engine.step():
                results[u.request_id] = merge_update(results.get(u.request_id), u)
        host.sort()
        return [results[str(i)].token_ids for i in range(len(prompts))], replays[0], host

    eager, none, eager_host = run(Engine(artifact, EngineConfig(**config, cuda_graphs=False)))
    engine = Engine(artifact, EngineConfig(**config))
    assert engine.runner.graphs is not None and none == 0
    graphed, replays, graph_host = run(engine)
    print(
        f"decode host time per step: eager {eager_host[len(eager_host) // 2] * 1e3:.2f} ms, "
        f"graph {graph_host[len(graph_host) // 2] * 1e3:.2f} ms; {replays} graph replays"
    )
    assert replays > 30  # the decode steps really ran from the graphs
    assert graphed == eager
    # each step launched before the last one's tokens were read back (the default here),
    # against steps run to their end: the same tokens
    assert engine.async_scheduling
    synchronous = Engine(artifact, EngineConfig(**config, async_scheduling=False))
    assert run(synchronous)[0] == graphed


# a fresh process: torch reads the cuBLASLt workspace size at its first cuBLASLt call
_ONE_ROW_GEMMS = """
import json
import torch
from torch.profiler import ProfilerActivity, profile
from runtime.cuda_graphs import decode_gemms

def kernels(run):
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]

for n, k in ((4096, 4096), (4096, 14336)):  # Llama-3.1-8B's O and down projections
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    xk = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    eager = kernels(lambda: torch.nn.functional.linear(xk, w))
    with decode_gemms():
        torch.nn.functional.linear(xk, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.nn.functional.linear(xk, w)
    graph.replay()
    ref = xk.double() @ w.double().t()
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    print(json.dumps({"shape": [n, k], "eager": eager, "graph": kernels(graph.replay), "err": err}))
"""


def test_decode_graph_gemms_run_as_one_kernel():
    """Captured one-row GEMMs run as one kernel each (no split-K reduce), within bf16 error."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _ONE_ROW_GEMMS], capture_output=True, text=True, cwd=root
    )
    assert result.returncode == 0, result.stderr
    gemms = [json.loads(line) for line in result.stdout.splitlines()]
    for g in gemms:
        print(g["shape"], f"eager {g['eager']}, graph {g['graph']}, error {g['err']:.1e}")
    assert len(gemms) == 2
    assert all(len(g["graph"]) == 1 and g["err"] < 1e-2 for g in gemms)


def test_one_token_graph_runs_the_fused_norm_gemvs(tmp_path):
    """A lone sequence's decode step, replayed from its graph, runs the NormLinear GEMVs (the
    norm inside each block) in place of AddRMSNorm + cuBLAS + SiLU-mul, and gives the eager
    step's tokens."""
    from torch.profiler import ProfilerActivity, profile

    import kiln
    from benchmarks.models import in_memory_artifact, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    layers = 4
    model = random_model("qwen3-0.6b", "cuda", torch.float32, 10.0, num_hidden_layers=layers)
    artifact = in_memory_artifact(model, "qwen3-small", tmp_path)
    prompt = torch.randint(0, 1000, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    params = kiln.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def run(engine):
        """Greedy tokens; the CUDA kernels of the step that makes the 12th, and the graph
        replays in that step."""
        replays, graphs = [0], engine.runner.graphs
        if graphs is not None:
            replay = graphs.run

            def counted(*args):
                replays[0] += 1
                return replay(*args)

            graphs.run = counted
        engine.add_request("0", prompt, params)
        tokens, names, replayed = [], [], 0
        while engine.has_unfinished():
            if len(tokens) == 11:
                before = replays[0]
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    tokens += [t for u in engine.step() for t in u.token_ids]
                    torch.cuda.synchronize()
                names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
                replayed = replays[0] - before
            else:
                tokens += [t for u in engine.step() for t in u.token_ids]
        return tokens, names, replayed

    config = dict(num_kv_blocks=64, max_num_seqs=4, max_model_len=256, async_scheduling=False)
    eager, _, none = run(Engine(artifact, EngineConfig(**config, cuda_graphs=False)))
    graphed, names, replayed = run(Engine(artifact, EngineConfig(**config)))
    assert none == 0 and replayed == 1  # the profiled step was one graph replay
    count = lambda family: sum(family in n for n in names)  # noqa: E731
    print(f"one-token step: {len(names)} kernels, {count('norm_gemv')} norm_gemv")
    assert graphed == eager and len(graphed) == 24
    # layer 0's QKV has no residual add before it (an RMSNorm + cuBLAS): every other layer's
    # QKV and every layer's gate/up run as one GEMV each; one AddRMSNorm left, the final norm
    assert count("norm_gemv") == 2 * layers - 1
    assert count("add_rmsnorm") == 1 and count("silu_mul") == 0
