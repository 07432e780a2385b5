"""Fake (meta) kernels: output shapes and dtypes of every op, for torch.compile and opcheck.

Data-dependent sizes: ``permute`` returns T * k rows when ``align`` is 1 and an unbacked size
(at least T * k) otherwise.
"""

import torch
from torch import Tensor


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("moe_kernels::biased_topk")
def _(logits, bias, k, score_fn, n_groups, topk_groups, normalize, scale, group_score):
    torch._check(logits.dim() == 2, lambda: f"logits must be a 2-D tensor, got {logits.dim()}-D")
    num_tokens, num_experts = logits.shape
    torch._check(1 <= k <= num_experts, lambda: f"k must be in [1, num_experts={num_experts}], got {k}")
    weights = logits.new_empty((num_tokens, k), dtype=_opmath(logits.dtype))
    ids = logits.new_empty((num_tokens, k), dtype=torch.int64)
    counts = logits.new_empty((num_experts,), dtype=torch.int64)
    return weights, ids, counts


@torch.library.register_fake("moe_kernels::biased_topk_backward")
def _(grad_weights, logits, topk_ids, score_fn, normalize, scale):
    return torch.empty_like(logits)


@torch.library.register_fake("moe_kernels::expert_histogram")
def _(topk_ids, num_experts):
    return topk_ids.new_empty((num_experts,), dtype=torch.int64)


@torch.library.register_fake("moe_kernels::update_bias")
def _(bias, tokens_per_expert, rate, rule):
    return None


@torch.library.register_fake("moe_kernels::permute")
def _(hidden, topk_ids, num_experts, align):
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
    return hidden.new_empty((num_rows, hidden.shape[1]))


@torch.library.register_fake("moe_kernels::unpermute")
def _(rows, row_map, topk_weights):
    return rows.new_empty((row_map.shape[0], rows.shape[1]))


@torch.library.register_fake("moe_kernels::unpermute_weights_grad")
def _(grad_output, rows, row_map):
    return rows.new_empty(row_map.shape, dtype=_opmath(rows.dtype))


@torch.library.register_fake("moe_kernels::grouped_gemm")
def _(a: Tensor, b: Tensor, tokens_per_expert: Tensor, trans_b: bool):
    n = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], n))


@torch.library.register_fake("moe_kernels::grouped_gemm_wgrad")
def _(a: Tensor, grad_c: Tensor, tokens_per_expert: Tensor, trans_b: bool):
    num_experts, k, n = tokens_per_expert.shape[0], a.shape[1], grad_c.shape[1]
    return a.new_empty((num_experts, n, k) if trans_b else (num_experts, k, n))
