"""transformers' stacked-expert modules, run as permute -> fused SwiGLU grouped GEMM -> grouped
GEMM -> unpermute."""

from __future__ import annotations

from torch import Tensor, nn

from ... import ops
from ..._nvtx import nvtx_range
from ...experts import swiglu_experts

SILU_CLASSES = ("SiLU", "SiLUActivation")


def unsupported_experts(experts: nn.Module) -> str | None:
    """Why ``experts`` cannot run on this package's ops, or None when it can: SwiGLU experts
    stored as transformers stores them by default (``gate_up_proj`` [E, 2F, H], gate rows
    first, ``down_proj`` [E, H, F], no biases, no post-expert norm, not expert-parallel)."""
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor):
        return "its experts have no stacked gate_up_proj and down_proj weights"
    layout = {
        "has_gate": True,
        "has_bias": False,
        "is_transposed": False,
        "is_concatenated": True,
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
    for flag, expected in layout.items():
        if getattr(experts, flag, expected) != expected:
            return f"its experts have {flag}={not expected}"
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return "its experts have their own gating function"
    activation = type(getattr(experts, "act_fn", None)).__name__
    if activation not in SILU_CLASSES:
        return f"its experts' activation is {activation}, not SiLU"
    num_experts, two_ffn, hidden = gate_up.shape if gate_up.dim() == 3 else (0, 0, 0)
    if (
        gate_up.dim() != 3
        or two_ffn % 2
        or tuple(down.shape) != (num_experts, hidden, two_ffn // 2)
    ):
        return (
            f"its expert weights have shapes {tuple(gate_up.shape)} and {tuple(down.shape)}, "
            "not [E, 2F, H] and [E, H, F]"
        )
    return None


class FusedExperts(nn.Module):
    """Mixed into an experts module's class by ``patch``: the same ``forward(hidden_states,
    top_k_index, top_k_weights)`` on this package's ops, with the module's own weights."""

    moe_backend: str = "auto"

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        with nvtx_range("permute"):
            rows, row_map, tokens_per_expert = ops.permute(
                hidden_states, top_k_index, self.gate_up_proj.shape[0]
            )
        with nvtx_range("experts"):
            rows = swiglu_experts(
                rows, self.gate_up_proj, self.down_proj, tokens_per_expert, self.moe_backend
            )
        with nvtx_range("unpermute"):
            # Under autocast the products run in its dtype; the block's output keeps the input's.
            return ops.unpermute(rows, row_map, top_k_weights).to(hidden_states.dtype)
