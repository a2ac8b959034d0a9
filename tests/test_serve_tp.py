"""`kiln run` of a tensor-parallel artifact (2 ranks, gloo on the CPU): serves, and when a
worker dies the server says 503 on /health and exits non-zero instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_model
from serving import start_kiln

import kiln


@pytest.fixture(scope="module")
def tp_artifact(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    tiny_model("llama").save_pretrained(src, safe_serialization=True)
    return kiln.compile(str(src), tmp_path_factory.mktemp("tp") / "art", tensor_parallel_size=2)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return -1  # not listening (a poll racing shutdown: test_app's racing test)


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


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
        (worker,) = children(proc.pid)
        os.kill(worker, signal.SIGKILL)
        while Path(f"/proc/{worker}").exists() and "Z" not in state(worker):
            time.sleep(0.05)  # gone (or a zombie its parent has not reaped yet)
        code, reply = post(url + "/v1/completions", body)
        assert code in (500, 503) and "error" in reply
        deadline, seen_503 = time.monotonic() + 30, False
        while proc.poll() is None and time.monotonic() < deadline:
            seen_503 |= status(url + "/health") == 503
            time.sleep(0.2)
        assert seen_503, "".join(log)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
