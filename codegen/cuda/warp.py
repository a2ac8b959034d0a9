"""Warp-level device helpers of the decode attention kernel: barrier, shuffle, and a
reduce-scatter of per-lane partial sums.

The simulator has neither shuffles nor warp barriers; every warp of a block must run the same
sequence of these calls (work past the end is masked, not skipped), so that a block barrier
can stand in for the warp barrier and shared memory for the shuffle.
"""

from codegen.numba_shim import CUDASIM, cuda

if CUDASIM:

    @cuda.jit(device=True)
    def warp_sync():
        cuda.syncthreads()

    @cuda.jit(device=True)
    def shfl_xor(buf, x, mask):
        tid = cuda.threadIdx.x
        buf[tid] = x
        cuda.syncthreads()
        y = buf[tid ^ mask]
        cuda.syncthreads()  # read before the next exchange overwrites buf
        return y

    @cuda.jit(device=True)
    def shfl_idx(buf, x, src, lane):
        """x of lane `src` of the calling lane's warp."""
        tid = cuda.threadIdx.x
        buf[tid] = x
        cuda.syncthreads()
        y = buf[tid - lane + src]
        cuda.syncthreads()
        return y

else:

    @cuda.jit(device=True)
    def warp_sync():
        cuda.syncwarp()

    @cuda.jit(device=True)
    def shfl_xor(buf, x, mask):
        return cuda.shfl_xor_sync(0xFFFFFFFF, x, mask)

    @cuda.jit(device=True)
    def shfl_idx(buf, x, src, lane):
        return cuda.shfl_sync(0xFFFFFFFF, x, src)


def warp_sum(lanes: int):
    """Device function: x summed over the calling lane's `lanes` (a power of two), by a
    butterfly of shuffles (stride lanes/2 first): every lane gets the same sum."""

    @cuda.jit(device=True)
    def lane_sum(xchg, x):
        mask = lanes // 2
        while mask > 0:
            x += shfl_xor(xchg, x, mask)
            mask //= 2
        return x

    return lane_sum


@cuda.jit(device=True)
def _reduced(s, xchg, part):
    return 0


def _reduce_step(heads: int, mask: int, rest):
    """Device function: one shuffle step of key_reduce, then the `rest` of them."""
    if heads == 1:  # one head left: the lanes add it up, all of them

        @cuda.jit(device=True)
        def add(s, xchg, part):
            s[0] += shfl_xor(xchg, s[0], mask)
            return rest(s, xchg, part)

        return add
    half = heads // 2

    @cuda.jit(device=True)
    def trade(s, xchg, part):
        upper = part & mask != 0  # keeps the upper half of the heads, sends the lower
        for j in range(half):
            send = s[j] if upper else s[j + half]
            keep = s[j + half] if upper else s[j]
            s[j] = keep + shfl_xor(xchg, send, mask)
        return (half if upper else 0) + rest(s, xchg, part)

    return trade


def key_reduce(padded: int, lanes: int):
    """Device function: add up the partial dot products of a key's lanes, head by head.

    A reduce-scatter: at each step a lane trades half of its heads with its partner, so
    `padded` heads over `lanes` lanes take about `padded` shuffles, not padded * log2(lanes).
    It returns `first`: the lane then holds s[j] = the sum for head first + j, j < held.
    Each step is its own function so that every loop has a constant trip count (unrolled).
    """
    steps, heads, mask = [], padded, lanes // 2
    while mask > 0:
        steps.append((heads, mask))
        heads, mask = max(1, heads // 2), mask // 2
    reduce = _reduced
    for heads, mask in reversed(steps):
        reduce = _reduce_step(heads, mask, reduce)
    return reduce
