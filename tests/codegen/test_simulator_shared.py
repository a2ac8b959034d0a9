"""The test harness's locked `cuda.shared.array` for the simulator (see kernel_harness)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from kernel_harness import CUDASIM

pytestmark = pytest.mark.skipif(not CUDASIM, reason="patches the CUDA simulator only")


def shared_arrays_seen(threads: int) -> list[np.ndarray]:
    """What each thread of one simulated block gets from the same `shared.array` line, all
    threads released at once with the GIL switching as often as it can."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    shared = FakeCUDAShared(0)
    start = threading.Barrier(threads)
    seen = []

    def thread() -> None:
        start.wait()
        seen.append(shared.array((8,), np.float32))

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=thread) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(previous)
    return seen


def test_every_thread_of_a_block_gets_the_same_shared_array():
    # numba-cuda's own method handed out several arrays in ~10% of these rounds
    for _ in range(100):
        seen = shared_arrays_seen(32)
        assert len({id(a) for a in seen}) == 1


def test_shared_arrays_keep_the_simulator_semantics():
    from numba.cuda import types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    shared = FakeCUDAShared(64)
    a = shared.array((4, 2), types.float32)
    b = shared.array((4, 2), np.float32)  # another line: another array
    assert a.shape == (4, 2) and a.dtype == np.float32 and a is not b
    dyn_f32, dyn_i8 = shared.array(0, types.float32), shared.array(0, types.int8)
    assert dyn_f32.size == 16 and dyn_i8.size == 64
    dyn_f32[0] = 1.0  # dynamic shared memory: one buffer under every view
    assert dyn_i8[:4].tobytes() == np.float32(1.0).tobytes()
    with pytest.raises(RuntimeError, match="alignment"):
        shared.array((2,), np.float32, alignment=16)
