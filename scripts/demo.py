"""The one-command demo: compile SmolLM2 (cached), serve it, chat through the openai client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from compiler.compile import is_current

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "artifacts" / "smollm2-cpu"
QUESTION = "What is the capital of France? Answer in one sentence."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kiln(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiln.cli", *args], cwd=ROOT, **kwargs)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kiln run exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise SystemExit("kiln run did not become ready in time")


def chat(client: openai.OpenAI) -> None:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=64,
        temperature=0.0,
    )
    elapsed = time.perf_counter() - start
    tokens = reply.usage.completion_tokens
    print(f"\n[chat] {reply.choices[0].message.content}")
    print(f"[chat] {tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tok/s")


def stream(client: openai.OpenAI) -> None:
    start, tokens = time.perf_counter(), 0
    print("\n[stream] ", end="", flush=True)
    chunks = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a haiku about a kiln."}],
        max_tokens=64,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    elapsed = time.perf_counter() - start
    print(f"\n[stream] {tokens} tokens in {elapsed:.2f} s: {tokens / elapsed:.1f} tok/s")


def main() -> int:
    if not is_current(ARTIFACT):  # missing, or compiled by other code
        if kiln("compile", "builtin:smollm2", "-o", str(ARTIFACT)).wait() != 0:
            return 1
    else:
        print(f"reusing the compiled artifact {ARTIFACT.relative_to(ROOT)}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = kiln("run", str(ARTIFACT), "--port", str(port), "--served-model-name", "smollm2")
    try:
        wait_ready(url, server)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        chat(client)
        stream(client)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    print(f"\nserver stopped (exit status {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
