"""`kiln run` of a tensor-parallel artifact (2 ranks, gloo on the CPU): serves, drains on a
Ctrl-C to all its processes, and when a worker dies the server says 503 on /health and
exits non-zero instead of hanging."""

from __future__ import annotations

import os
import signal

import openai
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


def test_ctrl_c_to_the_process_group_drains_the_server(tp_artifact):
    """A terminal's Ctrl-C reaches every process of the group: the server drains, while the
    engine's process and its worker run on until the request is done."""
    proc, url, log = start_kiln(tp_artifact, "--shutdown-timeout", "60", new_session=True)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(
            model=tp_artifact.name,
            prompt=[1, 2, 3, 4],
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        chunks = iter(stream)
        tokens = len(next(chunks).choices[0].token_ids)
        os.killpg(proc.pid, signal.SIGINT)
        finish = None
        for chunk in chunks:
            tokens += len(chunk.choices[0].token_ids or [])
            finish = chunk.choices[0].finish_reason or finish
        assert (finish, tokens) == ("length", 300), "".join(log)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
