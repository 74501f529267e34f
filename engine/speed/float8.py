"""float8 base weights: row-wise float8 storage with bf16 matmuls, or float8 scaled matmuls with a float8 backward."""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.hardware import default_device
from engine.speed.blocks import _blocks

log = logging.getLogger(__name__)


FLOAT8_DTYPE = torch.float8_e4m3fn


FLOAT8_MAX = torch.finfo(FLOAT8_DTYPE).max  # 448


# ---------------------------------------------------------------------------------------------- float8 weights

def float8_compute_support(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether float8 matmuls (`torch._scaled_mm`) run on `device`, and a sentence saying why not."""
    device = torch.device(device) if device else default_device()
    if device.type != "cuda":
        return False, f"float8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer; the device is {device}."
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, f"{name} (compute capability {major}.{minor}) has no float8 matmuls; 8.9+ (Ada, Hopper) does."
    return True, ""


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 weight and float32 scale per output row, so that weight ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FLOAT8_MAX
    q = (w / scale[:, None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8_DTYPE)
    return q, scale


def _dequantize(weight8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight8.to(dtype) * scale.to(dtype)[:, None]


class _Float8StorageLinear(torch.autograd.Function):
    """y = x @ dequant(W).T + b, saving only the float8 weight: backward recomputes dequant(W) for grad_input."""

    @staticmethod
    def forward(ctx, x, weight8, scale, bias, compute_dtype):
        ctx.save_for_backward(weight8, scale)
        ctx.compute_dtype, ctx.input_dtype = compute_dtype, x.dtype
        return F.linear(x.to(compute_dtype), _dequantize(weight8, scale, compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight8, scale = ctx.saved_tensors
        grad_in = grad_out.to(ctx.compute_dtype) @ _dequantize(weight8, scale, ctx.compute_dtype)
        return grad_in.to(ctx.input_dtype), None, None, None, None


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 rows and their float32 scales [rows, 1] (an activation or gradient before a scaled matmul)."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_MAX
    return (x / x_scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8_DTYPE), x_scale


class _Float8ScaledMatmulLinear(torch.autograd.Function):
    """float8 matmuls: activations quantised per row, weights per output row.

    Backward (input gradient only) runs in float8 too when `float8_backward`: the weight's row scales are folded
    into the gradient's columns, the gradient is quantised per row, and the weight is used transposed (a 1-byte
    copy per call, cheaper than storing both layouts). Otherwise backward dequantises to bf16.
    """

    @staticmethod
    def forward(ctx, x, weight8, scale, bias, compute_dtype, float8_backward):
        ctx.save_for_backward(weight8, scale)
        ctx.compute_dtype, ctx.input_dtype, ctx.float8_backward = compute_dtype, x.dtype, float8_backward
        x8, x_scale = _quantize_rows(x.reshape(-1, x.shape[-1]).float())
        out = torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=compute_dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight8.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        weight8, scale = ctx.saved_tensors
        if not ctx.float8_backward:
            grad_in = grad_out.to(ctx.compute_dtype) @ _dequantize(weight8, scale, ctx.compute_dtype)
            return grad_in.to(ctx.input_dtype), None, None, None, None, None
        g8, g_scale = _quantize_rows(grad_out.reshape(-1, grad_out.shape[-1]).float() * scale[None, :])
        ones = torch.ones(1, weight8.shape[1], device=weight8.device, dtype=torch.float32)
        grad_in = torch._scaled_mm(g8, weight8.t().contiguous().t(), scale_a=g_scale, scale_b=ones,
                                   out_dtype=ctx.compute_dtype)
        return grad_in.reshape(*grad_out.shape[:-1], weight8.shape[1]).to(ctx.input_dtype), None, None, None, None, None


class Float8Linear(nn.Linear):
    """A frozen Linear whose weight is stored as float8 e4m3 with a float32 scale per output row.

    A subclass of nn.Linear so peft wraps it like any Linear; `compute_dtype` tells peft which dtype the LoRA
    beside it should take (peft reads it instead of the float8 weight's dtype).
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, scaled_mm: bool, float8_backward: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight8, scale = quantize_rowwise(linear.weight)
        self.weight = nn.Parameter(weight8, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.scaled_mm = scaled_mm
        self.float8_backward = float8_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm:
            return _Float8ScaledMatmulLinear.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype,
                                                   self.float8_backward)
        return _Float8StorageLinear.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        mode = ("float8 matmul" + (" (and backward)" if self.float8_backward else "")) if self.scaled_mm else \
            "float8 storage"
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}, compute={self.compute_dtype}"


