"""SwiGLU expert FFNs: the routed experts on the grouped GEMM, and the dense shared experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops


def _init_uniform(weight: Tensor, fan_in: int) -> None:
    # nn.Linear's default scale, per expert.
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFNs, ``down(silu(gate(x)) * up(x))``, over rows already grouped by expert.

    Weights are stored as transformers' MoE blocks store them (``nn.Linear`` layout, out x in,
    stacked): ``gate_up_proj`` [E, 2F, H] (the gate projection's F rows, then the up
    projection's) and ``down_proj`` [E, H, F]. The first product runs with SwiGLU fused into
    its epilogue (``ops.grouped_gemm_swiglu``), the second is ``ops.grouped_gemm``.

    Args:
        num_experts: E (the experts held here: the local ones under expert parallelism).
        hidden_size: H.
        ffn_hidden_size: F, each expert's intermediate size.
        backend: the grouped GEMM backend, "kernel" or "cublas" (see ``ops.grouped_gemm``).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, ffn_hidden_size: int, backend: str = "kernel"
    ) -> None:
        super().__init__()
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.gate_up_proj, self.gate_up_proj.shape[2])
        _init_uniform(self.down_proj, self.down_proj.shape[2])

    def forward(self, rows: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """[R, H] rows in expert order, [E] rows per expert -> [R, H].

        Under ``torch.autocast`` rows and weights are cast to autocast's dtype, as autocast
        casts an ``nn.Linear``'s operands (it does not know the grouped GEMMs, which are custom
        ops), so fp32 master weights train through bf16 products."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(rows.device.type):
            dtype = torch.get_autocast_dtype(rows.device.type)
            rows, gate_up, down = rows.to(dtype), gate_up.to(dtype), down.to(dtype)
        hidden = ops.grouped_gemm_swiglu(
            rows, gate_up, tokens_per_expert, trans_b=True, backend=self.backend
        )
        return ops.grouped_gemm(hidden, down, tokens_per_expert, trans_b=True, backend=self.backend)

    def extra_repr(self) -> str:
        num_experts, two_ffn, hidden = self.gate_up_proj.shape
        return (
            f"num_experts={num_experts}, hidden_size={hidden}, ffn_hidden_size={two_ffn // 2}, "
            f"backend={self.backend}"
        )


class SwiGLUMLP(nn.Module):
    """One dense SwiGLU FFN: DeepSeekMoE's shared experts (all of them as one FFN of
    ``num_shared_experts * F`` intermediate size, which computes the same as their sum)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(2 * ffn_hidden_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.gate_up_proj, self.gate_up_proj.shape[1])
        _init_uniform(self.down_proj, self.down_proj.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj)
