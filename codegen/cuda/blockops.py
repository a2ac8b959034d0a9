"""Block-wide device helpers shared by the kernel families (shared-memory reductions).

Reductions go through shared memory rather than warp shuffles so that the simulator, which
has no shuffles, runs the same code as the device.
"""

from codegen.numba_shim import CUDASIM

# A warp on the device. The simulator runs one Python thread per CUDA thread, so it gets
# smaller blocks; the kernels take any power of two, and small blocks also make the
# simulator walk the loops where one thread handles several items.
MIN_THREADS = 4 if CUDASIM else 32


def pow2_threads(work: int, hi: int = 256) -> int:
    """Threads per block for `work` parallel items: a power of two in [MIN_THREADS, hi]."""
    return max(MIN_THREADS, min(hi, 1 << max(0, work - 1).bit_length()))
