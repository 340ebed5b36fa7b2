"""Weight-only INT8: per-output-channel symmetric round-to-nearest.

Idea: each output row ``W_i`` gets one scale ``s_i = max_j |W_ij| / 127`` and is stored as
``q_ij = round(W_ij / s_i)`` in [-127, 127]; the layer computes with ``q_ij * s_i``. A weight
that pruning set to zero stays exactly zero (``round(0) = 0``), so sparsity and quantization
compose: a sparse INT8 layer stores its bitmask, one byte per kept weight and one scale per row.

The scale keeps 16 mantissa bits (the rest rounded off) so that ``q * s`` and ``127 * s`` are
exact in float32: quantizing an already quantized float32 weight gives back the very same
``q`` and ``s``, which is what lets a checkpoint writer recover them from the weights in memory.

Pure math: tensors in, tensors out.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
_SCALE_BITS = 16  # 16 + 7 bits (|q| <= 127) fit float32's 24-bit significand: q * s is exact


def _round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return torch.ldexp(torch.round(mantissa * 2.0 ** bits) / 2.0 ** bits, exponent.float())


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of a weight (out, in): q int8 (out, in), scale float32 (out,).

    A row of zeros gets scale 1 (any scale reproduces it)."""
    w = weight.detach().float()  # (out, in)
    absmax = w.abs().amax(dim=1)  # (out,)
    scale = _round_mantissa(absmax / INT8_MAX, _SCALE_BITS)
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight (out, in) an INT8 layer computes with, in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def fake_quantize_(weight: torch.Tensor, kind: str = "int8") -> dict:
    """Replace ``weight`` (out, in), in place, by its dequantized ``kind`` version; returns the
    largest absolute rounding error and the zeros before and after (small weights may round to 0)."""
    if kind != "int8":
        raise ValueError(f"no quantizer for {kind!r}")
    q, scale = quantize_int8(weight)
    new = dequantize_int8(q, scale, weight.dtype)
    info = {"max_abs_error": float((new.float() - weight.float()).abs().max().item()),
            "zeros_before": int((weight == 0).sum().item()), "zeros_after": int((new == 0).sum().item())}
    weight.copy_(new)
    return info


def quantize_weights(weights: dict[str, torch.Tensor], kind: str = "int8") -> dict:
    """:func:`fake_quantize_` on every named weight; a JSON-ready summary."""
    infos = {name: fake_quantize_(w, kind) for name, w in weights.items()}
    return {"type": kind, "layers": len(infos),
            "max_abs_error": max((i["max_abs_error"] for i in infos.values()), default=0.0),
            "zeros_before": sum(i["zeros_before"] for i in infos.values()),
            "zeros_after": sum(i["zeros_after"] for i in infos.values())}
