"""Bad input: a clear error naming the argument, raised before anything is written."""

import pytest
import torch

import moe_kernels as mk
from conftest import random_ids
from moe_kernels.emulator import emulate, emulated_ops

META = torch.device("meta")


def logits():
    return torch.randn(6, 8)


def ids():
    return random_ids(6, 8, 2)


def rows_and_map():
    rows, row_map, _ = mk.permute(torch.randn(6, 4), ids(), 8)
    return rows, row_map


CASES = {
    # biased_topk
    "logits_1d": (mk.biased_topk, (torch.randn(8), None, 2), {}, r"logits must be a 2-D tensor"),
    "logits_int": (
        mk.biased_topk,
        (torch.ones(6, 8, dtype=torch.int32), None, 2),
        {},
        r"logits must be float32",
    ),
    "bias_shape": (
        mk.biased_topk,
        (logits(), torch.zeros(7), 2),
        {},
        r"bias.size\(0\) must equal num_experts=8",
    ),
    "bias_rank": (
        mk.biased_topk,
        (logits(), torch.zeros(1, 8), 2),
        {},
        r"bias must be a 1-D tensor",
    ),
    "bias_dtype": (
        mk.biased_topk,
        (logits(), torch.zeros(8, dtype=torch.float64), 2),
        {},
        r"bias must be Float, got Double",
    ),
    "bias_device": (
        mk.biased_topk,
        (logits(), torch.zeros(8, device=META), 2),
        {},
        r"bias must be on the device of logits",
    ),
    "token_mask_dtype": (
        mk.biased_topk,
        (logits(), None, 2),
        {"token_mask": torch.ones(6)},
        r"token_mask must be Bool, got Float",
    ),
    "token_mask_length": (
        mk.biased_topk,
        (logits(), None, 2),
        {"token_mask": torch.ones(5, dtype=torch.bool)},
        r"token_mask.size\(0\) must equal num_tokens=6",
    ),
    "token_mask_rank": (
        mk.biased_topk,
        (logits(), None, 2),
        {"token_mask": torch.ones(6, 1, dtype=torch.bool)},
        r"token_mask must be a 1-D tensor",
    ),
    "token_mask_device": (
        mk.biased_topk,
        (logits(), None, 2),
        {"token_mask": torch.ones(6, dtype=torch.bool, device=META)},
        r"token_mask must be on the device of logits",
    ),
    "k_zero": (
        mk.biased_topk,
        (logits(), None, 0),
        {},
        r"k must be in \[1, num_experts=8\], got 0",
    ),
    "k_too_large": (
        mk.biased_topk,
        (logits(), None, 9),
        {},
        r"k must be in \[1, num_experts=8\], got 9",
    ),
    "groups_do_not_divide": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(n_groups=3),
        r"n_groups must be >= 1 and divide num_experts=8, got 3",
    ),
    "topk_groups_too_many": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(n_groups=4, topk_groups=5),
        r"topk_groups must be in \[1, n_groups=4\], got 5",
    ),
    "topk_groups_zero": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(n_groups=4, topk_groups=0),
        r"topk_groups must be in \[1, n_groups=4\], got 0",
    ),
    "too_few_experts_in_groups": (
        mk.biased_topk,
        (logits(), None, 4),
        dict(n_groups=4, topk_groups=1),
        r"topk_groups \* \(num_experts / n_groups\) = 2 must be >= k=4",
    ),
    "score_fn": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(score_fn="relu"),
        r"score_fn must be one of 'sigmoid', 'softmax', 'sqrtsoftplus', got 'relu'",
    ),
    "group_score": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(group_score="mean"),
        r"group_score must be one of",
    ),
    "group_score_indivisible": (
        mk.biased_topk,
        (logits(), None, 4),
        dict(n_groups=4, topk_groups=3, group_score="topk_per_group"),
        r"needs topk_groups to divide k=4",
    ),
    "scale_inf": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(scale=float("inf")),
        r"scale must be finite",
    ),
    "choose_on": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(choose_on="choice"),
        r"choose_on must be one of 'scores', 'logits', got 'choice'",
    ),
    "norm_eps_negative": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(norm_eps=-1e-6),
        r"norm_eps must be finite and >= 0, got -1e-06",
    ),
    "norm_min_nan": (
        mk.biased_topk,
        (logits(), None, 2),
        dict(norm_min=float("nan")),
        r"norm_min must be finite and >= 0, got nan",
    ),
    # expert_histogram
    "histogram_float_ids": (
        mk.expert_histogram,
        (torch.zeros(6, 2), 8),
        {},
        r"topk_ids must be int64 or int32, got Float",
    ),
    "histogram_num_experts": (
        mk.expert_histogram,
        (ids(), 0),
        {},
        r"num_experts must be >= 1, got 0",
    ),
    "histogram_id_too_large": (
        mk.expert_histogram,
        (torch.tensor([[0, 8]]), 8),
        {},
        r"topk_ids must hold values in \[0, num_experts=8\), got values in \[0, 8\]",
    ),
    "histogram_negative_id": (
        mk.expert_histogram,
        (torch.tensor([[-1, 3]]), 8),
        {},
        r"topk_ids must hold values in \[0, num_experts=8\)",
    ),
    # update_bias
    "bias_update_dtype": (
        mk.update_bias,
        (torch.zeros(8, dtype=torch.float16), torch.ones(8, dtype=torch.long)),
        {},
        r"bias must be Float, got Half",
    ),
    "bias_update_rank": (
        mk.update_bias,
        (torch.zeros(2, 4), torch.ones(8, dtype=torch.long)),
        {},
        r"bias must be a 1-D tensor",
    ),
    "bias_update_noncontiguous": (
        mk.update_bias,
        (torch.zeros(16)[::2], torch.ones(8, dtype=torch.long)),
        {},
        r"bias must be contiguous",
    ),
    "counts_length": (
        mk.update_bias,
        (torch.zeros(8), torch.ones(7, dtype=torch.long)),
        {},
        r"tokens_per_expert.size\(0\) must equal bias.size\(0\)=8",
    ),
    "counts_float": (
        mk.update_bias,
        (torch.zeros(8), torch.ones(8)),
        {},
        r"tokens_per_expert must be int64 or int32, got Float",
    ),
    "counts_negative": (
        mk.update_bias,
        (torch.zeros(8), torch.tensor([3, 2, -1, 0, 0, 0, 0, 0])),
        {},
        r"tokens_per_expert must be >= 0, got -1 for expert 2",
    ),
    "counts_device": (
        mk.update_bias,
        (torch.zeros(8), torch.ones(8, dtype=torch.long, device=META)),
        {},
        r"tokens_per_expert must be on the device of bias",
    ),
    "rate_nan": (
        mk.update_bias,
        (torch.zeros(8), torch.ones(8, dtype=torch.long), float("nan")),
        {},
        r"rate must be finite",
    ),
    "rate_negative": (
        mk.update_bias,
        (torch.zeros(8), torch.ones(8, dtype=torch.long), -1e-3),
        {},
        r"rate must be >= 0",
    ),
    "rule": (
        mk.update_bias,
        (torch.zeros(8), torch.ones(8, dtype=torch.long)),
        dict(rule="linear"),
        r"rule must be one of 'sign', 'proportional', got 'linear'",
    ),
    # permute
    "hidden_1d": (mk.permute, (torch.randn(6), ids(), 8), {}, r"hidden must be a 2-D tensor"),
    "hidden_int": (
        mk.permute,
        (torch.ones(6, 4, dtype=torch.long), ids(), 8),
        {},
        r"hidden must be float32",
    ),
    "permute_ids_float": (
        mk.permute,
        (torch.randn(6, 4), ids().float(), 8),
        {},
        r"topk_ids must be int64 or int32",
    ),
    "permute_ids_1d": (
        mk.permute,
        (torch.randn(6, 4), ids()[:, 0], 8),
        {},
        r"topk_ids must be a 2-D tensor",
    ),
    "permute_token_mismatch": (
        mk.permute,
        (torch.randn(5, 4), ids(), 8),
        {},
        r"topk_ids.size\(0\) must equal num_tokens=5",
    ),
    "permute_num_experts": (
        mk.permute,
        (torch.randn(6, 4), ids(), 0),
        {},
        r"num_experts must be >= 1",
    ),
    "permute_align": (
        mk.permute,
        (torch.randn(6, 4), ids(), 8, 0),
        {},
        r"align must be >= 1, got 0",
    ),
    "permute_id_range": (
        mk.permute,
        (torch.randn(6, 4), ids(), 4),
        {},
        r"topk_ids must hold values in \[-1, num_experts=4\)",
    ),
    "permute_ids_device": (
        mk.permute,
        (torch.randn(6, 4), ids().to(META), 8),
        {},
        r"topk_ids must be on the device of hidden",
    ),
    # unpermute
    "rows_1d": (
        mk.unpermute,
        (torch.randn(12), rows_and_map()[1]),
        {},
        r"rows must be a 2-D tensor",
    ),
    "row_map_range": (
        mk.unpermute,
        (torch.randn(5, 4), rows_and_map()[1]),
        {},
        r"row_map must hold values in \[-1, rows.size\(0\)=5\)",
    ),
    "row_map_float": (
        mk.unpermute,
        (rows_and_map()[0], rows_and_map()[1].float()),
        {},
        r"row_map must be int64 or int32",
    ),
    "weights_shape": (
        mk.unpermute,
        (*rows_and_map(), torch.ones(6, 3)),
        {},
        r"topk_weights must have the shape of row_map",
    ),
    "weights_int": (
        mk.unpermute,
        (*rows_and_map(), torch.ones(6, 2, dtype=torch.long)),
        {},
        r"topk_weights must be float32",
    ),
    "weights_device": (
        mk.unpermute,
        (*rows_and_map(), torch.ones(6, 2, device=META)),
        {},
        r"topk_weights must be on the device of rows",
    ),
    # grouped_gemm
    "a_1d": (
        mk.grouped_gemm,
        (torch.randn(4), torch.randn(2, 4, 3), torch.tensor([2, 2])),
        {},
        r"a must be a 2-D tensor",
    ),
    "b_2d": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(4, 3), torch.tensor([2, 2])),
        {},
        r"b must be a 3-D tensor",
    ),
    "b_dtype": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3, dtype=torch.float64), torch.tensor([2, 2])),
        {},
        r"b must have the dtype of a \(Float\), got Double",
    ),
    "b_inner_dim": (
        mk.grouped_gemm,
        (torch.randn(4, 5), torch.randn(2, 4, 3), torch.tensor([2, 2])),
        {},
        r"b.size\(1\) must equal a.size\(1\) \(K\)=5",
    ),
    "b_inner_dim_trans": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([2, 2]), True),
        {},
        r"b.size\(2\) must equal a.size\(1\) \(K\)=4",
    ),
    "sizes_length": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([4])),
        {},
        r"tokens_per_expert.size\(0\) must equal num_experts \(b.size\(0\)\)=2",
    ),
    "sizes_negative": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([6, -2])),
        {},
        r"tokens_per_expert must be >= 0, got -2 for expert 1",
    ),
    "sizes_sum": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([2, 3])),
        {},
        r"tokens_per_expert must sum to at most the number of rows of a \(4\), got 5",
    ),
    "sizes_float": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([2.0, 2.0])),
        {},
        r"tokens_per_expert must be int64 or int32",
    ),
    "b_device": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3, device=META), torch.tensor([2, 2])),
        {},
        r"b must be on the device of a",
    ),
    "backend_name": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([2, 2])),
        {"backend": "triton"},
        r"backend must be one of 'auto', 'kernel', 'wgmma', 'mma', 'cublas', 'torch', got 'triton'",
    ),
    "sizes_device": (
        mk.grouped_gemm,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([2, 2], device=META)),
        {},
        r"tokens_per_expert must be on the device of a",
    ),
    # grouped_gemm_swiglu
    "swiglu_odd_columns": (
        mk.grouped_gemm_swiglu,
        (torch.randn(4, 4), torch.randn(2, 4, 3), torch.tensor([2, 2])),
        {},
        r"b must have an even number of output columns for SwiGLU \(\[gate \| up\]\), got 3",
    ),
    "swiglu_sizes_sum": (
        mk.grouped_gemm_swiglu,
        (torch.randn(4, 4), torch.randn(2, 4, 6), torch.tensor([2, 3])),
        {},
        r"tokens_per_expert must sum to at most the number of rows of a \(4\), got 5",
    ),
    "swiglu_limit_zero": (
        mk.grouped_gemm_swiglu,
        (torch.randn(4, 4), torch.randn(2, 4, 6), torch.tensor([2, 2])),
        {"limit": 0.0},
        r"limit must be > 0 \(or None: no clamp\), got 0",
    ),
    "swiglu_alpha_nan": (
        mk.grouped_gemm_swiglu,
        (torch.randn(4, 4), torch.randn(2, 4, 6), torch.tensor([2, 2])),
        {"alpha": float("nan")},
        r"alpha must be finite, got nan",
    ),
    # swiglu
    "swiglu_odd_pre": (mk.swiglu, (torch.randn(4, 5),), {}, r"pre must have an even number"),
    "swiglu_pre_rank": (mk.swiglu, (torch.randn(4),), {}, r"pre must be a 2-D tensor"),
    "swiglu_offset_inf": (
        mk.swiglu,
        (torch.randn(4, 6),),
        {"up_offset": float("inf")},
        r"up_offset must be finite, got inf",
    ),
    "swiglu_limit_negative": (
        mk.swiglu_backward,
        (torch.randn(4, 3), torch.randn(4, 6)),
        {"limit": -1.0},
        r"limit must be > 0 \(or None: no clamp\), got -1",
    ),
    # grouped_gemm_wgrad
    "wgrad_rows": (
        mk.grouped_gemm_wgrad,
        (torch.randn(4, 4), torch.randn(5, 3), torch.tensor([2, 2])),
        {},
        r"grad_c.size\(0\) must equal a.size\(0\) \(M\)=4",
    ),
    "wgrad_dtype": (
        mk.grouped_gemm_wgrad,
        (torch.randn(4, 4), torch.randn(4, 3).half(), torch.tensor([2, 2])),
        {},
        r"grad_c must have the dtype of a \(Float\), got Half",
    ),
    "wgrad_backend": (
        mk.grouped_gemm_wgrad,
        (torch.randn(4, 4), torch.randn(4, 3), torch.tensor([2, 2])),
        {"backend": "eager"},
        r"backend must be one of 'auto', 'kernel', 'wgmma', 'mma', 'cublas', 'torch', got 'eager'",
    ),
    # swiglu_backward
    "swiglu_backward_columns": (
        mk.swiglu_backward,
        (torch.randn(4, 3), torch.randn(4, 5)),
        {},
        r"pre.size\(1\) must equal 2 \* grad_out.size\(1\)=6",
    ),
    "swiglu_backward_rows": (
        mk.swiglu_backward,
        (torch.randn(4, 3), torch.randn(5, 6)),
        {},
        r"pre.size\(0\) must equal grad_out.size\(0\)=4",
    ),
    "swiglu_backward_dtype": (
        mk.swiglu_backward,
        (torch.randn(4, 3), torch.randn(4, 6).double()),
        {},
        r"pre must have the dtype of grad_out \(Float\), got Double",
    ),
    # transpose_segments
    "segments_rows_1d": (
        mk.transpose_segments,
        (torch.randn(6), torch.tensor([[2, 4]])),
        {},
        r"rows must be a 2-D tensor",
    ),
    "segments_rows_int": (
        mk.transpose_segments,
        (torch.ones(6, 4, dtype=torch.long), torch.tensor([[2, 4]])),
        {},
        r"rows must be float32, bfloat16, float16 or float64, got Long",
    ),
    "segments_counts_1d": (
        mk.transpose_segments,
        (torch.randn(6, 4), torch.tensor([2, 4])),
        {},
        r"counts must be a 2-D tensor",
    ),
    "segments_counts_float": (
        mk.transpose_segments,
        (torch.randn(6, 4), torch.tensor([[2.0, 4.0]])),
        {},
        r"counts must be int64 or int32, got Float",
    ),
    "segments_counts_device": (
        mk.transpose_segments,
        (torch.randn(6, 4), torch.tensor([[2, 4]], device=META)),
        {},
        r"counts must be on the device of rows",
    ),
    "segments_counts_negative": (
        mk.transpose_segments,
        (torch.randn(6, 4), torch.tensor([[2, 4], [-1, 1]])),
        {},
        r"counts must be >= 0, got -1 for segment \(1, 0\)",
    ),
    "segments_counts_sum": (
        mk.transpose_segments,
        (torch.randn(6, 4), torch.tensor([[2, 1], [0, 2]])),
        {},
        r"counts must sum to rows.size\(0\)=6, got 5",
    ),
    "segments_counts_sum_over": (
        mk.transpose_segments,
        (torch.randn(6, 4), torch.tensor([[2, 1], [4, 2]])),
        {},
        r"counts must sum to rows.size\(0\)=6, got more by segment \(1, 0\)",
    ),
}


