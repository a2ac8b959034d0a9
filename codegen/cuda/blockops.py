"""Block-wide device helpers shared by the kernel families (shared-memory reductions).

Reductions go through shared memory rather than warp shuffles so that the simulator, which
has no shuffles, runs the same code as the device.
"""

from codegen.numba_shim import CUDASIM, cuda

# A warp on the device. The simulator runs one Python thread per CUDA thread, so it gets
# smaller blocks; the kernels take any power of two, and small blocks also make the
# simulator walk the loops where one thread handles several items.
MIN_THREADS = 4 if CUDASIM else 32


def pow2_threads(work: int, hi: int = 256) -> int:
    """Threads per block for `work` parallel items: a power of two in [MIN_THREADS, hi]."""
    return max(MIN_THREADS, min(hi, 1 << max(0, work - 1).bit_length()))


def _block_reduce(combine):
    @cuda.jit(device=True)
    def reduce(buf, value):
        """`combine` of `value` over the block; buf: a shared array of blockDim.x (a power
        of two)."""
        tid = cuda.threadIdx.x
        buf[tid] = value
        cuda.syncthreads()
        stride = buf.shape[0] // 2
        while stride > 0:
            if tid < stride:
                buf[tid] = combine(buf[tid], buf[tid + stride])
            cuda.syncthreads()  # this level's results written before the next level reads
            stride //= 2
        result = buf[0]
        cuda.syncthreads()  # every thread has read the result before buf is reused
        return result

    return reduce


@cuda.jit(device=True)
def _add(a, b):
    return a + b


@cuda.jit(device=True)
def _max(a, b):
    return max(a, b)


block_sum, block_max = _block_reduce(_add), _block_reduce(_max)
