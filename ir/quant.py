"""Weight quantization formats in torch (see ops.QuantizeWeight): the reference of the
QuantizeWeight and QuantLinear ops, and the oracle of their kernels.

int4: asymmetric round-to-nearest per group of `group_size` inputs of an output row; the
scale is stored in the weight's dtype and the codes are computed against the stored scale.
fp8: e4m3 per output row, scaled so that the row's largest magnitude maps to 448.
"""

from __future__ import annotations

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize(w: torch.Tensor, fmt: str, group_size: int) -> tuple[torch.Tensor, ...]:
    return quantize_int4(w, group_size) if fmt == "int4" else quantize_fp8(w)


def dequantize(fmt: str, group_size: int, qweight, scales, zeros, dtype) -> torch.Tensor:
    """The [out, in] weight in `dtype`, computed in float32 and rounded once."""
    if fmt == "fp8":
        return (qweight.float() * scales[:, None]).to(dtype)
    n, groups = scales.shape
    q = unpack_int4(qweight).view(n, groups, group_size).float()
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(n, -1).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo = groups.amin(-1).clamp(max=0)  # the range holds 0, so zero is a code
    hi = groups.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(w.dtype).tiny).to(w.dtype)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(groups / s[..., None] + zeros[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(n, k).to(torch.int32)), scales, zeros.to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] codes in 0..15 -> int32 [out, in / 8], eight to a word, the first lowest."""
    words = q.reshape(q.shape[0], -1, 8) << shifts(q.device)
    words = words.sum(-1, dtype=torch.int64)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # wrapped


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [out, in / 8] -> int32 codes [out, in]."""
    return ((qweight[..., None] >> shifts(qweight.device)) & 15).reshape(qweight.shape[0], -1)


def shifts(device) -> torch.Tensor:
    """The bit offsets of a word's eight codes, lowest first (made on the device: a copy from
    the host could not be captured in a CUDA graph)."""
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = (w.float().abs().amax(1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales
