"""Fake (meta) kernels: output shapes and dtypes of every op, for torch.compile and opcheck.

Defaults repeat the schema's: the dispatcher drops arguments equal to their default.
Data-dependent sizes: ``permute`` returns T * k rows when ``align`` is 1 and an unbacked size
(at least T * k) otherwise.
"""

import torch
from torch import Tensor

from .ops import GROUPED_GEMM_BACKENDS


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(tensor: Tensor | None, ref: Tensor, name: str, ref_name: str) -> None:
    """The native ops' device check, repeated here: a meta or fake tensor mixed with real ones
    dispatches to these kernels, never to the native ones."""
    if tensor is not None:
        torch._check(
            tensor.device == ref.device,
            lambda: (
                f"{name} must be on the device of {ref_name} ({ref.device}), got {tensor.device}"
            ),
        )


@torch.library.register_fake("moe_kernels::biased_topk")
def _(
    logits,
    bias,
    k,
    score_fn="sigmoid",
    n_groups=1,
    topk_groups=1,
    normalize=True,
    scale=1.0,
    group_score="top2",
    token_mask=None,
    norm_eps=0.0,
    norm_min=0.0,
    choose_on="scores",
):
    _check_device(bias, logits, "bias", "logits")
    _check_device(token_mask, logits, "token_mask", "logits")
    torch._check(logits.dim() == 2, lambda: f"logits must be a 2-D tensor, got {logits.dim()}-D")
    num_tokens, num_experts = logits.shape
    torch._check(
        1 <= k <= num_experts, lambda: f"k must be in [1, num_experts={num_experts}], got {k}"
    )
    weights = logits.new_empty((num_tokens, k), dtype=_opmath(logits.dtype))
    ids = logits.new_empty((num_tokens, k), dtype=torch.int64)
    counts = logits.new_empty((num_experts,), dtype=torch.int64)
    return weights, ids, counts


@torch.library.register_fake("moe_kernels::biased_topk_backward")
def _(grad_weights, logits, topk_ids, score_fn, normalize, scale, norm_eps=0.0, norm_min=0.0):
    _check_device(topk_ids, logits, "topk_ids", "logits")
    _check_device(grad_weights, logits, "grad_weights", "logits")
    return torch.empty_like(logits)


@torch.library.register_fake("moe_kernels::expert_histogram")
def _(topk_ids, num_experts):
    return topk_ids.new_empty((num_experts,), dtype=torch.int64)


@torch.library.register_fake("moe_kernels::update_bias")
def _(bias, tokens_per_expert, rate, rule="sign", centered=False):
    _check_device(tokens_per_expert, bias, "tokens_per_expert", "bias")
    return None


@torch.library.register_fake("moe_kernels::permute")
def _(hidden, topk_ids, num_experts, align=1):
    _check_device(topk_ids, hidden, "topk_ids", "hidden")
    num_pairs = topk_ids.shape[0] * topk_ids.shape[1]
    if align == 1:
        num_rows = num_pairs
    else:
        num_rows = torch.library.get_ctx().new_dynamic_size(min=0)
        torch._check(num_rows >= num_pairs)
    rows = hidden.new_empty((num_rows, hidden.shape[1]))
    row_map = topk_ids.new_empty(topk_ids.shape, dtype=torch.int64)
    counts = topk_ids.new_empty((num_experts,), dtype=torch.int64)
    return rows, row_map, counts


@torch.library.register_fake("moe_kernels::permute_with_map")
def _(hidden, row_map, topk_weights, num_rows):
    _check_device(row_map, hidden, "row_map", "hidden")
    _check_device(topk_weights, hidden, "topk_weights", "hidden")
    return hidden.new_empty((num_rows, hidden.shape[1]))


@torch.library.register_fake("moe_kernels::unpermute")
def _(rows, row_map, topk_weights):
    _check_device(row_map, rows, "row_map", "rows")
    _check_device(topk_weights, rows, "topk_weights", "rows")
    return rows.new_empty((row_map.shape[0], rows.shape[1]))


@torch.library.register_fake("moe_kernels::drop_over_capacity")
def _(topk_ids, topk_weights, num_experts, capacity, policy="probs"):
    _check_device(topk_weights, topk_ids, "topk_weights", "topk_ids")
    kept_ids = topk_ids.new_empty(topk_ids.shape, dtype=torch.int64)
    return kept_ids, torch.empty_like(kept_ids), kept_ids.new_empty((num_experts,))


@torch.library.register_fake("moe_kernels::unpermute_weights_grad")
def _(grad_output, rows, row_map):
    _check_device(grad_output, rows, "grad_output", "rows")
    _check_device(row_map, rows, "row_map", "rows")
    return rows.new_empty(row_map.shape, dtype=_opmath(rows.dtype))


def _check_backend(backend: str) -> None:
    """The native ops' check of a grouped GEMM backend name, repeated for the same reason."""
    torch._check(
        backend in GROUPED_GEMM_BACKENDS,
        lambda: (
            "backend must be one of "
            + ", ".join(f"'{name}'" for name in GROUPED_GEMM_BACKENDS)
            + f", got '{backend}'"
        ),
    )


@torch.library.register_fake("moe_kernels::grouped_gemm")
def _(a: Tensor, b: Tensor, tokens_per_expert: Tensor, trans_b: bool = False, backend="auto"):
    _check_device(b, a, "b", "a")
    _check_device(tokens_per_expert, a, "tokens_per_expert", "a")
    _check_backend(backend)
    n = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], n))


@torch.library.register_fake("moe_kernels::grouped_gemm_swiglu")
def _(
    a: Tensor,
    b: Tensor,
    tokens_per_expert: Tensor,
    trans_b: bool = False,
    backend="auto",
    keep_product: bool = True,
    alpha: float = 1.0,
    limit: float | None = None,
    up_offset: float = 0.0,
):
    _check_device(b, a, "b", "a")
    _check_device(tokens_per_expert, a, "tokens_per_expert", "a")
    _check_backend(backend)
    n = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], n // 2)), a.new_empty((a.shape[0] if keep_product else 0, n))


@torch.library.register_fake("moe_kernels::grouped_gemm_wgrad")
def _(a: Tensor, grad_c: Tensor, tokens_per_expert: Tensor, trans_b: bool = False, backend="auto"):
    _check_device(grad_c, a, "grad_c", "a")
    _check_device(tokens_per_expert, a, "tokens_per_expert", "a")
    _check_backend(backend)
    num_experts, k, n = tokens_per_expert.shape[0], a.shape[1], grad_c.shape[1]
    return a.new_empty((num_experts, n, k) if trans_b else (num_experts, k, n))


@torch.library.register_fake("moe_kernels::swiglu")
def _(pre: Tensor, alpha: float = 1.0, limit: float | None = None, up_offset: float = 0.0):
    torch._check(pre.dim() == 2, lambda: f"pre must be a 2-D tensor, got {pre.dim()}-D")
    return pre.new_empty((pre.shape[0], pre.shape[1] // 2))


@torch.library.register_fake("moe_kernels::swiglu_backward")
def _(grad_out: Tensor, pre: Tensor, alpha=1.0, limit=None, up_offset=0.0):
    _check_device(pre, grad_out, "pre", "grad_out")
    return pre.new_empty(pre.shape)


@torch.library.register_fake("moe_kernels::transpose_segments")
def _(rows: Tensor, counts: Tensor):
    _check_device(counts, rows, "counts", "rows")
    return torch.empty_like(rows, memory_format=torch.contiguous_format)


@torch.library.register_fake("moe_kernels::ep_dispatch_rows")
def _(rows, recv_counts, send_grid, recv_grid, group_name, transport="process_group",
      layout="transpose"):  # fmt: skip
    _check_device(recv_counts, rows, "recv_counts", "rows")
    return rows.new_empty((sum(recv_grid), rows.shape[1]))


@torch.library.register_fake("moe_kernels::ep_combine_rows")
def _(expert_rows, recv_counts, send_grid, recv_grid, group_name, transport="process_group",
      layout="transpose"):  # fmt: skip
    _check_device(recv_counts, expert_rows, "recv_counts", "expert_rows")
    return expert_rows.new_empty((sum(send_grid), expert_rows.shape[1]))
