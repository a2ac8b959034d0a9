"""Ahead-of-time compilation: every kernel family to PTX and cubin for sm_90, with no GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_harness import assert_matches, gpu_test, poisoned, rand, typed

from ir.ops import RMSNorm
from ir.reference import RefContext, run_op

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
AOT_PREFILL = str(HERE / "aot_prefill.py")  # a prefill builder's kernel compiled, described
FAMILIES = {"Embedding", "RMSNorm", "AddRMSNorm", "LayerNorm", "SiluMul", "FusedElementwise"}
FAMILIES |= {"GatherLastTokens", "PagedAttention", "NormLinear", "QuantLinear"}


def toolchain_missing() -> str | None:
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        for lib in ("nvvm", "nvJitLink"):
            load_nvidia_dynamic_lib(lib)
    except Exception as e:  # any failure to find the libraries means: not installed
        return f"CUDA toolchain (NVVM, nvJitLink) not found: pip install 'numba-cuda[cu13]' ({e})"
    return None


def compile_without_simulator(*args: str) -> str:
    """stdout of `python *args` in a process with the real CUDA target (the simulator has no
    compiler); skips the test where the toolchain is not installed."""
    if reason := toolchain_missing():
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def compiled_families() -> list[dict]:
    return json.loads(compile_without_simulator(str(HERE / "aot_families.py"), "sm_90"))


def test_every_family_compiles_to_ptx_and_cubin(compiled_families):
    assert {r["op"] for r in compiled_families} == FAMILIES
    for r in compiled_families:
        assert r["cubin_magic"] == "7f454c46", r["name"]  # an ELF image
        assert r["ptx_target"] == "sm_90" and r["arch"] == "sm_90"
        assert r["ptx_params"] == len(r["param_fields"]), r["name"]
        assert r["ptx_isa"].count(".") == 1 and r["toolkit"].count(".") == 1
        assert r["block"][0] >= 32


def test_attention_is_five_kernels(compiled_families):
    names = [r["name"].split("_")[:-1] for r in compiled_families if r["op"] == "PagedAttention"]
    assert names.count(["paged", "attention"]) == 2 and names.count(["attention", "reduce"]) == 4
    assert names.count(["prefill", "attention", "mma"]) == 2  # bf16: on tensor cores
    assert ["rope", "kv", "cache", "write"] in names and ["kv", "cache", "write"] in names


def test_quant_linear_compiles_both_paths_in_registers(compiled_families):
    # int4 with a bias: GEMVs, dequant, bias-add; fp8: GEMVs, dequant. The GEMVs' words and
    # accumulators in registers: no "__local_depot" in any kernel's PTX
    quant = [r for r in compiled_families if r["op"] == "QuantLinear"]
    names = [r["name"].rsplit("_", 1)[0] for r in quant]
    gemvs = ["quant_gemv"] * 4  # for 1, 2, 4 and 8 rows
    assert names == [*gemvs, "dequant", "bias_add", *gemvs, "dequant"]
    assert not any(r["local_depot"] for r in quant)


LOCAL_DEPOT_SCRIPT = """
import sys
import codegen.cuda
from codegen.aot import compile_ptx
from codegen.registry import build_kernels
from ir.ops import PagedAttention
from ir.types import TensorType
heads, kv_heads, dim, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
op = PagedAttention(0, heads, kv_heads, dim, dim**-0.5, layout="bthd")
types = [TensorType((1, "T", h, dim), dtype) for h in (heads, kv_heads, kv_heads)]
print("__local_depot" in compile_ptx(build_kernels(op, types).kernels[1]))
"""


@pytest.mark.parametrize(
    "shape", ["32 8 128 bfloat16", "32 8 128 float16", "32 8 128 float32", "64 8 128 bfloat16"]
)
def test_decode_attention_keeps_its_arrays_in_registers(shape):
    # the decode benchmark's shapes (and a group of 8): a loop NVVM did not unroll would leave
    # q, the cache words or the accumulators in local memory, a "__local_depot" in the PTX
    assert compile_without_simulator("-c", LOCAL_DEPOT_SCRIPT, *shape.split()).strip() == "False"


@gpu_test
def test_cubin_launches_through_cuda_core():
    """The cubin and its parameter layout, loaded without numba's launcher."""
    from cuda.core import Device, LaunchConfig, ObjectCode, launch

    import codegen.cuda  # noqa: F401
    from codegen.aot import array_abi_values, compile_kernel
    from codegen.registry import build_kernels

    x, w = rand(1, 37, 1000, dtype="bfloat16", device="cuda"), rand(1000, device="cuda")
    out = poisoned((1, 37, 1000), "float32", "cuda")
    op = RMSNorm(1e-6)
    (kernel,) = build_kernels(op, (typed(x, {1: "T"}), typed(w))).kernels
    compiled = compile_kernel(kernel, "sm_90")
    device = Device()
    device.set_current()
    fn = ObjectCode.from_cubin(compiled.cubin).get_kernel(compiled.symbol)
    args = []
    for t in (out.view(37, 1000), x.view(37, 1000), w):
        args += array_abi_values(t.data_ptr(), t.shape, t.stride(), t.element_size())
    stream = device.create_stream()
    config = LaunchConfig(grid=kernel.grid({"T": 37}), block=kernel.block)
    launch(stream, config, fn, *(np.int64(a) for a in args))
    stream.sync()
    (expected,) = run_op(op, RefContext({"T": 37}), x.cpu(), w.cpu())
    assert_matches(out, expected)
    assert torch.isfinite(out).all()
