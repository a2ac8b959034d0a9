"""Compiled models on a real GPU (cubin kernels + cuBLAS) against transformers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

PROMPTS, POSITIONS = 16, 64


def teacher_batch(engine, ids: torch.Tensor):
    """Every position of every prompt in one flat batch, logits wanted at all of them."""
    from runtime.batch import build_batch

    per = -(-ids.shape[1] // engine.runner.block_size)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(ids.shape[0])]
    chunks = [(row.tolist(), 0, t) for row, t in zip(ids, tables)]
    batch = build_batch(chunks, engine.runner.block_size, device="cuda")
    return replace(batch, logits_indices=torch.arange(batch.num_tokens, device="cuda"))


def argmax_agreement(ours, theirs, exact) -> tuple[float, float, float]:
    """Fractions of positions whose argmax agrees: ours with theirs, ours with the exact
    (float32) run's, theirs with the exact run's."""
    top = exact.argmax(-1)
    same = lambda a, b: (a == b).float().mean().item()  # noqa: E731
    return (
        same(ours.argmax(-1), theirs.argmax(-1)),
        same(ours.argmax(-1), top),
        same(theirs.argmax(-1), top),
    )


def teacher_forced(engine, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position: [P * L, vocab]."""
    return engine.runner.executor.forward(teacher_batch(engine, ids), engine.runner.kv_caches)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("qwen3-0.6b", {}),
        ("llama-3.1-8b", {"num_hidden_layers": 4}),
        ("phi-2", {"num_hidden_layers": 4}),  # partial rotary: torch ops there
        ("pythia-410m", {}),
        ("olmo-1b", {"num_hidden_layers": 4}),
    ],
    ids=["qwen3-0.6b", "llama-3.1-8b-4layers", "phi-2-4layers", "pythia-410m", "olmo-1b-4layers"],
)
def test_logits_and_argmax_match_transformers(name, overrides, dtype, tmp_path):
    from benchmarks.models import in_memory_artifact, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.executor import Executor

    # sharp logits, so argmax compares the models and not bf16 noise among near-ties
    model = random_model(name, dtype=getattr(torch, dtype), logit_scale=10.0, **overrides)
    artifact = in_memory_artifact(model, name, tmp_path)
    engine = Engine(artifact, EngineConfig(num_kv_blocks=PROMPTS * POSITIONS // 16 + 16))
    # every generated kernel came from the artifact's cubins: numba compiled nothing
    assert all(
        not k.fn.overloads for op in engine.runner.cubin_ops.values() for k in op.kernels.generated
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (PROMPTS, POSITIONS), generator=g)
    ours = teacher_forced(engine, ids).float()
    plain = Executor(artifact.graph, engine.runner.params)  # torch ops only, the same graph
    reference = plain.forward(teacher_batch(engine, ids), engine.runner.kv_caches).float()
    kernel_err = (ours - reference).abs()
    print(f"{name}: kernels vs torch ops: mean {kernel_err.mean():.4f} max {kernel_err.max():.3f}")
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        theirs = model(ids.cuda()).logits.reshape(PROMPTS * POSITIONS, -1).float()
        exact = model.float()(ids.cuda()).logits.reshape(PROMPTS * POSITIONS, -1)
    scale = theirs.std().item()
    err = (ours - theirs).abs()
    agree, ours_exact, theirs_exact = argmax_agreement(ours, theirs, exact)
    print(
        f"{name} {dtype}: logit std {scale:.3f}, mean |err| {err.mean():.4f}, max |err| "
        f"{err.max():.3f}; argmax: kiln vs hf {agree:.4f}, vs hf fp32: kiln {ours_exact:.4f}, "
        f"hf {theirs_exact:.4f}"
    )
    if dtype == "float32":  # no storage rounding on either side: the models must agree
        assert err.mean().item() < 1e-3 * scale
        assert agree >= 0.99
    else:  # bf16 storage: both sides round activations to 8 mantissa bits at different points
        assert err.mean().item() < 0.03 * scale
        # as close to the float32 truth as transformers' own bf16 run is
        assert ours_exact >= theirs_exact - 0.01


def test_generation_on_gpu_matches_reference_greedy(tmp_path):
    """Continuous batching on the GPU: greedy tokens of a batch equal each request alone."""
    from benchmarks.models import in_memory_artifact, random_model
    from benchmarks.tensor_parallel import generate
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    # float32: bf16 GEMMs of different batch sizes round differently (as in every engine);
    # in float32 that noise is far below the gaps between the logits
    model = random_model("qwen3-0.6b", "cuda", torch.float32, logit_scale=10.0, num_hidden_layers=4)
    artifact = in_memory_artifact(model, "qwen3-small", tmp_path)
    engine = Engine(artifact, EngineConfig(num_kv_blocks=512, max_num_batched_tokens=256))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 77, 300, 1, 129)]

    def run(batch):
        return generate(engine, batch, 24)

    together = run(prompts)
    alone = [run([p])[0] for p in prompts]
    agree = sum(a == b for a, b in zip(together, alone))
    print(f"batched == alone for {agree}/{len(prompts)} requests")
    assert agree == len(prompts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_kernel_node_matches_torch_ops_in_engine_batches(dtype, tmp_path):
    """Each kernel-backed node, fed the torch-op executor's inputs, gives its outputs: over the
    batches the scheduler really makes (chunked prefills over cached context, decodes)."""
    import kiln
    from benchmarks.models import in_memory_artifact, random_model
    from ir.reference import run_op
    from runtime.batch import build_batch
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.executor import allocate_kv_cache, kv_cache_spec

    model = random_model(
        "qwen3-0.6b", "cuda", getattr(torch, dtype), logit_scale=10.0, num_hidden_layers=2
    )
    artifact = in_memory_artifact(model, "qwen3-2l", tmp_path)
    # synchronous steps: compare() builds each batch from the host's tokens
    config = EngineConfig(num_kv_blocks=512, max_num_batched_tokens=256, async_scheduling=False)
    engine = Engine(artifact, config)
    runner, graph = engine.runner, artifact.graph
    kernel_steps = {i: fn for i, (fn, *_rest) in enumerate(runner.executor.plan)}
    covered = set(runner.cubin_ops)
    ref_caches = allocate_kv_cache(kv_cache_spec(graph), 512, runner.block_size, "cuda")
    worst: dict[int, float] = {}

    def compare(chunks, carried=None):  # synchronous steps: carried is always None
        batch = build_batch(
            [
                (c.seq.token_slice(c.start, c.start + c.num_tokens), c.start, c.seq.block_table)
                for c in chunks
            ],
            runner.block_size,
            sample=[c.sample for c in chunks],
            device="cuda",
        )
        ctx_k = runner.executor.context(batch, runner.kv_caches)
        ctx_r = runner.executor.context(batch, ref_caches)
        env = {
            **runner.params,
            **{n: getattr(batch, n) for n in ("token_ids", "positions", "logits_indices")},
        }
        for i, node in enumerate(graph.nodes):
            args = [env[n] if n else None for n in node.inputs]
            want = run_op(node.op, ctx_r, *args)
            if i in covered:
                got = kernel_steps[i](node.op, ctx_k, *args)
                got = got if isinstance(got, tuple) else (got,)
                for g, w in zip(got, want):
                    err = (
                        (g.float() - w.float()).abs().max() / (w.float().abs().max() + 1e-6)
                    ).item()
                    worst[i] = max(worst.get(i, 0.0), err)
            env.update((v.name, w) for v, w in zip(node.outputs, want))
        return env[graph.outputs[0]]

    runner.execute = compare
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 77, 300, 1, 129)]
    kiln_params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, kiln_params)
    while engine.has_unfinished():
        engine.step()
    tolerance = 1e-4 if dtype == "float32" else 2e-2  # relative to the output's largest value
    bad = {i: (type(graph.nodes[i].op).__name__, e) for i, e in worst.items() if e > tolerance}
    print(
        f"{dtype}: worst relative error of a kernel node {max(worst.values()):.2e}; "
        f"over tolerance: {bad}"
    )
    assert not bad


