"""The cubin launcher binds an argument from its tensor's address, sizes and strides; what it
binds must be what the view the kernel reads (codegen.cuda.launch.param_view) would give."""

from __future__ import annotations

import pytest
import torch

from codegen.aot import array_abi_values
from codegen.cuda.launch import param_view
from codegen.registry import Param
from runtime.cubin import abi_values


def viewed(t: torch.Tensor, param: Param) -> tuple[int, ...]:
    v = param_view(t, param)
    return array_abi_values(v.data_ptr(), v.shape, v.stride(), v.element_size())


def addressing(values: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The fields a kernel's addresses depend on: a dimension of size 1 is never stepped
    along, so its stride is any number (torch and the launcher may pick different ones)."""
    head, shape, strides = values[:5], values[5 : 5 + ndim], values[5 + ndim :]
    assert len(strides) == ndim
    return (*head, *shape, *(s if n != 1 else 0 for n, s in zip(shape, strides, strict=True)))


def layouts():
    """(tensor, param): activations as the graph makes them, views off a bucket's buffer,
    slices of a fused projection, caches read as wider words, and odd strides."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    bucket = rand(1, 64, 8, 16)
    fused = rand(1, 37, 12, 16)
    cache = rand(9, 16, 2, 128, dtype=torch.bfloat16)
    yield rand(1, 37, 8, 16), Param("in0", "float32", 3)
    yield rand(1, 37, 8, 16), Param("in0", "float32", 2, "A")
    yield rand(37, 1000), Param("in0", "float32", 2)
    yield rand(1, 37, 1000), Param("in0", "float32", 1)
    yield bucket[:, :29], Param("in0", "float32", 3, "A")  # a step's rows of a bucket's buffer
    yield bucket[:, :29], Param("in0", "float32", 2, "A")
    yield fused[:, :, 4:8], Param("in1", "float32", 3, "A")  # k out of a fused q|k|v
    yield fused[:, :, 4:8], Param("in1", "float32", 2, "A")  # [T, 4, 16] is no run: a copy
    yield rand(3, 1, 5)[1:2], Param("in0", "float32", 2, "A")  # size-1 dims, odd strides
    yield rand(5, 1, 7).transpose(0, 2), Param("in0", "float32", 2, "A")
    yield rand(4, 6, 8).transpose(0, 1), Param("in0", "float32", 2, "A")  # no view: a copy
    yield rand(2, 3, 4).permute(2, 0, 1), Param("in0", "float32", 3, "A")
    yield cache, Param("k_cache", "bfloat16", 4)
    yield cache, Param("k_cache", "int64", 1)  # the decode kernel's words: 4 bf16 a load
    yield cache, Param("k_cache", "int64", 3)
    yield cache[2:5], Param("k_cache", "int64", 4)
    yield cache[:, :, :, 32:96], Param("k_cache", "int64", 2, "A")  # strided words
    yield rand(7, 10, dtype=torch.int64).to(torch.int32), Param("block_tables", "int32", 2)
    yield torch.arange(12, dtype=torch.int32), Param("query_start", "int32", 1)
    yield torch.arange(12, dtype=torch.int32)[::2], Param("context_lens", "int32", 1, "A")
    yield rand(6, 8, dtype=torch.int64), Param("in0", "int32", 2)  # narrower: the last dim doubles
    yield rand(1, 1, 1, 8), Param("in0", "float32", 1)


@pytest.mark.parametrize("t, param", list(layouts()))
def test_bound_values_are_the_views(t, param):
    if t.dim() > param.ndim and not _views(t, param):  # param_view copies: ABI of a temporary
        got, expected = abi_values(t, param), viewed(t, param)
        assert got[:4] + got[5:] == expected[:4] + expected[5:]  # all but the address
        return
    assert addressing(abi_values(t, param), param.ndim) == addressing(viewed(t, param), param.ndim)


@pytest.mark.parametrize(
    "t",
    [
        torch.zeros(5, 3, dtype=torch.bfloat16),  # 3 bf16 values are no whole int64 word
        torch.zeros(5, 8, dtype=torch.bfloat16)[:, ::2],  # words of every other value
        torch.zeros(5, 8, dtype=torch.bfloat16)[:, 2:6],  # words that straddle two
    ],
)
def test_words_that_do_not_fit_fail_as_the_view_does(t):
    param = Param("k_cache", "int64", 2, "A")
    with pytest.raises(RuntimeError) as from_view:
        viewed(t, param)
    with pytest.raises(RuntimeError) as from_launcher:
        abi_values(t, param)
    assert str(from_launcher.value) == str(from_view.value)


def _views(t: torch.Tensor, param: Param) -> bool:
    """Whether param_view(t) shares t's memory (no copy)."""
    return param_view(t, param).data_ptr() == t.data_ptr()


def test_what_param_view_views_binds_with_no_view(monkeypatch):
    """Every layout above that param_view reads in place binds from its sizes alone (a view
    each would double a launch's host time); only the copies take param_view's path."""
    import runtime.cubin

    def no_view(t, param):
        raise AssertionError(f"{param.name} {tuple(t.shape)} {t.stride()} took a view")

    runtime.cubin._abi_values.cache_clear()
    monkeypatch.setattr(runtime.cubin, "_viewed", no_view)
    in_place = [(t, p) for t, p in layouts() if _views(t, p)]
    assert len(in_place) == len(list(layouts())) - 2
    for t, param in in_place:
        abi_values(t, param)
