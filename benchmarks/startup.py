"""Time from `kiln run ARTIFACT` to a ready server (/health answers 200), for a Qwen3-0.6B-shaped
artifact compiled to disk with `kiln compile --target cuda`; also the compile time."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from benchmarks.common import free_port, save, table
from benchmarks.models import random_model, save_source


def kiln(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", *args]


def ready_seconds(artifact: Path, timeout: float) -> float:
    """Seconds until /health answers 200 (the server's log is printed afterwards)."""
    port = free_port()
    print(f"kiln run started at {datetime.now().isoformat(timespec='milliseconds')}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        kiln("run", str(artifact), "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"kiln run exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"not ready in {timeout} s")
    finally:
        proc.terminate()
        print(proc.communicate(timeout=60)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-startup"))
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    source = save_source(random_model("qwen3-0.6b"), args.workdir / "hf")
    artifact = args.workdir / "artifact"
    start = time.perf_counter()
    subprocess.run(
        kiln("compile", source, "-o", str(artifact), "--target", "cuda", "--max-model-len", "4096"),
        check=True,
    )
    compile_s = time.perf_counter() - start
    ready = ready_seconds(artifact, args.timeout)
    row = {
        "model": "qwen3-0.6b shape",
        "compile_s": round(compile_s, 1),
        "ready_s": round(ready, 2),
    }
    print(table([row], list(row)))
    print(f"wrote {save('startup', {'workload': 'kiln run ready', 'rows': [row]})}")


if __name__ == "__main__":
    main()
