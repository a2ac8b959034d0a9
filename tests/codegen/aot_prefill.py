"""Compile a prefill attention builder's kernel for sm_90 and print what its PTX holds.

Run as a script, in a process without NUMBA_ENABLE_CUDASIM (the simulator has no compiler):
    aot_prefill.py MODULE:BUILDER CONFIGS_JSON
CONFIGS_JSON: [[heads, kv_heads, dim, window, softcap, dtype], ...], each with rope.
"""

import importlib
import json
import re
import sys

from codegen.aot import compile_kernel
from ir.ops import PagedAttention


def main(builder_path: str, configs: str) -> None:
    module, name = builder_path.split(":")
    build = getattr(importlib.import_module(module), name)
    records = []
    for heads, kv_heads, dim, window, softcap, dtype in json.loads(configs):
        op = PagedAttention(0, heads, kv_heads, dim, dim**-0.5, window, softcap, "bthd", True)
        compiled = compile_kernel(build(op, dtype, 16), "sm_90")
        shared = re.findall(r"\.shared \.align \d+ \.b8 \w+\[(\d+)\]", compiled.ptx)
        records.append(
            {
                "cubin_magic": compiled.cubin[:4].hex(),
                "mma": compiled.ptx.count("mma.sync.aligned.m16n8k16"),
                "local": "ld.local" in compiled.ptx or "st.local" in compiled.ptx,
                "shared": sum(map(int, shared)),
                "params": [p.name for p in compiled.params],
            }
        )
    json.dump(records, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
