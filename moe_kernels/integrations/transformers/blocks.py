"""Sparse-MoE blocks whose own ``forward`` cannot take the fused router and experts, and which
``patch`` therefore switches too: Llama 4's block runs every expert on every token, each on the
token scaled by its routing weight (zero where the expert was not chosen, whose output is then
zero), and sums them. Switched, it runs the chosen experts only, on their weighted tokens."""

from __future__ import annotations

from torch import Tensor, nn

from ..._precision import KeepsFp32
from .router_source import class_forward_digest, family_of

# family -> (block class, the digest of the forward the fused block computes).
BLOCKS: dict[str, tuple[str, str]] = {"llama4": ("Llama4TextMoe", "ee8c74103a9b")}


def block_to_fuse(block: nn.Module) -> str | bool:
    """True where ``patch`` must switch ``block`` to ``FusedInputWeightedBlock``, False where its
    own forward runs the fused router and experts, or why it cannot be patched."""
    cls = type(block)
    for family, (name, digest) in BLOCKS.items():
        if cls.__name__ == name and family_of(cls) == family:
            if class_forward_digest(cls) != digest:
                return "its block's code in this transformers is not the code moe_kernels computes"
            return True
    return False


class FusedInputWeightedBlock(nn.Module):
    """Mixed into Llama 4's block class by ``patch``: ``shared_expert(x) + sum over the chosen
    experts e of expert_e(weight_e * x)``, and the router logits, as the original returns them.
    """

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        weights, router_logits, ids = self.router(x)
        routed = self.experts.moe_forward(x, ids, weights, weigh_inputs=True)
        return self.shared_expert(x) + routed, router_logits


class KeepsBiasFp32(KeepsFp32):
    """Mixed by ``patch``, under loss-free balancing, into a block that holds its router's bias
    and passes it to the router (MiniMax-M2, AFMoE; ``Routing.bias_argument``, the name
    ``fp32_tensors`` gives): the bias stays fp32 through the model's dtype casts, as a router's
    own does. The block's forward is its own."""
