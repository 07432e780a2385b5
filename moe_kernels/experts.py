"""SwiGLU expert FFNs: the routed experts on the grouped GEMM, and the dense shared experts."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from . import ops


def _init_uniform(weight: Tensor, fan_in: int) -> None:
    # nn.Linear's default scale, per expert.
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFNs, ``down(silu(gate(x)) * up(x))``, over rows already grouped by expert;
    under expert parallelism, the ``num_local_experts`` of them from ``first_expert`` on.

    Weights are stored as transformers' MoE blocks store them (``nn.Linear`` layout, out x in,
    stacked): ``gate_up_proj`` [E, 2F, H] (the gate projection's F rows, then the up
    projection's) and ``down_proj`` [E, H, F]. The first product runs with SwiGLU fused into
    its epilogue (``ops.grouped_gemm_swiglu``), the second is ``ops.grouped_gemm``.

    Initialisation draws all E experts' weights and keeps the local ones, so a model sharded
    over any number of ranks starts from the weights of the unsharded one.

    Args:
        num_experts: E, over the whole expert-parallel group.
        hidden_size: H.
        ffn_hidden_size: F, each expert's intermediate size.
        backend: the grouped GEMM backend, one of ``ops.GROUPED_GEMM_BACKENDS`` (see
            ``ops.grouped_gemm``; "auto": the fastest path of the device).
        first_expert, num_local_experts: the experts held here (default: all of them).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        backend: str = "auto",
        *,
        first_expert: int = 0,
        num_local_experts: int | None = None,
    ) -> None:
        super().__init__()
        local = num_experts - first_expert if num_local_experts is None else num_local_experts
        if not (0 <= first_expert and 0 < local and first_expert + local <= num_experts):
            raise ValueError(
                f"experts [{first_expert}, {first_expert + local}) are not a non-empty range "
                f"of num_experts={num_experts}"
            )
        self.backend = backend
        self.num_experts = num_experts
        self.first_expert = first_expert
        self.gate_up_proj = nn.Parameter(torch.empty(local, 2 * ffn_hidden_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(local, hidden_size, ffn_hidden_size))
        self.reset_parameters()

    @property
    def num_local_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    @property
    def sharded(self) -> bool:
        return self.num_local_experts != self.num_experts

    def reset_parameters(self) -> None:
        self.init_local(self.gate_up_proj, lambda w: _init_uniform(w, w.shape[2]))
        self.init_local(self.down_proj, lambda w: _init_uniform(w, w.shape[2]))

    @torch.no_grad()
    def init_local(self, weight: Tensor, init: Callable[[Tensor], object]) -> None:
        """Initialises ``weight`` (a parameter of this module) as ``init`` would initialise the
        weights of all E experts, keeping the local ones: the same random draws on every rank
        and for every group size."""
        every_expert = weight.new_empty((self.num_experts, *weight.shape[1:]))
        init(every_expert)
        weight.copy_(every_expert[self.first_expert : self.first_expert + self.num_local_experts])

    def forward(self, rows: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """[R, H] rows in expert order, [E] rows per expert -> [R, H] (see ``swiglu_experts``)."""
        return swiglu_experts(
            rows, held(self.gate_up_proj), held(self.down_proj), tokens_per_expert, self.backend
        )

    def extra_repr(self) -> str:
        local, two_ffn, hidden = self.gate_up_proj.shape
        shard = f" (experts {self.first_expert}..{self.first_expert + local - 1})"
        return (
            f"num_experts={self.num_experts}{shard if self.sharded else ''}, "
            f"hidden_size={hidden}, ffn_hidden_size={two_ffn // 2}, backend={self.backend}"
        )


def held(weight: Tensor) -> Tensor:
    """The experts this rank holds of a weight: under FSDP2 with expert parallelism the weight
    is a DTensor of all E experts, sharded over the expert-parallel ranks, whose local part is
    this rank's (``moe_kernels.fsdp``)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def swiglu_experts(
    rows: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    tokens_per_expert: Tensor,
    backend: str = "auto",
    linear_layout: bool = True,
    **glu: float,
) -> Tensor:
    """SwiGLU experts over rows grouped by expert: ``down_e(silu(gate_e(x)) * up_e(x))``, with
    ``gate_up_proj`` [E, 2F, H] (gate rows, then up rows) and ``down_proj`` [E, H, F] in
    ``nn.Linear`` layout, or without ``linear_layout`` stored for ``x @ W`` ([E, H, 2F] and
    [E, F, H]). The first product runs with SwiGLU (or the variant of ``glu``: ``alpha``,
    ``limit``, ``up_offset``, see ``ops.swiglu``) fused into its epilogue."""
    hidden = swiglu_gate_up(rows, gate_up_proj, tokens_per_expert, backend, linear_layout, **glu)
    return swiglu_down(hidden, down_proj, tokens_per_expert, backend, linear_layout)


