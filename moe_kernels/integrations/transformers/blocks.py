"""Sparse-MoE blocks whose own ``forward`` cannot take the fused router and experts, and which
``patch`` therefore switches too:

- Llama 4's block runs every expert on every token, each on the token scaled by its routing
  weight (zero where the expert was not chosen, whose output is then zero), and sums them.
  Switched, it runs the chosen experts only, on their weighted tokens.
- DBRX's block routes itself, from the logits its router returns. Switched, its router (fused)
  routes, and the block runs the chosen experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ..._precision import KeepsFp32
from .router_source import class_forward_digest, family_of


class FusedBlock(nn.Module):
    """What ``patch`` mixes into a block it switches (``BLOCKS``)."""


class FusedInputWeightedBlock(FusedBlock):
    """Mixed into Llama 4's block class by ``patch``: ``shared_expert(x) + sum over the chosen
    experts e of expert_e(weight_e * x)``, and the router logits, as the original returns them.
    """

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        weights, router_logits, ids = self.router(x)
        routed = self.experts.moe_forward(x, ids, weights, weigh_inputs=True)
        return self.shared_expert(x) + routed, router_logits


class FusedRoutingBlock(FusedBlock):
    """Mixed into DBRX's block class by ``patch``: its fused router's choice and weights (the
    block's ``route_tokens_to_experts`` of the router's logits), then its experts on them."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        # The router first: it jitters the tokens in place, which the experts then take.
        _, weights, ids = self.router(hidden_states)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.experts(x, ids, weights).view(hidden_states.shape)


@dataclass(frozen=True)
class BlockRecipe:
    """A block ``patch`` switches: its class, the digests (``router_source``) of the methods
    whose code the fused block computes, the mixin, and what of an instance the recipe cannot
    compute, if anything (a function of the block: the reason, or None)."""

    name: str
    digests: dict[str, str]
    fused: type[FusedBlock]
    refuses: Callable[[nn.Module], str | None] | None = None


def _dbrx_refuses(block: nn.Module) -> str | None:
    norm = block.moe_normalize_expert_weights
    if norm is None or norm == 1:
        return None
    return f"its routing weights are divided by their {norm}-norm, not their sum (the 1-norm)"


BLOCKS: dict[str, BlockRecipe] = {
    "llama4": BlockRecipe("Llama4TextMoe", {"forward": "ee8c74103a9b"}, FusedInputWeightedBlock),
    "dbrx": BlockRecipe(
        "DbrxFFN",
        {"forward": "09ba222b3c26", "route_tokens_to_experts": "99d1adb8a6a3"},
        FusedRoutingBlock,
        _dbrx_refuses,
    ),
}


def block_code_matches(recipe: BlockRecipe, method_digests: dict[str, str]) -> bool:
    """Whether a block class's {method: digest} has the code ``recipe`` computes."""
    return all(method_digests.get(method) == digest for method, digest in recipe.digests.items())


def block_to_fuse(block: nn.Module) -> type[FusedBlock] | str | None:
    """The mixin ``patch`` must switch ``block`` to, None where its own forward runs the fused
    router and experts, or why it cannot be patched."""
    cls = type(block)
    for family, recipe in BLOCKS.items():
        if cls.__name__ == recipe.name and family_of(cls) == family:
            digests = {method: class_forward_digest(cls, method) for method in recipe.digests}
            if not block_code_matches(recipe, digests):
                return "its block's code in this transformers is not the code moe_kernels computes"
            reason = recipe.refuses(block) if recipe.refuses is not None else None
            return reason or recipe.fused
    return None


class KeepsBiasFp32(KeepsFp32):
    """Mixed by ``patch``, under loss-free balancing, into a block that holds its router's bias
    and passes it to the router (MiniMax-M2, AFMoE; ``Routing.bias_argument``, the name
    ``fp32_tensors`` gives): the bias stays fp32 through the model's dtype casts, as a router's
    own does. The block's forward is its own."""
