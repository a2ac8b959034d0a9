"""W3 on the GPU: one Llama-3.1-8B-shaped request, 1024-token prompt, 256 output tokens;
time to first token and time per output token, beside transformers `generate` and the
3.8 ms weight-read floor of the H200; then, from a profiled run, a token's GPU time: kernels
and copies, the idle time between them (by the kernels around it), the largest items."""

from __future__ import annotations

import argparse

from benchmarks.common import save
from benchmarks.gpu import w3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="/tmp/kiln-bench", help="where kernels are built")
    args = p.parse_args()
    print(f"wrote {save('w3', w3(args))}")


if __name__ == "__main__":
    main()