def test_prompt_logprobs_on_gpu_match_transformers(tmp_path):
    """Scoring rows gathered beside sampled ones, in eager steps between graph replays, with
    asynchronous steps: every prompt token's logprob as transformers' log-softmax gives it."""
    from benchmarks.models import in_memory_artifact, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.outputs import merge_update
    from runtime.sampling_params import SamplingParams

    model = random_model("qwen3-0.6b", "cuda", torch.float32, logit_scale=10.0, num_hidden_layers=4)
    artifact = in_memory_artifact(model, "qwen3-small", tmp_path)
    engine = Engine(artifact, EngineConfig(num_kv_blocks=512, max_num_batched_tokens=256))
    assert engine.async_scheduling and engine.runner.graphs is not None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (300, 2, 77, 129)]
    scored = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=5)
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, scored if i != 3 else plain)
    results = {}
    while engine.has_unfinished():
        for update in engine.step():
            results[update.request_id] = merge_update(results.get(update.request_id), update)
    assert results["3"].prompt_logprobs is None
    errors, top_agree = [], []
    for i, p in enumerate(prompts[:3]):
        got = results[str(i)].prompt_logprobs
        assert len(got) == len(p) and got[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p], device="cuda")).logits[0], -1)
        for position, entry in enumerate(got[1:]):
            token = p[position + 1]
            errors.append(abs(entry[token].logprob - ref[position, token].item()))
            best = min(entry, key=lambda t: entry[t].rank)
            top_agree.append(best == ref[position].argmax().item())
    errors = torch.tensor(errors)
    agree = sum(top_agree) / len(top_agree)
    print(
        f"prompt logprobs vs hf (float32): {len(errors)} tokens, mean |err| "
        f"{errors.mean():.2e}, max {errors.max():.2e}; top-1 agreement {agree:.4f}"
    )
    assert errors.mean().item() < 1e-3 and errors.max().item() < 2e-2
    assert agree >= 0.99


