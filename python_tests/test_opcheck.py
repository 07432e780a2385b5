"""torch.library.opcheck on every op: schema (including the in-place mutation of update_bias),
fake kernels, autograd registration and AOT dispatch, static and dynamic shapes."""

import pytest
import torch

import moe_kernels  # noqa: F401
from conftest import HAS_GPU, has_kernel, integer_bias, random_ids, tie_free_logits
from moe_kernels.emulator import emulate, emulated_ops

ops = torch.ops.moe_kernels


def _sample_cases():
    g = torch.Generator().manual_seed(0)
    logits = tie_free_logits(20, 16)
    ids = random_ids(20, 16, 4, used=12)
    hidden = torch.randn(20, 8, generator=g)
    weights = torch.rand(20, 4, generator=g)
    rows, row_map, counts = ops.permute(hidden, ids, 16, 4)
    a = torch.randn(int(rows.shape[0]), 8, generator=g)
    sizes = (counts + 3) // 4 * 4
    b = torch.randn(16, 8, 6, generator=g)
    grad_c = torch.randn(a.shape[0], 6, generator=g)
    return {
        "biased_topk_sigmoid_groups": (
            ops.biased_topk,
            (logits.requires_grad_(), integer_bias(16), 4, "sigmoid", 4, 2, True, 1.0, "top2"),
        ),
        "biased_topk_softmax": (
            ops.biased_topk,
            (
                tie_free_logits(20, 16).requires_grad_(),
                None,
                2,
                "softmax",
                1,
                1,
                False,
                2.0,
                "top2",
            ),
        ),
        "biased_topk_bf16": (
            ops.biased_topk,
            (tie_free_logits(20, 16, torch.bfloat16), None, 3, "sigmoid", 1, 1, True, 1.0, "top2"),
        ),
        "biased_topk_token_mask": (
            ops.biased_topk,
            (
                logits,
                integer_bias(16),
                3,
                "sigmoid",
                4,
                2,
                True,
                1.0,
                "top2",
                torch.arange(20) % 3 != 0,
            ),
        ),
        "biased_topk_backward": (
            ops.biased_topk_backward,
            (weights, logits.detach(), ids, "sigmoid", True, 1.0),
        ),
        "biased_topk_sqrtsoftplus": (
            ops.biased_topk,
            (logits, integer_bias(16), 3, "sqrtsoftplus", 4, 2, True, 1.0, "top2"),
        ),
        "biased_topk_backward_sqrtsoftplus": (
            ops.biased_topk_backward,
            (weights, logits.detach(), ids, "sqrtsoftplus", False, 2.0),
        ),
        "biased_topk_norm_eps_min": (
            ops.biased_topk,
            (logits, None, 3, "softmax", 1, 1, True, 1.0, "top2", None, 1e-6, 0.9),
        ),
        "biased_topk_choose_on_logits": (
            ops.biased_topk,
            (
                logits,
                integer_bias(16),
                3,
                "sigmoid",
                4,
                2,
                True,
                1.0,
                "top2",
                None,
                0.0,
                0.0,
                "logits",
            ),
        ),
        "biased_topk_backward_norm_eps_min": (
            ops.biased_topk_backward,
            (weights, logits.detach(), ids, "softmax", True, 1.0, 1e-6, 0.9),
        ),
        "expert_histogram": (ops.expert_histogram, (ids, 16)),
        "update_bias": (ops.update_bias, (torch.zeros(16), counts, 1e-3, "sign")),
        "update_bias_centered": (ops.update_bias, (torch.zeros(16), counts, 1e-3, "sign", True)),
        "update_bias_proportional": (
            ops.update_bias,
            (torch.zeros(16), counts.int(), 1e-3, "proportional"),
        ),
        "permute": (ops.permute, (hidden.clone().requires_grad_(), ids, 16, 1)),
        "permute_aligned": (ops.permute, (hidden.clone().requires_grad_(), ids, 16, 4)),
        "permute_dropped": (
            ops.permute,
            (hidden.clone().requires_grad_(), torch.where(ids % 3 == 0, -1, ids), 16, 1),
        ),
        "permute_with_map": (
            ops.permute_with_map,
            (
                hidden.clone().requires_grad_(),
                row_map,
                weights.detach().clone().requires_grad_(),
                int(rows.shape[0]),
            ),
        ),
        "drop_over_capacity": (ops.drop_over_capacity, (ids, weights.detach(), 16, 3, "probs")),
        "drop_over_capacity_position": (ops.drop_over_capacity, (ids, None, 16, 3, "position")),
        "unpermute": (
            ops.unpermute,
            (rows.clone().requires_grad_(), row_map, weights.clone().requires_grad_()),
        ),
        "unpermute_unweighted": (ops.unpermute, (rows.clone().requires_grad_(), row_map, None)),
        "unpermute_weights_grad": (ops.unpermute_weights_grad, (hidden, rows, row_map)),
        "grouped_gemm": (ops.grouped_gemm, (a.requires_grad_(), b.requires_grad_(), sizes, False)),
        "grouped_gemm_trans_b": (
            ops.grouped_gemm,
            (a, b.transpose(1, 2).contiguous().requires_grad_(), sizes, True),
        ),
        "grouped_gemm_wgrad": (ops.grouped_gemm_wgrad, (a.detach(), grad_c, sizes, False)),
        "grouped_gemm_wgrad_cublas": (
            ops.grouped_gemm_wgrad,
            (a.detach(), grad_c, sizes, True, "cublas"),
        ),
        "grouped_gemm_bf16_cublas": (
            ops.grouped_gemm,
            (a.bfloat16().requires_grad_(), b.bfloat16().requires_grad_(), sizes, False, "cublas"),
        ),
        "grouped_gemm_swiglu": (
            ops.grouped_gemm_swiglu,
            (a.detach().requires_grad_(), b.detach().requires_grad_(), sizes, False),
        ),
        "grouped_gemm_swiglu_bf16_trans_b": (
            ops.grouped_gemm_swiglu,
            (
                a.detach().bfloat16().requires_grad_(),
                b.detach().transpose(1, 2).bfloat16().requires_grad_(),
                sizes.int(),
                True,
            ),
        ),
        "grouped_gemm_swiglu_product_not_kept": (
            ops.grouped_gemm_swiglu,
            (a.detach(), b.detach(), sizes, False, "auto", False),
        ),
        "grouped_gemm_swiglu_gpt_oss": (
            ops.grouped_gemm_swiglu,
            (a.detach().requires_grad_(), b.detach(), sizes, False, "auto", True, 1.702, 7.0, 1.0),
        ),
        "swiglu": (ops.swiglu, (grad_c.clone().requires_grad_(),)),
        "swiglu_clamped": (ops.swiglu, (grad_c.clone().requires_grad_(), 1.0, 0.5, 0.0)),
        "swiglu_backward": (ops.swiglu_backward, (grad_c[:, :3].contiguous(), grad_c)),
        "swiglu_backward_gpt_oss": (
            ops.swiglu_backward,
            (grad_c[:, :3].contiguous(), grad_c, 1.702, 0.5, 1.0),
        ),
        "transpose_segments": (
            ops.transpose_segments,
            (hidden.clone().requires_grad_(), torch.tensor([[3, 0, 5], [2, 6, 4]])),
        ),
        "transpose_segments_bf16_int32": (
            ops.transpose_segments,
            (
                hidden.t().bfloat16().requires_grad_(),
                torch.tensor([[1, 2], [0, 3], [2, 0]], dtype=torch.int32),
            ),
        ),
    }


