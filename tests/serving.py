"""Helpers for tests that start `kiln run` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.common import free_port, start_kiln  # noqa: F401 (the tests' helpers too)
from runtime.distributed import WORKER_MAIN


def post(url: str, body: dict) -> tuple[int, dict]:
    """(status, JSON reply) of a JSON POST."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def status(url: str) -> int:
    """The status of a GET, -1 when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return -1  # not listening (a poll racing shutdown: test_app's racing test)


def children(pid: int) -> list[int]:
    """Child process ids of `pid` (Linux /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def workers(pid: int) -> list[int]:
    """The tensor-parallel worker processes under `pid` (the engine's process starts them)."""
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        try:
            todo += children(child)
            command = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except FileNotFoundError:  # a short-lived child, gone already
            continue
        if WORKER_MAIN in command:
            found.append(child)
    return found


def state(pid: int) -> str:
    """The process's state letter from /proc ("Z": a zombie), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def assert_worker_loss_ends_server(proc: subprocess.Popen, url: str, body: dict, log) -> None:
    """SIGKILL the server's one worker process: the next request fails (500/503), /health
    says 503, and the server exits non-zero instead of hanging."""
    (worker,) = workers(proc.pid)
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