def test_sampled_logprobs_on_gpu_stay_asynchronous_and_match_transformers(tmp_path):
    """Logprobs of sampled tokens, computed on the GPU and copied back with the tokens while
    the next step runs: each as transformers' log-softmax of the text so far gives it."""
    from benchmarks.models import in_memory_artifact, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.outputs import merge_update
    from runtime.sampling_params import SamplingParams

    model = random_model("qwen3-0.6b", "cuda", torch.float32, logit_scale=10.0, num_hidden_layers=4)
    artifact = in_memory_artifact(model, "qwen3-small", tmp_path)
    engine = Engine(artifact, EngineConfig(num_kv_blocks=512, max_num_batched_tokens=256))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (40, 3, 130, 65)]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5),
        # the last to finish: its steps alone have only logprobs=0 rows (top-0, empty copies)
        SamplingParams(max_tokens=16, temperature=0.8, seed=1, ignore_eos=True, logprobs=0),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=7, top_k=20, seed=2, ignore_eos=True, logprobs=20),
    ]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    results, overlapped = {}, 0
    while engine.has_unfinished():
        for update in engine.step():
            results[update.request_id] = merge_update(results.get(update.request_id), update)
        overlapped += engine._in_flight is not None and bool(engine._in_flight.logprobs)
    assert overlapped > 0, "no step with logprobs overlapped the next"
    assert results["2"].outputs[0].logprobs is None
    errors = []
    for i in (0, 1, 3):
        out = results[str(i)].outputs[0]
        assert len(out.logprobs) == len(out.token_ids) == params[i].max_tokens
        ids = prompts[i] + out.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids], device="cuda")).logits[0], -1)
        for k, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[len(prompts[i]) - 1 + k]
            assert len(entry) >= params[i].logprobs and token in entry
            errors += [abs(lp.logprob - row[t].item()) for t, lp in entry.items()]
            if params[i].temperature == 0.0:
                assert entry[token].rank == 1 and token == row.argmax().item()
    errors = torch.tensor(errors)
    print(
        f"sampled logprobs vs hf (float32, asynchronous steps, {overlapped} overlapped): "
        f"{len(errors)} logprobs, mean |err| {errors.mean():.2e}, max {errors.max():.2e}"
    )
    assert errors.mean().item() < 1e-3 and errors.max().item() < 2e-2
