"""Typed Python API over ``torch.ops.moe_kernels``: the fused MoE ops.

Notation: T tokens, H hidden size, E experts, k experts per token, G expert groups, R permuted
rows. Every op runs on CPU tensors (native C++ kernels) and on CUDA tensors
(hand-written kernels, in CUDA builds: see ``moe_kernels.build_info()``), and on the CPU
emulator of those kernels under ``moe_kernels.emulator.emulate()``. Every op is a ``torch.library`` custom op with a fake
kernel, so it works under ``torch.compile(fullgraph=True)``; the differentiable ones have
autograd.

Precision: routing scores, weights and all reductions are computed in fp32 for fp32/bf16/fp16
inputs (fp64 for fp64 inputs). Integer outputs (ids, counts, row maps) are int64 and exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ops = torch.ops.moe_kernels

# The ``backend`` choices of the grouped GEMM ops (see ``grouped_gemm``).
GROUPED_GEMM_BACKENDS = ("auto", "kernel", "wgmma", "mma", "cublas", "torch")


def biased_topk(
    logits: Tensor,
    bias: Tensor | None,
    k: int,
    score_fn: str = "sigmoid",
    n_groups: int = 1,
    topk_groups: int = 1,
    normalize: bool = True,
    scale: float = 1.0,
    group_score: str = "top2",
    token_mask: Tensor | None = None,
    norm_eps: float = 0.0,
    norm_min: float = 0.0,
    choose_on: str = "scores",
) -> tuple[Tensor, Tensor, Tensor]:
    """Route each token to k experts, choosing with a loss-free balancing bias.

    One pass over the logits: ``scores = score_fn(logits)``; ``choice = scores + bias`` decides
    *which* experts are picked (group-limited when ``n_groups > 1``) but never enters the
    weights, which are gathered from the unbiased scores, normalised to sum 1 when
    ``normalize``, then multiplied by ``scale``; the per-expert histogram of the choice is
    counted on the way.

    Args:
        logits: [T, E] router logits, fp32, bf16, fp16 (or fp64).
        bias: [E] fp32 loss-free balancing bias on the device of ``logits``, or None.
        k: experts per token, 1 <= k <= E.
        score_fn: "sigmoid" (DeepSeek-V3), "softmax" (over the E axis) or "sqrtsoftplus"
            (``sqrt(softplus(logits))``, DeepSeek-V4; softplus as torch's, x itself above 20).
            All take a bias.
        n_groups: G, expert groups for group-limited routing; must divide E.
        topk_groups: groups kept per token, with topk_groups * E / G >= k.
        normalize: divide the k weights of a token by ``max(sum + norm_eps, norm_min)`` (a zero
            sum stays zero).
        scale: multiply the weights by this (DeepSeek's routed scaling factor).
        group_score: "top2" scores a group by the sum of its top-min(2, E/G) choice values
            (DeepSeek-V3); "topk_per_group" by its top-(k / topk_groups) (Megatron-Core); "max"
            by its best one (DeepSeek-V2).
        token_mask: [T] bool on the device of ``logits``, or None: the tokens counted in
            ``tokens_per_expert`` (padding is routed like any token, but not counted, so it
            does not move the loss-free bias).
        norm_eps: >= 0, added to the sum the weights are normalised by (AFMoE, LFM2).
        norm_min: >= 0, the least divisor the weights are normalised by (ERNIE 4.5).
        choose_on: "scores" (``choice = scores + bias``) or "logits" (``choice = logits +
            bias``, Kolibri-1: the bias shifts the logits for the choice); the weights are the
            scores either way.

    Returns:
        topk_weights: [T, k] fp32 (fp64 for fp64 logits), differentiable w.r.t. ``logits``.
        topk_ids: [T, k] int64, best first; ties go to the lower expert index.
        tokens_per_expert: [E] int64, exact counts of the (token, slot) pairs of the counted
            tokens, summing to k times their number.

    NaN scores never win a slot (they rank as -inf), so ids are always valid and distinct; the
    weights of a token with NaN logits are NaN.

    On CUDA one warp routes a token, holding its scores in registers: E <= 512 and G <= 64.
    No host synchronisation.
    """
    return _ops.biased_topk(
        logits, bias, k, score_fn, n_groups, topk_groups, normalize, scale, group_score, token_mask,
        norm_eps, norm_min, choose_on,
    )  # fmt: skip


def expert_histogram(topk_ids: Tensor, num_experts: int) -> Tensor:
    """Count how many (token, slot) pairs each expert received.

    Args:
        topk_ids: int64 or int32 ids of any shape, each in [0, num_experts).
        num_experts: E.

    Returns:
        [E] int64 counts. On CUDA, ids out of range are not counted (checking them would need a
        host synchronisation); on the CPU they raise.
    """
    return _ops.expert_histogram(topk_ids, num_experts)


def update_bias(
    bias: Tensor,
    tokens_per_expert: Tensor,
    rate: float = 1e-3,
    rule: str = "sign",
    centered: bool = False,
) -> None:
    """Loss-free balancing step, in place: nudge overloaded experts down, underloaded up.

    ``rule="sign"``: ``bias += rate * sign(mean(counts) - counts)`` (Algorithm 1 of arXiv
    2408.15664); ``rule="proportional"``: ``bias += rate * (mean - counts) / mean``. The sign
    is computed from the integer counts, so it is exact.

    Args:
        bias: [E] fp32, contiguous; updated in place.
        tokens_per_expert: [E] int64 or int32 counts of the whole batch of the step (summed
            over data/expert-parallel ranks before the call); must be >= 0.
        rate: the update rate u >= 0 (default 1e-3).
        rule: "sign" or "proportional".
        centered: subtract the update's mean over the experts (``rate * sum(signs) / E``, from
            integers), so the biases keep their mean (torchtitan's choice). A common offset
            changes no top-k choice, but one that drifts over a long run costs the bias fp32
            precision against the scores it is added to. The proportional rule's update sums
            to zero already: there it changes nothing.
    """
    _ops.update_bias(bias, tokens_per_expert, rate, rule, centered)


def permute(
    hidden: Tensor, topk_ids: Tensor, num_experts: int, align: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather every (token, slot) row of ``hidden`` into expert order.

    Stable: within one expert, rows follow token index, then slot. With ``align > 1`` each
    expert's segment is padded with zero rows to a multiple of ``align`` rows, so grouped GEMM
    tiles never straddle two experts (pass ``padded_tokens_per_expert(counts, align)`` to it).

    On CUDA the rows' positions are computed on the device, and with ``align == 1`` the op never
    waits for the GPU; with ``align > 1`` it copies R (one int64) back to the host once to
    allocate ``rows``, which synchronises with the stream. CUDA takes at most 1536 experts and
    does not check the ids' range: a pair whose id is out of range gets row -1 and no row (R
    stays T * k when align is 1: the last rows are then zero).

    Id -1 marks a pair dropped over capacity (``drop_over_capacity``) on every device: it gets
    row -1 and no row, and ``tokens_per_expert`` counts the kept pairs. With align 1, R stays
    T * k, the kept rows first and zero rows after them, so the shape is known without the
    counts (nothing waits for the GPU); the grouped GEMMs take such rows as they are.

    Args:
        hidden: [T, H] fp32, bf16, fp16 (or fp64).
        topk_ids: [T, k] int64 or int32 expert ids in [0, num_experts), or -1 for a dropped pair.
        num_experts: E.
        align: segment alignment in rows, >= 1.

    Returns:
        rows: [R, H] in the dtype of ``hidden``, R = sum(round_up(counts, align)), or T * k
            when align is 1. Differentiable w.r.t. ``hidden``.
        row_map: [T, k] int64, the row of pair (t, j) in ``rows`` (-1 for a dropped pair).
        tokens_per_expert: [E] int64 real (unpadded) rows per expert.
    """
    return _ops.permute(hidden, topk_ids, num_experts, align)


def permute_with_map(
    hidden: Tensor, row_map: Tensor, topk_weights: Tensor | None, num_rows: int
) -> Tensor:
    """Scatter every (token, slot) row of ``hidden`` to a row the caller chose:
    ``rows[row_map[t, j]] = w[t, j] * hidden[t]`` (a plain copy without weights), zero rows
    where no pair lands. With ``drop_over_capacity``'s slots it builds the static, padded
    layout of capacity routing: ``row_map = kept_ids * capacity + slots`` (-1 where dropped),
    ``num_rows = E * capacity``.

    Args:
        hidden: [T, H] fp32, bf16, fp16 (or fp64).
        row_map: [T, k] int64 or int32 rows in [0, num_rows), no row twice; -1 for none. On CUDA
            neither is checked (that would synchronise with the GPU): a row out of range is
            skipped, and of two pairs on one row one lands.
        topk_weights: [T, k] floating weights, or None.
        num_rows: R >= 0.

    Returns:
        [R, H] in the dtype of ``hidden``. Differentiable w.r.t. ``hidden`` and ``topk_weights``.
    """
    return _ops.permute_with_map(hidden, row_map, topk_weights, num_rows)


def unpermute(rows: Tensor, row_map: Tensor, topk_weights: Tensor | None = None) -> Tensor:
    """Combine expert outputs back per token: ``out[t] = sum_j w[t, j] * rows[row_map[t, j]]``.

    Row -1 (a pair dropped over capacity) adds nothing, nor, on CUDA, any row outside [0, R):
    checking the range there would synchronise with the GPU.

    Args:
        rows: [R, H] expert outputs (padding rows are never read).
        row_map: [T, k] int64 or int32, from ``permute`` (or ``permute_with_map``'s).
        topk_weights: [T, k] floating weights, or None for a plain sum.

    Returns:
        [T, H] in the dtype of ``rows``, accumulated in fp32 (fp64 for fp64 rows).
        Differentiable w.r.t. ``rows`` and ``topk_weights``.
    """
    return _ops.unpermute(rows, row_map, topk_weights)


def grouped_gemm(
    a: Tensor,
    b: Tensor,
    tokens_per_expert: Tensor,
    trans_b: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Per-expert matrix products over consecutive row segments: ``c_e = a_e @ b[e]``.

    Args:
        a: [M, K] fp32, bf16, fp16 (or fp64); segment e is the next ``tokens_per_expert[e]`` rows.
        b: [E, K, N], or [E, N, K] with ``trans_b`` (then ``c_e = a_e @ b[e].T``); dtype of a.
        tokens_per_expert: [E] int64 or int32, >= 0, summing to at most M (empty experts are
            legal), on the device of a. Rows past the segments are no expert's (capacity
            routing's: ``permute`` of dropped pairs); their output rows are not written, as
            ``torch._grouped_mm`` leaves them, and no op of the layer reads them.
        trans_b: whether b holds each expert's weight transposed, [N, K].
        backend: what runs the products (one of ``GROUPED_GEMM_BACKENDS``):

            - ``"auto"`` (the default; ``"kernel"`` is its older name): the fastest path of
              this package for the device. On an sm_90 GPU the wgmma + TMA kernel, on sm_80 /
              sm_89 the mma.sync kernel, both for bf16/fp16 with K and N multiples of 8
              (fp32, fp64 and unaligned shapes run the SIMT kernel); on the CPU one BLAS call
              per expert. ``moe_kernels.build_info()["grouped_gemm"]`` names the kernel each
              device gets. On CUDA there is no host synchronisation, and tokens_per_expert is
              not checked (counts are clamped to the rows of a); on the CPU it is.
            - ``"wgmma"``, ``"mma"``: that kernel by name, to compare them (CUDA tensors, or
              the CPU emulator); an error where it cannot run: another GPU, or operands it
              does not take. On native CPU tensors, an error.
            - ``"cublas"``: one cuBLAS GEMM per expert, a baseline; it reads the counts on the
              host (a synchronisation) and checks them. On the CPU, the same BLAS loop as
              ``"auto"``.
            - ``"torch"``: ``torch._grouped_mm``, a baseline, with the offsets computed on the
              device. fp32, bf16 and fp16 only, with K and N multiples of 16 bytes (else an
              error). torch runs bf16 on sm_90 / sm_100 GPUs with no host synchronisation (up
              to 1024 experts); in every other case it loops over the experts after copying
              the offsets to the host. Counts are checked on the CPU, not on CUDA.

    Returns:
        [M, N] in the dtype of ``a``, accumulated in fp32 for bf16/fp16. Differentiable w.r.t.
        ``a`` and ``b`` (an expert with no rows gets a zero gradient); the backward runs on the
        same backend.
    """
    return _ops.grouped_gemm(a, b, tokens_per_expert, trans_b, backend)


def grouped_gemm_wgrad(
    a: Tensor,
    grad_c: Tensor,
    tokens_per_expert: Tensor,
    trans_b: bool = False,
    backend: str = "auto",
) -> Tensor:
    """The weight gradient of ``grouped_gemm``: ``grad_b[e] = a_e^T @ grad_c_e``.

    Args:
        a: [M, K]; grad_c: [M, N], dtype of a; tokens_per_expert, backend: as ``grouped_gemm``.
        trans_b: give the gradient of a transposed b, ``grad_c_e^T @ a_e``.

    Returns:
        [E, K, N] ([E, N, K] with ``trans_b``) in the dtype of ``a``, accumulated in fp32 for
        bf16/fp16; zero for an expert with no rows.
    """
    return _ops.grouped_gemm_wgrad(a, grad_c, tokens_per_expert, trans_b, backend)


def grouped_gemm_swiglu(
    a: Tensor,
    b: Tensor,
    tokens_per_expert: Tensor,
    trans_b: bool = False,
    backend: str = "auto",
    alpha: float = 1.0,
    limit: float | None = None,
    up_offset: float = 0.0,
) -> Tensor:
    """The first projection of SwiGLU experts, fused: ``swiglu(gate_e, up_e)`` where
    ``[gate_e | up_e] = a_e @ b[e]``.

    Args: as ``grouped_gemm``, with b's N = 2F output columns holding the gate projection
    (the first F) then the up projection (the last F); and the SwiGLU variant (``swiglu``):
    ``alpha``, ``limit``, ``up_offset``.

    Returns:
        [M, F] in the dtype of ``a``. With this package's kernels on CUDA (``"auto"``,
        ``"wgmma"``, ``"mma"``) the activation is applied to the fp32 accumulators in the
        GEMM's epilogue, rounded once; elsewhere (the CPU, ``"cublas"``, ``"torch"``) the
        product ``[gate | up]`` is rounded to the dtype of ``a`` first, then activated in fp32
        and rounded once more. Differentiable w.r.t. ``a`` and
        ``b``: the product ``[gate | up]`` ([M, 2F]) is kept for the backward, and only when
        autograd will run one (the CPU then never holds the whole product: it computes it in
        blocks of rows, each activated while in cache).
    """
    keep_product = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return _ops.grouped_gemm_swiglu(
        a, b, tokens_per_expert, trans_b, backend, keep_product, alpha, limit, up_offset
    )[0]


def swiglu(
    pre: Tensor, alpha: float = 1.0, limit: float | None = None, up_offset: float = 0.0
) -> Tensor:
    """SwiGLU of a product ``pre = [gate | up]``, and its variants: with ``g = min(gate,
    limit)`` and ``u = clamp(up, -limit, limit)``, ``g * sigmoid(alpha * g) * (u + up_offset)``.

    The defaults are SwiGLU, ``silu(gate) * up``; gpt-oss's experts use ``alpha=1.702,
    limit=7.0, up_offset=1.0``; GLM-5-Next's and DeepSeek-V4's a limit alone. The same
    arithmetic as ``grouped_gemm_swiglu``'s epilogue, for a product made otherwise (with bias
    terms, or gate and up columns interleaved and gathered first).

    Args:
        pre: [M, 2F] fp32, bf16, fp16 (or fp64).
        alpha: the sigmoid's slope, finite.
        limit: the clamp, > 0, or None (no clamp).
        up_offset: added to the clamped up projection, finite.

    Returns:
        [M, F] in the dtype of ``pre``, computed in fp32 (fp64 for fp64) and rounded once;
        differentiable w.r.t. ``pre``: an element at or past the limit passes no gradient (as
        torch.clamp's backward from torch 2.14; before, it passed one at the limit itself).
    """
    return _ops.swiglu(pre, alpha, limit, up_offset)


def swiglu_backward(
    grad_out: Tensor,
    pre: Tensor,
    alpha: float = 1.0,
    limit: float | None = None,
    up_offset: float = 0.0,
) -> Tensor:
    """The gradient of ``swiglu(pre, alpha, limit, up_offset)`` w.r.t. ``pre = [gate | up]``.

    Args:
        grad_out: [M, F] gradient of the activation's output.
        pre: [M, 2F] the product ``[gate | up]``, dtype of grad_out.
        alpha, limit, up_offset: the variant (see ``swiglu``).

    Returns:
        [M, 2F] in the dtype of ``pre``, computed in fp32 (fp64 for fp64).
    """
    return _ops.swiglu_backward(grad_out, pre, alpha, limit, up_offset)


def transpose_segments(rows: Tensor, counts: Tensor) -> Tensor:
    """Reorder a grid of row segments from (a, b) order to (b, a) order.

    The rows an expert-parallel rank receives arrive grouped by (source rank, local expert);
    its experts need them grouped by (local expert, source rank), and the combine needs the
    inverse: ``transpose_segments(rows, counts)`` gives the first,
    ``transpose_segments(out, counts.t())`` the second. Segment (a, b) holds ``counts[a, b]``
    consecutive rows, and keeps their order. A copy: bit exact.

    On CUDA the counts stay on the device and are not checked (that would synchronise with the
    GPU): each count is clamped to [0, N], and an output row with no source row in ``rows``
    (past the last segment when the counts sum to less than N, or one whose source lies at or
    past row N when they sum to more) is written as zeros; no row outside ``rows`` is read or
    written. Any number of segments. No host synchronisation.

    Args:
        rows: [N, H] fp32, bf16, fp16 (or fp64): the A * B segments in row-major (a, b) order.
        counts: [A, B] int64 or int32 rows per segment, >= 0, summing to N, on the device of
            ``rows``.

    Returns:
        [N, H] in the dtype of ``rows``: the same segments in (b, a) order. Differentiable
        w.r.t. ``rows`` (the gradient is ``transpose_segments(grad, counts.t())``).
    """
    return _ops.transpose_segments(rows, counts)


def padded_tokens_per_expert(tokens_per_expert: Tensor, align: int) -> Tensor:
    """Segment sizes of ``permute(..., align=align)``'s rows: counts rounded up to ``align``."""
    return (tokens_per_expert + align - 1) // align * align


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Token-choice capacity of each expert: ``ceil(capacity_factor * T * k / E)`` assignments
    (GShard, Switch; Megatron-Core's ``moe_expert_capacity_factor``)."""
    return math.ceil(capacity_factor * num_tokens * topk / num_experts)


def drop_over_capacity(
    topk_ids: Tensor,
    topk_weights: Tensor | None,
    num_experts: int,
    capacity: int,
    policy: str = "probs",
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep at most ``capacity`` (token, slot) pairs per expert; drop the rest.

    Token-choice routing with a capacity (GShard, Switch): an expert chosen by more pairs than
    its capacity keeps ``capacity`` of them. ``policy="probs"`` keeps those of highest weight
    (Megatron-Core's default; NaN weighs as -inf, equal weights keep the earlier pair),
    ``"position"`` the first in pair order (token, then slot). A dropped pair adds nothing to
    its token's output: the token keeps its residual path. Ids already -1 (dropped, or padding
    the caller excludes) take no capacity.

    The loss-free bias balances the routing choices, so its counts are ``biased_topk``'s, taken
    before dropping: what is dropped is the imbalance the bias is there to remove.

    On CUDA one block per expert walks its pairs (a radix select over the weights' bits for
    ``"probs"``), E <= 1536; no host synchronisation, and ids are not range-checked (an id
    outside [0, E) is in no expert and comes back -1).

    Args:
        topk_ids: [T, k] int64 or int32 ids in [0, num_experts), or -1.
        topk_weights: [T, k] floating weights of the pairs (``biased_topk``'s), needed by
            ``"probs"``; None for ``"position"``.
        num_experts: E.
        capacity: C >= 0, kept pairs per expert (``expert_capacity``).
        policy: ``"probs"`` or ``"position"``.

    Returns:
        kept_ids: [T, k] int64, the id of a kept pair, -1 for a dropped one (``permute`` and
            ``unpermute`` take it as is).
        slots: [T, k] int64, a kept pair's place among its expert's kept pairs in pair order,
            in [0, C); -1 when dropped. ``kept_ids * C + slots`` is its row in the padded layout
            (see ``permute_with_map``).
        dropped_per_expert: [E] int64, pairs dropped by each expert (``max(count - C, 0)``).
    """
    return _ops.drop_over_capacity(topk_ids, topk_weights, num_experts, capacity, policy)