def swiglu_gate_up(
    rows: Tensor,
    gate_up_proj: Tensor,
    tokens_per_expert: Tensor,
    backend: str = "auto",
    linear_layout: bool = True,
    **glu: float,
) -> Tensor:
    """The experts' first half: ``silu(gate_e(x)) * up_e(x)`` (or ``glu``'s variant), [R, H] ->
    [R, F]."""
    rows, gate_up_proj = autocast_operands(rows, gate_up_proj)
    return ops.grouped_gemm_swiglu(
        rows, gate_up_proj, tokens_per_expert, trans_b=linear_layout, backend=backend, **glu
    )


def swiglu_down(
    hidden: Tensor,
    down_proj: Tensor,
    tokens_per_expert: Tensor,
    backend: str = "auto",
    linear_layout: bool = True,
) -> Tensor:
    """The experts' second half: ``down_e(hidden)``, [R, F] -> [R, H]."""
    hidden, down_proj = autocast_operands(hidden, down_proj)
    return ops.grouped_gemm(
        hidden, down_proj, tokens_per_expert, trans_b=linear_layout, backend=backend
    )


def autocast_operands(rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Under ``torch.autocast``, rows and weights cast to autocast's dtype, as autocast casts an
    ``nn.Linear``'s operands (it does not know the grouped GEMMs, which are custom ops), so fp32
    master weights train through bf16 products."""
    if not torch.is_autocast_enabled(rows.device.type):
        return rows, weight
    dtype = torch.get_autocast_dtype(rows.device.type)
    return rows.to(dtype), weight.to(dtype)


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
        return self.down(self.up(x))

    # The two halves, which MoELayer overlaps with the dispatch and the combine. On the CPU,
    # one expert of the grouped GEMMs: in fp32 the same library GEMMs as F.linear, and in bf16
    # their fp32 product where torch has no native bf16 GEMM (grouped_gemm_blas.cpp): there the
    # DeepSeek-V3-like block's bf16 forward+backward took 18.1 s with F.linear (its backward's
    # GEMMs at 0.5 GFLOP/s), 3.0 s so.
    def up(self, x: Tensor) -> Tensor:
        """[..., H] -> [..., F]: ``silu(gate(x)) * up(x)``."""
        if x.is_cpu:
            rows = x.reshape(-1, x.shape[-1])
            hidden = swiglu_gate_up(rows, self.gate_up_proj[None], _one_segment(rows))
            return hidden.view(*x.shape[:-1], hidden.shape[-1])
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return F.silu(gate) * up

    def down(self, hidden: Tensor) -> Tensor:
        """[..., F] -> [..., H]."""
        if hidden.is_cpu:
            rows = hidden.reshape(-1, hidden.shape[-1])
            out = swiglu_down(rows, self.down_proj[None], _one_segment(rows))
            return out.view(*hidden.shape[:-1], out.shape[-1])
        return F.linear(hidden, self.down_proj)


def _one_segment(rows: Tensor) -> Tensor:
    return torch.tensor([rows.shape[0]])