def assert_rejected_and_unchanged(op, args, kwargs, message):
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device != META else a for a in args]
    with pytest.raises(RuntimeError, match=message):
        op(*args, **kwargs)
    for was, now in zip(before, args, strict=True):
        if isinstance(now, torch.Tensor) and now.device != META:
            assert torch.equal(was, now), "an input was modified by a call that failed"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_rejected_and_nothing_is_written(name):
    assert_rejected_and_unchanged(*CASES[name])


# Checks that read values, not shapes: the CUDA ops skip them, since reading the values back would
# synchronise the host with the device (the kernels skip out-of-range indices instead).
VALUE_CHECKS = {
    "histogram_id_too_large",
    "histogram_negative_id",
    "counts_negative",
    "permute_id_range",
    "row_map_range",
    "sizes_negative",
    "sizes_sum",
    "swiglu_sizes_sum",
    "segments_counts_negative",
    "segments_counts_sum",
    "segments_counts_sum_over",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_ops_reject_the_same_bad_input(name):
    """The CUDA host ops, run on the emulator, share the checks and messages of the CPU ops."""
    op, args, kwargs, message = CASES[name]
    if op.__name__ not in emulated_ops():
        pytest.skip(f"{op.__name__} has no CUDA kernel")
    if name in VALUE_CHECKS:
        pytest.skip("a check of values, which the CUDA op leaves to the kernel")
    with emulate():
        assert_rejected_and_unchanged(op, args, kwargs, message)


CUDA_LIMITS = {
    "experts": (
        mk.biased_topk,
        (torch.randn(4, 513), None, 2),
        {},
        r"num_experts \(logits.size\(1\)\) must be <= 512 on CUDA, got 513",
    ),
    "groups": (
        mk.biased_topk,
        (torch.randn(4, 256), None, 2),
        {"n_groups": 128, "topk_groups": 2},
        r"n_groups must be <= 64 on CUDA, got 128",
    ),
    "histogram_experts": (
        mk.expert_histogram,
        (torch.zeros(4, 2, dtype=torch.long), 12289),
        {},
        r"num_experts must be <= 12288 on CUDA, got 12289",
    ),
}


@pytest.mark.parametrize("name", sorted(CUDA_LIMITS))
def test_limits_of_the_cuda_kernels_are_clear_errors(name):
    with emulate():
        assert_rejected_and_unchanged(*CUDA_LIMITS[name])


def test_autograd_backward_rejects_bad_grad_shape():
    with pytest.raises(RuntimeError, match=r"grad_weights must have the shape of topk_ids"):
        torch.ops.moe_kernels.biased_topk_backward(
            torch.ones(6, 3), logits(), ids(), "sigmoid", True, 1.0
        )


def test_permute_with_map_rejects_repeated_rows():
    row_map = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(
        RuntimeError, match=r"row_map must not repeat a row, but row 1 appears twice"
    ):
        torch.ops.moe_kernels.permute_with_map(torch.randn(2, 3), row_map, None, 4)
