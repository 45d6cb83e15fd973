"""--fp8: the frozen base linears of the decoder layers run their two GEMMs in FP8 (e4m3).

A frozen linear has two GEMMs in training: y = x W^T forward, and dx = dy W backward (no weight
gradient). Both run through torch._scaled_mm on FP8 operands with float32 scales, so that
t ~= fp8(t / scale) * scale; the weight is quantised once (W for the forward, W^T for the backward,
each scaled along the dimension the GEMM keeps), x and dy at every step. Row-wise scaling gives
each row (a position, an output feature) its own scale; tensor-wise one scale per tensor, fewer
kernels but coarser. The LoRA side path, norms, attention, heads and everything trained stay in
bf16, and the bf16 weights stay too (merging, saving and the fp8 copies' source), so adapters
trained with --fp8 are ordinary adapters. FP8 GEMMs are not exact (README "Performance").
"""
from __future__ import annotations

import torch
import torch.nn as nn

from errors import ConfigError
from lora import LoRALinear
from model import replace_modules, retyped

E4M3 = torch.float8_e4m3fn
SCALINGS = ("rowwise", "tensorwise")


def check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    """FP8 tensor cores are on compute capability 8.9 (Ada) and 9.0 (Hopper) and newer; the GEMMs
    write bf16, the activations' dtype."""
    if device.type != "cuda":
        raise ConfigError(f"--fp8 needs a GPU with FP8 tensor cores (H100 or newer); the device is "
                          f"{device.type}; leave --fp8 off")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ConfigError(f"--fp8 needs FP8 tensor cores (compute capability 8.9 or newer); "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; "
                          "leave --fp8 off")
    if dtype != torch.bfloat16:
        raise ConfigError(f"--fp8 runs under bfloat16 compute; --dtype is {str(dtype)[6:]}; use "
                          "--dtype bfloat16 (auto on a GPU) or leave --fp8 off")


def quantize(t: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 tensor, float32 scale) of a 2-D t: one scale per row, or one for the tensor."""
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    # 448: e4m3's largest value; a literal, since Dynamo lifts a global float as a graph input
    scale = amax.float().clamp(min=1e-12) / 448.0
    return (t.float() / scale).to(E4M3).contiguous(), scale  # row-major, as the kernel reads


def scaled_mm(a8, a_scale, b8_t, b_scale, out_dtype) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T from fp8 rows: b8_t is b transposed, the column-major layout the
    kernel reads; row-wise scales are (M, 1) and (1, N)."""
    return torch._scaled_mm(a8, b8_t, scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype)


class Float8Matmul(torch.autograd.Function):
    """x W^T for a 2-D x, with x and dy quantised per call; the weight comes quantised both ways."""

    @staticmethod
    def forward(ctx, x, w8, w_scale, wt8, wt_scale, rowwise: bool):
        x8, x_scale = quantize(x, rowwise)
        ctx.save_for_backward(wt8, wt_scale)
        ctx.rowwise = rowwise
        return scaled_mm(x8, x_scale, w8.t(), w_scale, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        wt8, wt_scale = ctx.saved_tensors
        dy8, dy_scale = quantize(dy, ctx.rowwise)
        return scaled_mm(dy8, dy_scale, wt8.t(), wt_scale, dy.dtype), None, None, None, None, None


class Float8Base:
    """A frozen weight's FP8 copies as buffers outside the state dict (rebuilt, never saved)."""

    def quantize_weight(self, rowwise: bool) -> "Float8Base":
        self.rowwise = rowwise
        w = self.weight.detach()
        for name, t in zip(("w8", "w_scale", "wt8", "wt_scale"),
                           (*quantize(w, rowwise), *quantize(w.t().contiguous(), rowwise))):
            self.register_buffer(name, t, persistent=False)
        return self

    def base(self, x: torch.Tensor) -> torch.Tensor:
        y = Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.w8, self.w_scale, self.wt8,
                               self.wt_scale, self.rowwise).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Float8Linear(Float8Base, nn.Linear):
    """A frozen nn.Linear whose GEMMs run in FP8."""

    def forward(self, x):
        return self.base(x)


class Float8LoRALinear(Float8Base, LoRALinear):
    """A LoRA linear whose frozen base GEMMs run in FP8 (merged, the bf16 weight runs)."""


@torch.no_grad()
def use_fp8(model: nn.Module, scaling: str = "rowwise") -> int:
    """Give each frozen linear of the decoder layers (LoRA-wrapped or not) its FP8 type; heads and
    trained modules stay. Returns the number converted."""
    def make(name, m):
        if type(m) in (nn.Linear, LoRALinear) and name.startswith("layers.") \
                and not m.weight.requires_grad:
            kind = Float8LoRALinear if type(m) is LoRALinear else Float8Linear
            return retyped(m, kind).quantize_weight(scaling == "rowwise")
    return replace_modules(model, make)
