"""Autograd formulas of the differentiable ops, each written with the package's own ops.

- biased_topk: d/d(logits) through the unbiased weights (``biased_topk_backward``); ids and
  counts are integers, and the bias only chooses, so it gets no gradient.
- permute: the gradient of the rows is summed back per token (``unpermute`` without weights).
- permute_with_map: its adjoint, ``unpermute`` with the same weights; weights get
  ``<hidden[t], grad_rows[row_map[t, j]]>`` (``unpermute_weights_grad``).
- unpermute: rows get ``w * grad`` scattered to their slots (``permute_with_map``); weights get
  ``<grad_out[t], rows[row_map[t, j]]>`` (``unpermute_weights_grad``).
- grouped_gemm: dA is a grouped GEMM with b transposed, dB a per-expert ``a_e^T @ dC_e``
  (``grouped_gemm_wgrad``), both with the forward's backend.
- grouped_gemm_swiglu: the gradient of the product ``[gate | up]`` (``swiglu_backward`` from the
  saved product, plus any gradient of the product itself), then as grouped_gemm.
- transpose_segments: the gradient is moved back by the inverse reordering, which is the same
  op on the transposed grid (``transpose_segments(grad, counts.t())``).
- ep_dispatch_rows / ep_combine_rows: each is the other's inverse under one plan, so each one's
  gradient is the other applied to the gradient.
"""

import torch

_ops = torch.ops.moe_kernels


def _biased_topk_setup(ctx, inputs, output):
    logits, _bias, _k, score_fn, _n_groups, _topk_groups, normalize, scale = inputs[:8]
    norm_eps, norm_min = inputs[10:12]
    _weights, ids, _counts = output
    ctx.save_for_backward(logits, ids)
    ctx.score_fn, ctx.scaling = score_fn, (normalize, scale, norm_eps, norm_min)


def _biased_topk_backward(ctx, grad_weights, _grad_ids, _grad_counts):
    logits, ids = ctx.saved_tensors
    grad_logits = None
    if grad_weights is not None and ctx.needs_input_grad[0]:
        grad_logits = _ops.biased_topk_backward(
            grad_weights, logits, ids, ctx.score_fn, *ctx.scaling
        )
    return (grad_logits,) + (None,) * 12


torch.library.register_autograd(
    "moe_kernels::biased_topk", _biased_topk_backward, setup_context=_biased_topk_setup
)


def _permute_setup(ctx, inputs, output):
    _rows, row_map, _counts = output
    ctx.save_for_backward(row_map)


def _permute_backward(ctx, grad_rows, _grad_row_map, _grad_counts):
    (row_map,) = ctx.saved_tensors
    grad_hidden = None if grad_rows is None else _ops.unpermute(grad_rows, row_map, None)
    return grad_hidden, None, None, None


torch.library.register_autograd(
    "moe_kernels::permute", _permute_backward, setup_context=_permute_setup
)


def _permute_with_map_setup(ctx, inputs, output):
    hidden, row_map, weights, _num_rows = inputs
    weights_need_grad = weights is not None and weights.requires_grad
    ctx.save_for_backward(hidden if weights_need_grad else None, row_map, weights)


def _permute_with_map_backward(ctx, grad_rows):
    hidden, row_map, weights = ctx.saved_tensors
    grad_hidden = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_hidden = _ops.unpermute(grad_rows, row_map, weights)
    if weights is not None and ctx.needs_input_grad[2]:
        grad_weights = _ops.unpermute_weights_grad(hidden, grad_rows, row_map).to(weights.dtype)
    return grad_hidden, None, grad_weights, None


torch.library.register_autograd(
    "moe_kernels::permute_with_map",
    _permute_with_map_backward,
    setup_context=_permute_with_map_setup,
)


def _unpermute_setup(ctx, inputs, output):
    rows, row_map, weights = inputs
    ctx.save_for_backward(rows, row_map, weights)
    ctx.num_rows = rows.shape[0]


def _unpermute_backward(ctx, grad_out):
    rows, row_map, weights = ctx.saved_tensors
    grad_rows = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_rows = _ops.permute_with_map(grad_out, row_map, weights, ctx.num_rows)
    if weights is not None and ctx.needs_input_grad[2]:
        grad_weights = _ops.unpermute_weights_grad(grad_out, rows, row_map).to(weights.dtype)
    return grad_rows, None, grad_weights


torch.library.register_autograd(
    "moe_kernels::unpermute", _unpermute_backward, setup_context=_unpermute_setup
)


