"""Mixed steps (prefill chunks with decodes) replayed from piecewise CUDA graphs give what
eager steps give."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

CONFIG = dict(num_kv_blocks=512, max_num_seqs=32, max_model_len=1024, max_num_batched_tokens=512)


def _artifact(dtype, tmp_path, layers=4):
    from benchmarks.models import in_memory_artifact, random_model

    model = random_model("qwen3-0.6b", "cuda", dtype, logit_scale=10.0, num_hidden_layers=layers)
    return in_memory_artifact(model, f"qwen3-{layers}l", tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_piecewise_logits_equal_eager_logits(dtype, tmp_path):
    """Batches of odd token counts, the rows past them and the KV cache poisoned: the logits
    of an eager step (float32: 1e-4; bf16: 2% of the logits' spread, the GEMMs' row count
    differs)."""
    from runtime.batch import build_batch
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    engine = Engine(_artifact(dtype, tmp_path), EngineConfig(**CONFIG))
    runner, mixed = engine.runner, engine.runner.mixed
    assert mixed is not None and mixed.buckets[-1] == 512
    with torch.inference_mode():
        for buffer in mixed.shared.buffers():
            buffer.fill_(float("nan"))
    g = torch.Generator().manual_seed(1)
    tables = [list(range(40 * i, 40 * i + 40)) for i in range(6)]
    for lengths in ((37,), (5, 1, 1, 200), (129, 1, 64, 3, 1, 250), (511, 1)):
        chunks = [
            (torch.randint(0, 1000, (n,), generator=g).tolist(), 0, tables[i])
            for i, n in enumerate(lengths)
        ]
        batch = build_batch(
            chunks, runner.block_size, prompt_logits=[min(3, n - 1) for n in lengths], device="cuda"
        )
        # each path reads only the cache its own step wrote: the rest is NaN
        poison(runner.kv_caches)
        got = mixed.run(batch)
        poison(runner.kv_caches)
        expected = runner.executor.forward(batch, runner.kv_caches)
        assert torch.isfinite(got).all()
        err = (got.float() - expected.float()).abs().max().item()
        spread = expected.float().std().item()
        print(f"{dtype} T={batch.num_tokens}: max |err| {err:.2e}, logit std {spread:.2f}")
        assert err <= (1e-4 if dtype == torch.float32 else 0.02 * spread)
    engine.close()


def poison(kv_caches) -> None:
    with torch.inference_mode():
        for k, v in kv_caches:
            k.fill_(float("nan"))
            v.fill_(float("nan"))


def test_piecewise_steps_give_the_eager_tokens_with_less_host_time(tmp_path):
    """Greedy tokens of requests arriving while others decode (chunked prefills mixed with
    decodes): equal to eager mixed steps'; the host time of a mixed step, both ways."""
    import kiln
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.outputs import merge_update

    artifact = _artifact(torch.float32, tmp_path, layers=28)
    g = torch.Generator().manual_seed(2)
    lengths = (3, 77, 700, 1, 129, 16, 17, 40, 5, 250, 64, 333)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]

    def run(engine):
        replays, host, forward = [0], [], engine.runner.forward
        mixed = engine.runner.mixed

        def timed(batch):
            start = time.perf_counter()
            logits = forward(batch)
            host.append(time.perf_counter() - start)
            replays[0] += mixed is not None and mixed.fits(batch)
            return logits

        engine.runner.forward = timed
        results = {}
        for i, p in enumerate(prompts):  # two arrivals a step
            params = kiln.SamplingParams(max_tokens=6 + 2 * i, temperature=0.0, ignore_eos=True)
            engine.add_request(str(i), p, params)
            if i % 2:
                for u in engine.step():
                    results[u.request_id] = merge_update(results.get(u.request_id), u)
        while engine.has_unfinished():
            for u in engine.step():
                results[u.request_id] = merge_update(results.get(u.request_id), u)
        host.sort()
        return [results[str(i)].token_ids for i in range(len(prompts))], replays[0], host

    eager_engine = Engine(artifact, EngineConfig(**CONFIG, mixed_graphs=False))
    eager, none, eager_host = run(eager_engine)
    eager_engine.close()
    start = time.perf_counter()
    engine = Engine(artifact, EngineConfig(**CONFIG))
    made = time.perf_counter() - start
    graphed, replays, graph_host = run(engine)
    mixed = engine.runner.mixed
    print(
        f"mixed step host time (28 layers): eager {eager_host[len(eager_host) // 2] * 1e3:.2f} "
        f"ms, piecewise {graph_host[len(graph_host) // 2] * 1e3:.2f} ms over {replays} steps; "
        f"engine made in {made:.1f} s; the piecewise graphs took {mixed.memory / 2**20:.0f} MiB"
    )
    assert graphed == eager
    assert none == 0 and replays == len(graph_host) >= 5  # every non-decode step
    engine.close()


def test_a_non_owning_view_reads_the_memory_without_holding_it():
    from runtime.mixed_graphs import non_owning

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t = torch.arange(24, dtype=torch.bfloat16, device="cuda").view(4, 6)[:, 1:4]
    view = non_owning(t)
    assert view.dtype == t.dtype and view.shape == t.shape and view.stride() == t.stride()
    assert view.data_ptr() == t.data_ptr() and torch.equal(view, t)
    t.add_(1)
    assert torch.equal(view, t)
    del t
    assert torch.cuda.memory_allocated() == before  # the view did not keep the block
