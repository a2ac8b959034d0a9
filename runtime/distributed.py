"""Tensor parallelism at run time: a process per rank, each step's batch broadcast from rank 0.

The engine's process is rank 0: it runs the scheduler and sampler once, and its runner
broadcasts every step's BatchInputs to ranks 1..N-1 (worker processes started here) before
running its own share of the graph. Every rank owns its weights and its KV cache; the graph's
AllReduce nodes meet over the default torch.distributed group (gloo on CPU, NCCL on CUDA).
On GPUs every rank captures the same decode CUDA graphs, NCCL's all-reduces inside them; a
decode step that fits one sends only its bucket: rank 0 stages the graph's inputs on its
device, broadcasts those buffers into the other ranks' (device to device), and every rank
replays its graph of that bucket.
Batch headers travel over a separate gloo group whose long timeout lets workers idle while
the engine has nothing to do; every other collective has a step-sized timeout. A worker that
dies makes the next step (or the one in flight) raise TensorParallelError.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _abort_process_group

from compiler.artifact import Artifact, load_artifact
from runtime.batch import BatchInputs
from runtime.config import EngineConfig
from runtime.memory import MemoryBudgetError
from runtime.model_runner import ModelRunner, runner_device
from runtime.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

# NVLink multicast off: NCCL, torch symmetric memory, NVSHMEM
WORKER_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
STEP_TIMEOUT = timedelta(seconds=120)  # any collective within a step: a stuck rank fails it
IDLE_TIMEOUT = timedelta(days=30)  # how long workers wait for the next step
STARTUP_TIMEOUT_S = 600.0  # for every worker to load its weights
STOP_TIMEOUT_S = 10.0  # for workers to exit after STOP, before they are killed
STOP, STEP, REPLAY = 0, 1, 2  # commands: exit; run a batch eagerly; replay a decode graph
PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKER_MAIN = "import sys; from runtime.distributed import main; main(sys.argv[1:])"


class TensorParallelError(RuntimeError):
    """A worker process died or a collective failed: the engine cannot go on."""


class RankRunner(ModelRunner):
    """One rank's runner: its weights and KV cache; AllReduce over the default group."""

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def _blocks_for(self, config: EngineConfig) -> int:
        # the ranks share one block table: each allocates what the tightest rank has room for;
        # a rank without room still joins the reduction (0), so no rank waits on it for good
        try:
            mine, error = super()._blocks_for(config), None
        except MemoryBudgetError as e:
            mine, error = 0, e
        blocks = torch.tensor([mine], device=self.device)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
        if error is not None:
            raise error
        if blocks.item() == 0:
            raise MemoryBudgetError(
                "another tensor-parallel rank has no room for its KV cache (its log says why)"
            )
        return int(blocks.item())


class TensorParallelRunner(RankRunner):
    """Rank 0, in the engine's process: starts the other ranks and feeds them every batch."""

    def __init__(self, artifact: Artifact, config: EngineConfig) -> None:
        size = artifact.manifest["tensor_parallel_size"]
        self.workers = Workers.start(artifact.path, size, config, runner_device(artifact, config))
        self._finalizer = weakref.finalize(self, self.workers.close)  # also at interpreter exit
        try:
            with self.workers.watch():
                super().__init__(artifact, config)
        except BaseException:
            self.close()
            raise

    def forward(self, batch: BatchInputs) -> torch.Tensor:
        with self.workers.watch():
            self.workers.send(STEP, batch)
            return super().forward(batch)

    def replay(self, chunks: tuple[ScheduledChunk, ...], carried: torch.Tensor | None):
        size = self.graphs.stage(chunks, carried)
        with self.workers.watch():
            self.workers.send_replay(size, self.graphs.inputs(size))
            return self.graphs.replay(size, len(chunks))

    def close(self) -> None:
        """Drop the CUDA graphs (their NCCL work holds the communicators), then stop the
        workers (idempotent); the runner is unusable afterwards."""
        super().close()
        self._finalizer()