@dataclasses.dataclass
class Float8Report:
    """What a float8 conversion did: how many Linears, in which mode, and the bytes saved."""

    converted: int
    mode: Literal["storage", "compute"]
    bytes_before: int
    bytes_after: int
    message: str = ""


def _frozen_block_linears(transformer: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every frozen base Linear inside the transformer blocks, LoRA layers excluded."""
    found = []
    for block in _blocks(transformer):
        for parent_name, parent in block.named_modules():
            if "lora_" in parent_name:
                continue
            for attr, child in parent.named_children():
                if (type(child) is nn.Linear and not child.weight.requires_grad and "lora_" not in attr
                        and child.weight.dtype != FLOAT8_DTYPE):
                    found.append((parent, attr, child))
    return found


def _convert_to_float8(transformer: nn.Module, compute_dtype: torch.dtype, scaled_mm: bool,
                       float8_backward: bool = False) -> tuple[int, int, int]:
    count = before = after = 0
    found = _frozen_block_linears(transformer)
    while found:  # drop each bf16 weight as soon as its float8 copy exists
        parent, attr, linear = found.pop(0)
        use_mm = scaled_mm and linear.in_features % 16 == 0 and linear.out_features % 16 == 0
        new = Float8Linear(linear, compute_dtype, use_mm, float8_backward and use_mm)
        before += linear.weight.numel() * linear.weight.element_size()
        after += new.weight.numel() + new.weight_scale.numel() * 4
        setattr(parent, attr, new)
        del linear
        count += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count, before, after


def apply_float8_storage(transformer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> Float8Report:
    """Store every frozen base Linear of the blocks as float8 e4m3 (+ row scales); matmuls stay in `compute_dtype`.

    Halves the blocks' weight memory against bf16. Trainable Linears and LoRA layers are left alone; the embedders
    and the output projection (small) stay as they are.
    """
    count, before, after = _convert_to_float8(transformer, compute_dtype, scaled_mm=False)
    return Float8Report(count, "storage", before, after)


def apply_float8_compute(transformer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, *,
                         float8_backward: bool = True, require_float8_device: bool = True) -> Float8Report:
    """float8 weights and float8 matmuls (`torch._scaled_mm`, row-wise scales) for the blocks' frozen Linears.

    `float8_backward`: the input gradient (what flows to the LoRA of earlier layers) is computed in float8 too;
    False keeps that matmul in bf16.
    Only where the card has float8 matmuls (Ada/Hopper); elsewhere falls back to float8 storage with bf16 matmuls and
    says so in the report's message (and the log). `require_float8_device=False` runs `_scaled_mm` wherever
    PyTorch provides it (the CPU tests use this to check the arithmetic).
    """
    device = next((p.device for p in transformer.parameters()), torch.device("cpu"))
    supported, why = float8_compute_support(device)
    if require_float8_device and not supported:
        report = apply_float8_storage(transformer, compute_dtype)
        report.message = f"float8 matmuls unavailable ({why}) Using float8 storage with {compute_dtype} matmuls."
        log.warning(report.message)
        return report
    count, before, after = _convert_to_float8(transformer, compute_dtype, scaled_mm=True,
                                              float8_backward=float8_backward)
    return Float8Report(count, "compute", before, after)
