"""The router: fp32 logits, then biased top-k choice with its histogram in one op."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._arguments import check_choice, check_int, check_number
from ._precision import KeepsFp32

SCORE_FNS = ("sigmoid", "softmax", "sqrtsoftplus")


class Router(KeepsFp32):
    """Token-choice router: ``logits = x @ weight.T`` in fp32 (whatever the model's dtype:
    the weight stays fp32 too), then ``ops.biased_topk``.

    Args:
        hidden_size: H.
        num_experts: E.
        topk: k, experts per token.
        score_fn: "sigmoid" (DeepSeek-V3), "softmax" or "sqrtsoftplus" (DeepSeek-V4).
        n_groups, topk_groups, group_score: group-limited routing (see ``ops.biased_topk``).
        normalize: make each token's k weights sum to 1 (before ``route_scale``).
        route_scale: multiply the weights by this (DeepSeek's routed scaling factor).
    """

    fp32_tensors = ("weight",)

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        topk: int,
        *,
        score_fn: str = "sigmoid",
        n_groups: int = 1,
        topk_groups: int = 1,
        group_score: str = "top2",
        normalize: bool = True,
        route_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("num_experts", num_experts, 1)
        check_int("topk", topk, 1)
        if topk > num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
        check_choice("score_fn", score_fn, SCORE_FNS)
        check_int("n_groups", n_groups, 1)
        check_int("topk_groups", topk_groups, 1)
        check_number("route_scale", route_scale, strict=True)
        # The group rules (n_groups divides E, topk_groups in [1, n_groups] leaving k experts to
        # choose from, group_score) are the op's own: it checks them on zero tokens, on the CPU
        # (a model built on the meta device would reach only the fake kernel, which checks none).
        no_tokens = torch.empty(0, num_experts, device="cpu")
        try:
            ops.biased_topk(
                no_tokens, None, topk, score_fn, n_groups, topk_groups, normalize, route_scale,
                group_score,
            )  # fmt: skip
        except RuntimeError as error:
            raise ValueError(str(error).splitlines()[0]) from None
        self.num_experts = num_experts
        self.topk = topk
        self.score_fn = score_fn
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.group_score = group_score
        self.normalize = normalize
        self.route_scale = route_scale
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)

    def logits(self, x: Tensor) -> Tensor:
        """[T, H] tokens -> [T, E] fp32 logits (fp64 for fp64 tokens)."""
        if x.dtype == torch.float64:
            return F.linear(x, self.weight.double())
        return F.linear(x.float(), self.weight)

    def forward(self, logits: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """[T, E] logits and the loss-free bias -> (weights [T, k] fp32, ids [T, k] int64,
        tokens_per_expert [E] int64)."""
        return ops.biased_topk(
            logits,
            bias,
            self.topk,
            self.score_fn,
            self.n_groups,
            self.topk_groups,
            self.normalize,
            self.route_scale,
            self.group_score,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.weight.shape[1]}, num_experts={self.num_experts}, "
            f"topk={self.topk}, score_fn={self.score_fn}, n_groups={self.n_groups}, "
            f"topk_groups={self.topk_groups}, route_scale={self.route_scale}"
        )
