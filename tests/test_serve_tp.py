"""`kiln run` of a tensor-parallel artifact (2 ranks, gloo on the CPU): serves, and when a
worker dies the server says 503 on /health and exits non-zero instead of hanging."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from serving import assert_worker_loss_ends_server, post, start_kiln, status

import kiln


@pytest.fixture(scope="module")
def tp_artifact(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    tiny_model("llama").save_pretrained(src, safe_serialization=True)
    return kiln.compile(str(src), tmp_path_factory.mktemp("tp") / "art", tensor_parallel_size=2)


def test_dead_worker_turns_health_503_and_exits_nonzero(tp_artifact):
    proc, url, log = start_kiln(tp_artifact)
    try:
        # greedy and past EOS: the count below must not depend on a draw (160-token vocabulary)
        body = {
            "model": tp_artifact.name,
            "prompt": [1, 2, 3, 4],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        }
        code, reply = post(url + "/v1/completions", body)
        assert code == 200 and reply["usage"]["completion_tokens"] == 4
        assert status(url + "/health") == 200
        assert_worker_loss_ends_server(proc, url, body, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