def _grouped_gemm_setup(ctx, inputs, output):
    a, b, tokens_per_expert, trans_b, backend = inputs
    ctx.save_for_backward(a, b, tokens_per_expert)
    ctx.trans_b, ctx.backend = trans_b, backend


def _grouped_gemm_grads(ctx, a, b, tokens_per_expert, grad_c):
    """dA and dB of ``c = grouped_gemm(a, b)`` from dC, where the inputs ask for them."""
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _ops.grouped_gemm(grad_c, b, tokens_per_expert, not ctx.trans_b, ctx.backend)
    if ctx.needs_input_grad[1]:
        grad_b = _ops.grouped_gemm_wgrad(a, grad_c, tokens_per_expert, ctx.trans_b, ctx.backend)
    return grad_a, grad_b, None, None, None


def _grouped_gemm_backward(ctx, grad_c):
    a, b, tokens_per_expert = ctx.saved_tensors
    return _grouped_gemm_grads(ctx, a, b, tokens_per_expert, grad_c)


torch.library.register_autograd(
    "moe_kernels::grouped_gemm", _grouped_gemm_backward, setup_context=_grouped_gemm_setup
)


def _grouped_gemm_swiglu_setup(ctx, inputs, output):
    a, b, tokens_per_expert, trans_b, backend, keep_product, *glu = inputs
    if not keep_product:
        raise RuntimeError(
            "grouped_gemm_swiglu: keep_product=False keeps no product for the backward, but an "
            "input requires grad; pass keep_product=True (ops.grouped_gemm_swiglu decides it)"
        )
    ctx.save_for_backward(a, b, tokens_per_expert, output[1])
    ctx.trans_b, ctx.backend, ctx.glu = trans_b, backend, glu
    ctx.set_materialize_grads(False)  # the product is rarely used: no zero gradient for it


def _grouped_gemm_swiglu_backward(ctx, grad_out, grad_pre):
    a, b, tokens_per_expert, pre = ctx.saved_tensors
    grad_product = grad_pre
    if grad_out is not None:
        through_swiglu = _ops.swiglu_backward(grad_out, pre, *ctx.glu)
        grad_product = through_swiglu if grad_pre is None else through_swiglu + grad_pre
    grads = (
        (None,) * 5
        if grad_product is None
        else _grouped_gemm_grads(ctx, a, b, tokens_per_expert, grad_product)
    )
    return *grads, None, None, None, None


torch.library.register_autograd(
    "moe_kernels::grouped_gemm_swiglu",
    _grouped_gemm_swiglu_backward,
    setup_context=_grouped_gemm_swiglu_setup,
)


def _swiglu_setup(ctx, inputs, output):
    pre, *glu = inputs
    ctx.save_for_backward(pre)
    ctx.glu = glu


def _swiglu_backward(ctx, grad_out):
    (pre,) = ctx.saved_tensors
    return _ops.swiglu_backward(grad_out, pre, *ctx.glu), None, None, None


torch.library.register_autograd(
    "moe_kernels::swiglu", _swiglu_backward, setup_context=_swiglu_setup
)


def _transpose_segments_setup(ctx, inputs, output):
    _rows, counts = inputs
    ctx.save_for_backward(counts)


def _transpose_segments_backward(ctx, grad_out):
    (counts,) = ctx.saved_tensors
    return _ops.transpose_segments(grad_out, counts.t()), None


torch.library.register_autograd(
    "moe_kernels::transpose_segments",
    _transpose_segments_backward,
    setup_context=_transpose_segments_setup,
)


# Expert-parallel dispatch and combine move rows by a fixed plan, each the other's inverse: the
# gradient of one is the other applied to the gradient, with the same plan.
def _ep_rows_setup(ctx, inputs, output):
    _rows, recv_counts, *route = inputs
    ctx.save_for_backward(recv_counts)
    ctx.route = route


def _ep_dispatch_rows_backward(ctx, grad):
    (recv_counts,) = ctx.saved_tensors
    return _ops.ep_combine_rows(grad, recv_counts, *ctx.route), *[None] * (1 + len(ctx.route))


def _ep_combine_rows_backward(ctx, grad):
    (recv_counts,) = ctx.saved_tensors
    return _ops.ep_dispatch_rows(grad, recv_counts, *ctx.route), *[None] * (1 + len(ctx.route))


torch.library.register_autograd(
    "moe_kernels::ep_dispatch_rows", _ep_dispatch_rows_backward, setup_context=_ep_rows_setup
)
torch.library.register_autograd(
    "moe_kernels::ep_combine_rows", _ep_combine_rows_backward, setup_context=_ep_rows_setup
)
