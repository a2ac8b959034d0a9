"""Shared benchmark plumbing: environment record, result JSON, table printing, `kiln run`."""

from __future__ import annotations

import collections
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    env = {
        # a copy of the tree without its history (a remote GPU machine) names it in KILN_COMMIT
        "commit": os.environ.get("KILN_COMMIT") or _git("rev-parse", "--short", "HEAD"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = _smi("driver_version")
        # each GPU's SM clock now, its maximum, and why it is held back (BENCH: check clocks)
        env["clocks"] = _smi("clocks.sm,clocks.max.sm,clocks_event_reasons.active")
    try:
        import numba

        env["numba"] = numba.__version__
    except ImportError:
        pass
    return env


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _smi(fields: str) -> str:
    """nvidia-smi's answer for each GPU, the same answers once ("a; b" where they differ)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    return "; ".join(dict.fromkeys(out.stdout.strip().splitlines())) or "unknown"


def save(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"environment": environment(), **record}, indent=1))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    body = [
        "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True))
        for r in rows
    ]
    return "\n".join([line, "-" * len(line), *body])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_kiln(
    artifact, *flags: str, new_session: bool = False
) -> tuple[subprocess.Popen, str, collections.deque]:
    """`kiln run ARTIFACT` on a free port, once it logs that it is ready: (process, base url,
    its last log lines). A thread keeps reading the log, so that a full pipe never blocks the
    server. `new_session`: its processes are a group of their own (a terminal's, say)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "run", str(artifact), "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )
    log: collections.deque = collections.deque(maxlen=200)
    for line in proc.stdout:
        log.append(line)
        if "ready: " in line:
            threading.Thread(target=log.extend, args=(proc.stdout,), daemon=True).start()
            return proc, f"http://127.0.0.1:{port}", log
    raise RuntimeError(f"kiln run exited with {proc.wait()}:\n{''.join(log)}")


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user and system) used so far by this process, or by process `pid` (its own
    threads, not its children's; Linux)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
