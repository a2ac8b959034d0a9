"""Helpers for tests that start `kiln run` as a real process."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_kiln(artifact, *extra: str) -> tuple[subprocess.Popen, str, collections.deque]:
    """`kiln run ARTIFACT` on a free port, once it logs that it is ready: (process, base url,
    its last log lines). A thread keeps reading the log, so that a full pipe never blocks the
    server."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "run", str(artifact), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: collections.deque = collections.deque(maxlen=200)
    for line in proc.stdout:
        log.append(line)
        if "ready: " in line:
            threading.Thread(target=log.extend, args=(proc.stdout,), daemon=True).start()
            return proc, f"http://127.0.0.1:{port}", log
    raise RuntimeError(f"kiln run exited with {proc.wait()}:\n{''.join(log)}")
