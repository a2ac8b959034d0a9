"""`kiln run` of a tensor-parallel CUDA artifact on two GPUs: it serves TP=1's greedy tokens,
and when a worker dies /health says 503 and the server exits non-zero instead of hanging."""

from __future__ import annotations

import pytest
import torch
from serving import assert_worker_loss_ends_server, post, start_kiln, status

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs"),
]


@pytest.mark.timeout(400, method="thread")  # a hang ends the session with every stack
def test_kiln_run_tp2_on_two_gpus(tmp_path):
    import kiln
    from benchmarks.models import random_model, save_source
    from benchmarks.tensor_parallel import free

    # float32 and sharp logits: the split sums round far below the gaps between the logits
    model = random_model("qwen3-0.6b", "cpu", torch.float32, logit_scale=10.0, num_hidden_layers=4)
    src = save_source(model, tmp_path / "src")
    options = dict(target="cuda", dtype="float32", max_model_len=1024)
    tp1 = kiln.compile(src, tmp_path / "tp1", **options)
    tp2 = kiln.compile(src, tmp_path / "tp2", tensor_parallel_size=2, **options)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 151936, (n,), generator=g).tolist() for n in (5, 60, 200)]
    params = kiln.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm = kiln.LLM(tp1)
    expected = [out.token_ids for out in llm.generate(prompts, params)]
    del llm  # its KV cache holds 90% of GPU 0's free memory
    free()

    proc, url, log = start_kiln(tp2)
    try:
        for prompt, tokens in zip(prompts, expected):
            body = {"model": tp2.name, "prompt": prompt, "max_tokens": 16, "temperature": 0}
            code, reply = post(url + "/v1/completions", {**body, "ignore_eos": True, "logprobs": 0})
            assert code == 200, reply
            served = [
                int(t.removeprefix("token_id:")) for t in reply["choices"][0]["logprobs"]["tokens"]
            ]
            assert served == list(tokens)
        assert status(url + "/health") == 200
        assert_worker_loss_ends_server(proc, url, body, log)
        print(f"kiln run TP=2: {len(prompts)} prompts as TP=1, then a dead worker ended it")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