CASES = _sample_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck_of_the_cuda_op(name):
    """The CUDA host ops (run on the emulator) against the same schema and fake kernels."""
    op, args = CASES[name]
    if op._qualified_op_name.split("::")[1] not in emulated_ops():
        pytest.skip("no CUDA kernel")
    with emulate():
        torch.library.opcheck(op, args)


def on_cuda(arg):
    if not isinstance(arg, torch.Tensor):
        return arg
    return arg.detach().to("cuda").requires_grad_(arg.requires_grad)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck_of_the_cuda_op_on_a_gpu(name):
    """The CUDA ops on a real GPU against the same schema and fake kernels. opcheck compares
    the op's outputs between its runs on one device only (the kernels are deterministic)."""
    op, args = CASES[name]
    if not has_kernel(op._qualified_op_name.split("::")[1], "CUDA"):
        pytest.skip("no CUDA kernel")
    torch.library.opcheck(op, tuple(on_cuda(arg) for arg in args))


# Collectives need a process group: test_dispatch.py opchecks the row movements on Gloo ranks.
# ep_plan's outputs have data-dependent sizes (the counts other ranks send) and no fake kernel.
COLLECTIVES = {"ep_plan", "ep_dispatch_rows", "ep_combine_rows"}


def test_every_op_is_covered():
    declared = {
        name
        for name in dir(ops)
        if not name.startswith("_") and isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)
    }
    covered = {op._qualified_op_name.split("::")[1] for op, _ in CASES.values()}
    assert declared - COLLECTIVES == covered
