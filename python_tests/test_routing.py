"""biased_topk against the reference (SPEC.md section 1): ids and counts exactly, weights to
fp32 tolerance, and the gradient w.r.t. logits.

On a GPU the scores come from CUDA's expf (within 2 ulp; the host's libm within 1), with FMA
contraction and the softmax sum in the warp's order: they differ from the reference's by a few
fp32 ulps. That is far inside the weights' tolerance, and far below the gaps between the test
logits' choice values (tie_free_logits, integer_bias), so ids and counts stay exact. Only group
scores, sums of choice values, can come closer than that (conftest.near_ties): the few tokens
where they do may keep another group on a GPU, and are checked for a valid routing instead.
"""

import pytest
import torch

import moe_kernels as mk
from conftest import emulating, integer_bias, near_ties, on_backends, tie_free_logits
from moe_kernels import reference as ref

SCORE_FNS = ["sigmoid", "softmax", "sqrtsoftplus"]
# (num_experts, topk): k in {1, 2, 8, E}, wherever k <= E.
EXPERTS_TOPK = [(e, k) for e in (1, 8, 64, 256) for k in sorted({1, 2, 8, e}) if k <= e]


def weights_of(
    logits, ids, score_fn="sigmoid", normalize=True, scale=1.0, norm_eps=0.0, norm_min=0.0, **_
):
    """The weights SPEC.md section 1 gives the experts ``ids`` of each token: their unbiased
    scores, normalized and scaled (the reference's arithmetic, for any choice of experts)."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    weights = ref.score(x, score_fn).gather(1, ids)
    if normalize:
        total = (weights.sum(dim=-1, keepdim=True) + norm_eps).clamp(min=norm_min)
        weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    return weights * scale


def assert_routes_like_reference(device, logits, bias, k, **kwargs):
    """Routes ``logits`` (built on the CPU) on ``device`` and compares with the reference: ids
    and counts exactly, weights to fp32 tolerance (a GPU's scores differ by a few ulps). On a
    GPU, the tokens ``near_ties`` names may be decided either way (at most 1 in 20, so that the
    test still compares most tokens exactly): they need k distinct experts of their own, with
    the weights of those experts, and the counts must be those of the ids. On the CPU and the
    emulator every token is compared exactly."""
    on_device = None if bias is None else bias.to(device)
    weights, ids, counts = (
        t.cpu() for t in mk.biased_topk(logits.to(device), on_device, k, **kwargs)
    )
    ref_weights, ref_ids, ref_counts = ref.biased_topk(logits, bias, k, **kwargs)
    num_tokens, num_experts = logits.shape
    undecided = torch.zeros(num_tokens, dtype=torch.bool)
    if device == "cuda":
        undecided = near_ties(logits, bias, k, **kwargs)
        assert int(undecided.sum()) <= num_tokens // 20, "too many near ties in the test data"
    decided = ~undecided
    assert torch.equal(ids[decided], ref_ids[decided])
    assert weights.dtype == ref_weights.dtype
    torch.testing.assert_close(weights[decided], ref_weights[decided], rtol=1e-5, atol=1e-6)
    # Counts are exact integers: those of the decided tokens are the reference's.
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=num_experts))
    undecided_counts = torch.bincount(ref_ids[undecided].flatten(), minlength=num_experts)
    assert torch.equal(
        counts - torch.bincount(ids[undecided].flatten(), minlength=num_experts),
        ref_counts - undecided_counts,
    )
    if undecided.any():
        own = ids[undecided]
        assert own.min() >= 0 and own.max() < num_experts
        assert all(len(set(row)) == k for row in own.tolist())
        want = weights_of(logits[undecided], own, **kwargs)
        torch.testing.assert_close(weights[undecided], want, rtol=1e-5, atol=1e-6)
    return weights, ids, counts


@on_backends("biased_topk")
@pytest.mark.parametrize("num_experts,topk", EXPERTS_TOPK)
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 2000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_biased_topk_matches_reference(device, num_experts, topk, num_tokens, dtype, score_fn):
    if emulating() and topk >= 64:
        num_tokens = min(num_tokens, 100)  # k rounds of warp argmax per token: slow to emulate
    logits = tie_free_logits(num_tokens, num_experts, dtype)
    bias = integer_bias(num_experts)
    got = assert_routes_like_reference(device, logits, bias, topk, score_fn=score_fn)
    assert int(got[2].sum()) == num_tokens * topk


@on_backends("biased_topk")
@pytest.mark.parametrize("normalize,scale", [(True, 1.0), (False, 1.0), (True, 2.5), (False, 0.5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_weights_options(device, normalize, scale, with_bias):
    logits = tie_free_logits(33, 64)
    bias = integer_bias(64) if with_bias else None
    assert_routes_like_reference(device, logits, bias, 6, normalize=normalize, scale=scale)


@on_backends("biased_topk", "biased_topk_backward")
@pytest.mark.parametrize("score_fn", SCORE_FNS)
@pytest.mark.parametrize("norm_eps,floored", [(0.5, False), (0.0, True), (0.25, True)])
def test_normalisation_epsilon_and_floor(device, score_fn, norm_eps, floored):
    """The weights are divided by max(sum + norm_eps, norm_min). With the floor between the
    tokens' sums, some tokens divide by it (their weights' gradient then skips the sum) and the
    others by their sum: both, forward and backward, as the reference computes them."""
    logits = tie_free_logits(40, 32, seed=7)
    bias = integer_bias(32)
    sums = ref.biased_topk(logits, bias, 4, score_fn=score_fn, normalize=False)[0].sum(-1)
    norm_min = float(sums.quantile(0.5) + norm_eps) if floored else 0.0
    kwargs = dict(score_fn=score_fn, norm_eps=norm_eps, norm_min=norm_min, scale=1.5)
    weights = assert_routes_like_reference(device, logits, bias, 4, **kwargs)[0]
    divided_by_sum = torch.isclose(weights.sum(-1), torch.tensor(1.5) * sums / (sums + norm_eps))
    assert divided_by_sum.any() and (divided_by_sum.all() != floored)

    on_device = logits.to(device).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    upstream = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    weights = mk.biased_topk(on_device, bias.to(device), 4, **kwargs)[0]
    (weights * upstream.to(device)).sum().backward()
    (ref.biased_topk(ref_logits, bias, 4, **kwargs)[0] * upstream).sum().backward()
    torch.testing.assert_close(on_device.grad.cpu(), ref_logits.grad, rtol=1e-5, atol=1e-6)


@on_backends("biased_topk", "biased_topk_backward")
@pytest.mark.parametrize("score_fn", SCORE_FNS)
@pytest.mark.parametrize("n_groups,topk_groups", [(1, 1), (4, 2)])
def test_choosing_on_the_logits(device, score_fn, n_groups, topk_groups):
    """choose_on="logits": the bias shifts the logits for the choice (Kolibri-1), which picks
    other experts than the biased scores would; the weights are the scores of those experts."""
    logits = tie_free_logits(40, 32, seed=9)
    bias = integer_bias(32)
    kwargs = dict(score_fn=score_fn, n_groups=n_groups, topk_groups=topk_groups)
    _, ids, _ = assert_routes_like_reference(device, logits, bias, 4, choose_on="logits", **kwargs)
    by_scores = ref.biased_topk(logits, bias, 4, **kwargs)[1]
    assert not torch.equal(ids, by_scores)
    choice = logits + bias
    if n_groups == 1:
        assert torch.equal(ids, choice.topk(4, dim=-1).indices)

    on_device = logits.to(device).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    upstream = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    weights = mk.biased_topk(on_device, bias.to(device), 4, choose_on="logits", **kwargs)[0]
    (weights * upstream.to(device)).sum().backward()
    (
        ref.biased_topk(ref_logits, bias, 4, choose_on="logits", **kwargs)[0] * upstream
    ).sum().backward()
    torch.testing.assert_close(on_device.grad.cpu(), ref_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "n_groups,topk_groups,topk,group_score",
    [
        (8, 4, 8, "top2"),
        (8, 1, 4, "top2"),
        (8, 3, 6, "topk_per_group"),
        (64, 8, 8, "top2"),
        (4, 2, 8, "topk_per_group"),
        (2, 2, 4, "top2"),
        (8, 3, 6, "max"),
        (16, 4, 6, "max"),
    ],
)
@pytest.mark.parametrize("score_fn", SCORE_FNS)
@on_backends("biased_topk")
def test_group_limited_routing(device, n_groups, topk_groups, topk, group_score, score_fn):
    logits = tie_free_logits(257, 64, seed=3)
    bias = integer_bias(64, seed=4)
    kwargs = dict(
        score_fn=score_fn, n_groups=n_groups, topk_groups=topk_groups, group_score=group_score
    )
    got = assert_routes_like_reference(device, logits, bias, topk, **kwargs)
    # Every chosen expert lies in one of the kept groups.
    groups_per_token = (got[1] // (64 // n_groups)).unique(dim=1) if topk > 1 else got[1]
    assert all(len(set(row.tolist())) <= topk_groups for row in groups_per_token)


@on_backends("biased_topk")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_largest_shapes_of_the_cuda_kernel(device, dtype, score_fn):
    # E = 512 (16 experts per lane), k = 16, G = 32 groups keeping 4; and G = 64. In bf16 the
    # grid is finer than an ulp near +-3, so some logits of a token are equal: equal scores on
    # every device (and equal biases then tie exactly), the lower index first everywhere.
    logits = tie_free_logits(150, 512, dtype, seed=8)
    bias = integer_bias(512, seed=9)
    for n_groups, topk_groups in ((32, 4), (64, 8)):
        kwargs = dict(score_fn=score_fn, n_groups=n_groups, topk_groups=topk_groups)
        assert_routes_like_reference(device, logits, bias, 16, **kwargs)


@on_backends("biased_topk")
@pytest.mark.parametrize("num_experts", [448, 320])  # 7 and 5 experts per group
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_64_groups_with_padding_slots(device, num_experts, dtype, score_fn):
    # The CUDA kernel rounds E up to 16 experts per lane (512): the padding slots past the last
    # expert fall in groups 64 and above, past the 64-bit mask of kept groups, which they must
    # never index (a shift by 64 or more is undefined behaviour: the emulator's UBSan build
    # reports it). A few tokens, so that the emulator is quick. Equal bf16 logits tie exactly,
    # as in the test above.
    logits = tie_free_logits(40, num_experts, dtype, seed=10)
    bias = integer_bias(num_experts, seed=11)
    kwargs = dict(score_fn=score_fn, n_groups=64, topk_groups=4)
    _, ids, _ = assert_routes_like_reference(device, logits, bias, 8, **kwargs)
    groups_per_token = ids // (num_experts // 64)
    assert all(len(set(row)) <= 4 for row in groups_per_token.tolist())


@on_backends("biased_topk")
@pytest.mark.parametrize("mask", ["random", "none_counted", "all_counted", "left_padding"])
@pytest.mark.parametrize("n_groups,topk_groups", [(1, 1), (8, 3)])
def test_token_mask_leaves_routing_and_counts_only_its_tokens(device, mask, n_groups, topk_groups):
    # 2000 tokens span many blocks of the CUDA kernel, each flushing its own histogram.
    num_tokens, num_experts, k = 2000, 64, 6
    logits = tie_free_logits(num_tokens, num_experts, seed=3)
    bias = integer_bias(num_experts)
    token_mask = {
        "random": torch.rand(num_tokens, generator=torch.Generator().manual_seed(1)) < 0.7,
        "none_counted": torch.zeros(num_tokens, dtype=torch.bool),
        "all_counted": torch.ones(num_tokens, dtype=torch.bool),
        "left_padding": torch.arange(num_tokens) % 100 >= 37,
    }[mask]
    kwargs = {"n_groups": n_groups, "topk_groups": topk_groups}
    weights, ids, counts = (
        t.cpu()
        for t in mk.biased_topk(
            logits.to(device), bias.to(device), k, token_mask=token_mask.to(device), **kwargs
        )
    )
    unmasked_weights, unmasked_ids, _ = mk.biased_topk(
        logits.to(device), bias.to(device), k, **kwargs
    )
    assert torch.equal(ids, unmasked_ids.cpu())
    assert torch.equal(weights, unmasked_weights.cpu())
    ref_weights, ref_ids, ref_counts = ref.biased_topk(
        logits, bias, k, token_mask=token_mask, **kwargs
    )
    assert torch.equal(counts, torch.bincount(ids[token_mask].flatten(), minlength=num_experts))
    if device != "cuda":  # on a GPU, near ties may be decided either way
        assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)
    assert int(counts.sum()) == k * int(token_mask.sum())


@on_backends("biased_topk")
def test_negative_bias_never_selects_masked_group(device):
    # Scores of group 0 are high but its bias is very negative; group 1 wins. Experts of the
    # masked groups must not come back through a 0.0 mask beating negative choices.
    logits = torch.tensor([[3.0, 2.9, -3.0, -2.9, 0.0, 0.1, 0.2, 0.3]])
    bias = torch.tensor([-10.0, -10.0, -5.0, -5.0, -5.0, -5.0, -5.0, -5.0])
    _, ids, _ = mk.biased_topk(logits.to(device), bias.to(device), 4, n_groups=4, topk_groups=2)
    _, ref_ids, _ = ref.biased_topk(logits, bias, 4, n_groups=4, topk_groups=2)
    assert torch.equal(ids.cpu(), ref_ids)
    assert not set(ids.flatten().tolist()) & {0, 1}


@on_backends("biased_topk")
def test_bias_decides_choice_but_not_weights(device):
    logits = tie_free_logits(64, 16, seed=7)
    bias = torch.zeros(16)
    bias[5] = 10.0  # expert 5 becomes everybody's first choice
    weights, ids, counts = mk.biased_topk(logits.to(device), bias.to(device), 2, normalize=False)
    assert torch.all(ids[:, 0] == 5) and counts[5] == 64
    torch.testing.assert_close(weights[:, 0].cpu(), torch.sigmoid(logits[:, 5]))


@on_backends("biased_topk")
def test_ties_go_to_lower_expert_index(device):
    # Exact ties on every device: equal logits give bit-equal scores (and group scores, summed
    # in the same order), whatever the device's expf.
    logits = torch.zeros(3, 40, device=device)
    for score_fn in SCORE_FNS:
        _, ids, _ = mk.biased_topk(logits, None, 3, score_fn=score_fn)
        assert ids.tolist() == [[0, 1, 2]] * 3
        _, ids, _ = mk.biased_topk(logits, None, 3, score_fn=score_fn, n_groups=4, topk_groups=2)
        assert ids.tolist() == [[0, 1, 2]] * 3


@on_backends("biased_topk")
def test_non_finite_logits_give_valid_distinct_ids(device):
    logits = tie_free_logits(6, 16)
    logits[0, :] = float("nan")
    logits[1, 3] = float("nan")
    logits[2, :5] = float("inf")
    logits[3, :] = float("-inf")
    logits = logits.to(device)
    for score_fn in SCORE_FNS:
        _, ids, counts = mk.biased_topk(logits, integer_bias(16).to(device), 4, score_fn=score_fn)
        assert ids.min() >= 0 and ids.max() < 16
        assert all(len(set(row)) == 4 for row in ids.tolist())
        assert int(counts.sum()) == 24
    _, ids, _ = mk.biased_topk(logits, None, 4)
    assert 3 not in ids[1].tolist()  # a NaN score never wins a slot


@on_backends("biased_topk", "biased_topk_backward")
@pytest.mark.parametrize("score_fn", ["sigmoid", "sqrtsoftplus"])
def test_zero_weight_sum_stays_zero(device, score_fn):
    # Both underflow to exactly 0 on any IEEE device: exp(200) overflows to inf, exp(-200) to 0
    # (sqrt(log1p(0)) = 0, where sqrtsoftplus' derivative is taken as its limit, 0).
    logits = torch.full((2, 4), -200.0, device=device, requires_grad=True)
    weights, _, _ = mk.biased_topk(logits, None, 2, score_fn=score_fn)
    assert torch.equal(weights.detach().cpu(), torch.zeros(2, 2))
    weights.sum().backward()
    assert torch.equal(logits.grad.cpu(), torch.zeros(2, 4))


@on_backends("biased_topk")
def test_fp64_logits_compute_in_fp64(device):
    logits = tie_free_logits(9, 32, torch.float64)
    got = assert_routes_like_reference(device, logits, integer_bias(32), 4)
    assert got[0].dtype == torch.float64


@on_backends("biased_topk", "biased_topk_backward")
@pytest.mark.parametrize("score_fn", SCORE_FNS)
@pytest.mark.parametrize("normalize,scale", [(True, 1.0), (False, 2.0), (True, 2.5)])
@pytest.mark.parametrize("n_groups,topk_groups", [(1, 1), (4, 2)])
def test_gradient_matches_reference(device, score_fn, normalize, scale, n_groups, topk_groups):
    logits = tie_free_logits(40, 32, seed=5).to(device).requires_grad_()
    ref_logits = logits.detach().cpu().requires_grad_()
    kwargs = dict(
        score_fn=score_fn,
        normalize=normalize,
        scale=scale,
        n_groups=n_groups,
        topk_groups=topk_groups,
    )
    upstream = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    bias = integer_bias(32)
    # The gradients compare only where both sides route alike, on a GPU too.
    assert not near_ties(ref_logits, bias, 4, **kwargs).any()
    (mk.biased_topk(logits, bias.to(device), 4, **kwargs)[0] * upstream.to(device)).sum().backward()
    (ref.biased_topk(ref_logits, bias, 4, **kwargs)[0] * upstream).sum().backward()
    # fp32 tolerance: a GPU's scores and the softmax backward's warp sums differ from the
    # reference's by a few ulps (expf, FMA, summation order); each score's gradient is added
    # once per token, so its float atomics have no order to differ in.
    torch.testing.assert_close(logits.grad.cpu(), ref_logits.grad, rtol=1e-5, atol=1e-6)


@on_backends("biased_topk", "biased_topk_backward")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_in_half_types(device, dtype):
    logits = tie_free_logits(20, 16, dtype).to(device).requires_grad_()
    ref_logits = logits.detach().cpu().requires_grad_()
    assert not near_ties(ref_logits, None, 3).any()
    mk.biased_topk(logits, None, 3)[0].pow(2).sum().backward()
    ref.biased_topk(ref_logits, None, 3)[0].pow(2).sum().backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(
        logits.grad.float().cpu(), ref_logits.grad.float(), rtol=2e-2, atol=2e-2
    )


@on_backends("biased_topk", "biased_topk_backward")
@pytest.mark.parametrize("score_fn", SCORE_FNS)
@pytest.mark.parametrize(
    "normalize,norm_eps,norm_min", [(True, 0.0, 0.0), (False, 0.0, 0.0), (True, 0.3, 1.2)]
)
def test_gradcheck_fp64(device, score_fn, normalize, norm_eps, norm_min):
    logits = tie_free_logits(6, 12, torch.float64).to(device).requires_grad_()
    bias = integer_bias(12).to(device)
    scaling = dict(normalize=normalize, scale=1.5, norm_eps=norm_eps, norm_min=norm_min)

    def weights(x):
        return mk.biased_topk(x, bias, 3, score_fn=score_fn, **scaling)[0]

    assert torch.autograd.gradcheck(weights, (logits,))
