"""GPU timing of kernel variants for `kiln bench kernels`: CUDA-graph replays timed with
events (no variant is charged its host launch cost), numba ops bound by parameter name, and
the rows a benchmark table prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codegen.registry import BuildConstants

COPY_BW = 4.25e12  # bytes/s, device-to-device copy (read + write) measured on the H200
BF16_FLOPS = 786e12  # dense bf16 matmul measured on the H200
DEFAULTS = BuildConstants()


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call over the repeats: median, min and max; how they were taken."""

    median: float
    low: float
    high: float
    method: str  # "graph" (GPU time of replays) or "eager" (host launch time included)

    def fields(self) -> dict:
        return {
            "timing": self.method,
            "ms": round(self.median * 1e3, 3),
            "ms_min_max": f"{self.low * 1e3:.3f}-{self.high * 1e3:.3f}",
        }


def _event_times(fn, repeats: int, per: int, method: str) -> Timing:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per)
    times.sort()
    return Timing(times[len(times) // 2], times[0], times[-1], method)


def gpu_time(fn, repeats: int = 20, launches: int = 5, graph: bool = True) -> Timing:
    """Seconds per call. With `graph`, the GPU time of `launches` calls captured in a CUDA
    graph and replayed, so that no variant is charged its host launch cost (a numba dispatch
    from Python costs more than the kernel it launches); a variant that syncs with the host
    (the torch reference) is timed eagerly instead."""
    if not graph:
        fn(), fn()
        return _event_times(fn, repeats, 1, "eager")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(), fn()  # warm-up: compile, allocate, pick algorithms
    torch.cuda.current_stream().wait_stream(side)
    replay = torch.cuda.CUDAGraph()
    with torch.cuda.graph(replay):
        for _ in range(launches):
            fn()
    return _event_times(replay.replay, repeats, launches, "graph")


def numba_op(op, types, tensors, sizes, consts=DEFAULTS):
    import codegen.cuda  # noqa: F401
    from codegen.cuda.launch import allocate_scratch, launch
    from codegen.registry import build_kernels

    kernels = build_kernels(op, types, consts)
    env = {**allocate_scratch(kernels.scratch, sizes, "cuda"), **tensors}
    return lambda: launch(kernels, sizes, env)


def bw_row(kernel: str, variant: str, timing: Timing, nbytes: int) -> dict:
    seconds = timing.median
    return {
        "kernel": kernel,
        "variant": variant,
        **timing.fields(),
        "achieved": f"{nbytes / seconds / 1e9:.0f} GB/s",
        "of_ceiling": f"{nbytes / seconds / COPY_BW:.1%}",
    }
