"""The ops compose under torch.compile(fullgraph=True): route -> permute -> grouped GEMM with
the SwiGLU epilogue -> grouped GEMM -> unpermute, forward and backward, with the same results
as eager."""

import torch

import moe_kernels as mk
from conftest import tie_free_logits

NUM_EXPERTS, TOPK, HIDDEN, FFN = 16, 4, 32, 24


def moe_ffn(x, router_weight, bias, w_in, w_out):
    """A minimal MoE FFN on the package's ops: fp32 router with loss-free bias, experts of two
    grouped GEMMs (SwiGLU fused into the first), weighted combine."""
    logits = x @ router_weight
    weights, ids, _ = mk.biased_topk(logits, bias, TOPK, n_groups=4, topk_groups=2)
    rows, row_map, tokens_per_expert = mk.permute(x, ids, NUM_EXPERTS)
    h = mk.grouped_gemm_swiglu(rows, w_in, tokens_per_expert)
    y = mk.grouped_gemm(h, w_out, tokens_per_expert, trans_b=True)
    return mk.unpermute(y, row_map, weights)


def test_compiled_moe_ffn_matches_eager():
    g = torch.Generator().manual_seed(0)
    x = tie_free_logits(64, HIDDEN, seed=1) / 3
    params = [
        torch.randn(HIDDEN, NUM_EXPERTS, generator=g) / HIDDEN**0.5,
        torch.randn(NUM_EXPERTS, HIDDEN, 2 * FFN, generator=g) / HIDDEN**0.5,  # [gate | up]
        torch.randn(NUM_EXPERTS, HIDDEN, FFN, generator=g) / FFN**0.5,  # [E, N, K]: trans_b
    ]
    bias = torch.linspace(-0.1, 0.1, NUM_EXPERTS)
    eager_params = [p.clone().requires_grad_() for p in params]
    compiled_params = [p.clone().requires_grad_() for p in params]
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_eager = moe_ffn(x_eager, eager_params[0], bias, *eager_params[1:])
    compiled = torch.compile(moe_ffn, fullgraph=True)
    out_compiled = compiled(x_compiled, compiled_params[0], bias, *compiled_params[1:])
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)

    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-6)
    for got, want in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