class Workers:
    """Processes of ranks 1..N-1, plus this process's membership (rank 0) in their group."""

    def __init__(self, procs: list[subprocess.Popen], store: dist.TCPStore) -> None:
        self.procs, self.store = procs, store
        self.control: dist.ProcessGroup | None = None
        self.failed: BaseException | None = None
        self.closed = False

    @classmethod
    def start(cls, path: Path, size: int, config: EngineConfig, device: torch.device) -> Workers:
        if dist.is_initialized():
            raise RuntimeError(
                "this process is already in a torch.distributed group (one tensor-parallel "
                "engine per process: close the other one first)"
            )
        os.environ.update(WORKER_ENV)  # rank 0's communicators live in this process
        store = dist.TCPStore(
            "127.0.0.1", 0, None, True, timeout=STEP_TIMEOUT, wait_for_workers=False
        )
        workers = cls([], store)
        try:
            for rank in range(1, size):
                rank_config = replace(config, device=str(_rank_device(device, rank)))
                workers.procs.append(_spawn(rank, size, store.port, path, rank_config))
            workers._wait_ready(size)
            workers.control = _join_group(0, size, store, _rank_device(device, 0))
        except BaseException:
            workers.close()
            raise
        log.info("tensor parallel: %d ranks, worker pids %s", size, [p.pid for p in workers.procs])
        return workers

    def _wait_ready(self, size: int) -> None:
        keys = [_ready_key(r) for r in range(1, size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise TensorParallelError(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def check(self) -> None:
        """Raise TensorParallelError if a worker has exited or an earlier step failed."""
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                raise TensorParallelError(
                    f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code "
                    f"{p.returncode}"
                )
        if self.failed is not None:
            raise TensorParallelError(f"an earlier step failed: {self.failed}") from self.failed

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Run collectives; a dead worker, before or during them, raises TensorParallelError."""
        self.check()
        try:
            yield
        except BaseException as e:  # the ranks are out of step now: no later step may run
            self.failed = e
            if not isinstance(e, RuntimeError):
                raise
            # gloo fails at once when a peer dies (connection reset); wait for it to be reaped
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and all(p.poll() is None for p in self.procs):
                time.sleep(0.02)
            self.check()

    def send(self, command: int, batch: BatchInputs | None = None) -> None:
        header, payload = pack_batch(command, batch)
        dist.broadcast(header, src=0, group=self.control)
        if payload is not None:
            dist.broadcast(payload, src=0)

    def send_replay(self, size: int, inputs: tuple[torch.Tensor, ...]) -> None:
        """Have every rank replay its decode graph of `size` on rank 0's staged inputs."""
        dist.broadcast(torch.tensor(replay_header(size)), src=0, group=self.control)
        for t in inputs:
            dist.broadcast(t, src=0)

    def close(self) -> None:
        """STOP the workers (killing any that do not exit), then leave the group."""
        if self.closed:
            return
        self.closed = True
        healthy = all(p.poll() is None for p in self.procs) and self.failed is None
        stopping = healthy and self.control is not None
        if stopping:
            with suppress(RuntimeError):
                self.send(STOP)
            # every rank leaves the group at once: NCCL's teardown waits for all of them
            dist.destroy_process_group()
        # after a failure the ranks are out of step: no point waiting for the others
        deadline = time.monotonic() + (STOP_TIMEOUT_S if stopping else 0.0)
        for p in self.procs:
            with suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
            if p.poll() is None:
                log.log(logging.WARNING if stopping else logging.DEBUG, "killing pid %d", p.pid)
                p.kill()
                p.wait()
        if dist.is_initialized():
            # the others never join a graceful teardown now, and NCCL's waits for every rank
            # (rank 0 hung there when its CUDA-graph capture failed at start-up): abort
            _abort_process_group()


HEADER_LEN = 7  # command, tokens, chunks, table width, logits rows, max context, max query


def _fields(header: list[int]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """BatchInputs' tensors in packing order: name, shape, dtype."""
    _, tokens, chunks, width, rows = header[:5]
    i32, i64 = torch.int32, torch.int64
    return [
        ("token_ids", (tokens,), i64),
        ("positions", (tokens,), i64),
        ("slot_mapping", (tokens,), i64),
        ("query_start", (chunks + 1,), i32),
        ("context_lens", (chunks,), i32),
        ("block_tables", (chunks, width), i32),
        ("logits_indices", (rows,), i64),
    ]


def pack_batch(command: int, batch: BatchInputs | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A CPU header and (with a batch) every BatchInputs tensor flattened into one int64."""
    if batch is None:
        return torch.tensor([command] + [0] * (HEADER_LEN - 1)), None
    chunks, width = batch.block_tables.shape
    header = [command, batch.num_tokens, chunks, width, batch.num_logits]
    header += [batch.max_context_len, batch.max_query_len]
    payload = torch.cat([getattr(batch, n).flatten().long() for n, _, _ in _fields(header)])
    return torch.tensor(header), payload


def replay_header(size: int) -> list[int]:
    return [REPLAY, size] + [0] * (HEADER_LEN - 2)


def unpack_batch(header: list[int], payload: torch.Tensor) -> BatchInputs:
    specs = _fields(header)
    parts = payload.split([math.prod(shape) for _, shape, _ in specs])
    tensors = {
        n: p.view(shape).to(dtype) for (n, shape, dtype), p in zip(specs, parts, strict=True)
    }
    return BatchInputs(**tensors, max_context_len=header[-2], max_query_len=header[-1])


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after rank 0's, or the CPU."""
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


def _ready_key(rank: int) -> str:
    return f"kiln/ready/{rank}"


def _join_group(rank: int, size: int, store: dist.Store, device: torch.device) -> dist.ProcessGroup:
    """Join the default group (the step's collectives); returns the gloo group for headers."""
    cuda = device.type == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=store,
        rank=rank,
        world_size=size,
        timeout=STEP_TIMEOUT,
        device_id=device if cuda else None,
    )
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _spawn(rank: int, size: int, port: int, path: Path, config: EngineConfig) -> subprocess.Popen:
    # a fresh interpreter (not multiprocessing): the caller's script needs no __main__ guard
    pythonpath = os.pathsep.join(filter(None, (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))))
    args = [str(rank), str(size), str(port), str(path), json.dumps(asdict(config))]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_MAIN, *args],
        env={**os.environ, **WORKER_ENV, "PYTHONPATH": pythonpath},
    )


def main(argv: list[str]) -> None:
    """A worker: rank, world size, store port, artifact path, EngineConfig as JSON."""
    # a terminal's Ctrl-C reaches every process of the group: rank 0 says when the ranks stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank, size, port = (int(a) for a in argv[:3])
    config = EngineConfig(**json.loads(argv[4]))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"
    )
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # share the cores with the other ranks on this host
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    artifact = load_artifact(Path(argv[3]), verify_hashes=False, rank=rank)  # rank 0 verified all
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=STEP_TIMEOUT)
    store.set(_ready_key(rank), "1")
    control = _join_group(rank, size, store, device)
    try:
        _serve(RankRunner(artifact, config), control)
    finally:
        dist.destroy_process_group()


def _serve(runner: RankRunner, control: dist.ProcessGroup) -> None:
    """Run every batch rank 0 sends until it sends STOP."""
    while True:
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, src=0, group=control)
        fields = header.tolist()
        if fields[0] == STOP:
            runner.close()  # its CUDA graphs go before the communicators they use
            return
        if fields[0] == REPLAY:
            size = fields[1]
            for t in runner.graphs.inputs(size):
                dist.broadcast(t, src=0)
            runner.graphs.replay(size, 0)
            continue
        size = sum(math.prod(shape) for _, shape, _ in _fields(fields))
        payload = torch.empty(size, dtype=torch.int64, device=runner.device)
        dist.broadcast(payload, src=0)
        runner.forward(unpack_batch(fields, payload))
