"""The balance losses and MaxVio (SPEC.md sections 6 and 7) against hand-written loops."""

import math

import pytest
import torch

from moe_kernels import balance


def loop_aux_loss(scores, counts, num_tokens, topk, coeff, num_scored):
    """sum_i f_i * P_i written out term by term."""
    num_experts = scores.shape[1]
    total = 0.0
    for i in range(num_experts):
        f_i = num_experts / (topk * num_tokens) * int(counts[i])
        p_i = sum(float(scores[t, i]) for t in range(scores.shape[0])) / num_scored
        total += f_i * p_i
    return coeff * total


def random_probabilities(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).softmax(-1)


def topk_counts(scores, topk):
    return torch.bincount(scores.topk(topk, dim=-1).indices.flatten(), minlength=scores.shape[-1])


@pytest.mark.parametrize("num_tokens,num_experts,topk", [(1, 4, 1), (13, 8, 2), (64, 16, 6)])
def test_aux_loss_matches_the_formula_term_by_term(num_tokens, num_experts, topk):
    scores = random_probabilities(num_tokens, num_experts)
    counts = topk_counts(scores, topk)
    got = balance.aux_loss(scores, counts, num_tokens, topk, coeff=0.01)
    want = loop_aux_loss(scores, counts, num_tokens, topk, 0.01, num_tokens)
    assert float(got) == pytest.approx(want, rel=1e-12)
    # SPEC's closed form: coeff * E / (k * T^2) * sum_i counts_i * sum_t scores[t, i].
    closed = 0.01 * num_experts / (topk * num_tokens**2) * (counts * scores.sum(0)).sum()
    assert float(got) == pytest.approx(float(closed), rel=1e-12)


def test_aux_loss_with_counts_of_a_larger_batch():
    scores = random_probabilities(10, 8)
    global_counts = torch.tensor([30, 2, 5, 9, 1, 0, 7, 6])  # 60 pairs = 30 tokens x 2
    got = balance.aux_loss(scores, global_counts, 30, 2, 1.0, num_scored_tokens=10)
    assert float(got) == pytest.approx(loop_aux_loss(scores, global_counts, 30, 2, 1.0, 10))


def test_aux_loss_gradient_flows_through_scores_only():
    """The counts are constants: d loss / d scores[t, i] = coeff * E / (k * T^2) * counts_i."""
    logits = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    scores = balance.routing_probabilities(logits, "softmax")
    counts = topk_counts(scores.detach(), 2)
    (grad_scores,) = torch.autograd.grad(balance.aux_loss(scores, counts, 12, 2, 0.5), scores)
    torch.testing.assert_close(grad_scores, (0.5 * 8 / (2 * 144) * counts.double()).expand(12, 8))


def test_seq_aux_loss_is_the_mean_of_per_sequence_losses():
    batch, seq, num_experts, topk = 3, 7, 8, 2
    scores = random_probabilities(batch, seq, num_experts)
    ids = scores.topk(topk, dim=-1).indices
    counts = balance.counts_per_sequence(ids, num_experts)
    got = balance.seq_aux_loss(scores, counts, topk, 0.1)
    want = sum(loop_aux_loss(scores[b], counts[b], seq, topk, 0.1, seq) for b in range(batch))
    assert float(got) == pytest.approx(want / batch, rel=1e-12)


def test_seq_aux_loss_leaves_padding_out():
    batch, seq, num_experts, topk = 2, 6, 4, 2
    scores = random_probabilities(batch, seq, num_experts)
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1, 4:] = False
    ids = scores.topk(topk, dim=-1).indices
    counts = balance.counts_per_sequence(ids, num_experts, keep)
    got = balance.seq_aux_loss(scores * keep.unsqueeze(-1), counts, topk, 1.0)
    short = scores[1, :4]
    want = loop_aux_loss(scores[0], counts[0], seq, topk, 1.0, seq) + loop_aux_loss(
        short, topk_counts(short, topk), 4, topk, 1.0, 4
    )
    assert float(got) == pytest.approx(want / batch, rel=1e-12)


def test_counts_per_sequence_against_bincount():
    g = torch.Generator().manual_seed(3)
    ids = torch.rand(4, 9, 8, generator=g).argsort(-1)[..., :3]
    keep = torch.rand(4, 9, generator=g) > 0.3
    got = balance.counts_per_sequence(ids, 8, keep)
    for b in range(4):
        want = torch.bincount(ids[b][keep[b]].flatten(), minlength=8)
        assert torch.equal(got[b], want)
    assert got.dtype == torch.int64


def test_routing_probabilities_sum_to_one():
    logits = torch.randn(5, 6)
    for score_fn in ("softmax", "sigmoid", "sqrtsoftplus"):
        p = balance.routing_probabilities(logits, score_fn)
        torch.testing.assert_close(p.sum(-1), torch.ones(5))
    expected = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
    torch.testing.assert_close(balance.routing_probabilities(logits, "sigmoid"), expected)
    # sqrt(softplus(x)) = sqrt(log(1 + e^x)), DeepSeek-V4's score, normalised the same way.
    scores = torch.log1p(logits.double().exp()).sqrt()
    expected = (scores / scores.sum(-1, keepdim=True)).float()
    torch.testing.assert_close(balance.routing_probabilities(logits, "sqrtsoftplus"), expected)
    with pytest.raises(ValueError, match="score_fn"):
        balance.routing_probabilities(logits, "relu")


def test_max_violation():
    assert float(balance.max_violation(torch.tensor([5, 5, 5, 5]))) == 0.0
    assert float(balance.max_violation(torch.tensor([8, 0, 0, 0]))) == 3.0  # E - 1
    assert float(balance.max_violation(torch.tensor([3, 1, 2, 2]))) == pytest.approx(0.5)
    batched = balance.max_violation(torch.tensor([[5, 5], [3, 1]]))
    assert batched.tolist() == [0.0, 0.5]


def test_load_meter_sums_layers_of_different_sizes():
    meter = balance.LoadMeter()
    meter.add([torch.tensor([1, 3]), torch.tensor([2, 2, 2])])
    meter.add([torch.tensor([3, 1]), torch.tensor([6, 0, 0])])
    assert [c.tolist() for c in meter.tokens_per_expert] == [[4, 4], [8, 2, 2]]
    assert meter.max_violation() == [0.0, pytest.approx(1.0)]
    with pytest.raises(ValueError, match="2 layers"):
        meter.add([torch.tensor([1, 1])])


def test_loss_argument_errors_name_the_argument():
    scores = random_probabilities(4, 8)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        balance.aux_loss(scores, torch.zeros(7, dtype=torch.int64), 4, 2, 1.0)
    with pytest.raises(ValueError, match="scores"):
        balance.seq_aux_loss(scores, torch.zeros(4, 8, dtype=torch.int64), 2, 1.0)


def hand_z_loss(logits, keep=None):
    """ST-MoE eq. 5 term by term in fp64: (1/B) sum_i (log sum_j exp x_ij)^2 over kept tokens."""
    total, tokens = 0.0, 0
    for i, row in enumerate(logits.double().tolist()):
        if keep is not None and not keep[i]:
            continue
        total += math.log(sum(math.exp(x) for x in row)) ** 2
        tokens += 1
    return total / max(tokens, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_router_z_loss_is_st_moe_eq5(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 8, generator=g)).to(dtype).requires_grad_()
    keep = torch.rand(37, generator=g) > 0.3
    for mask in (None, keep):
        got = balance.router_z_loss(logits, 1e-3, mask)
        want = 1e-3 * hand_z_loss(logits.detach(), mask)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert math.isclose(float(got.detach()), want, rel_tol=1e-6)
    # d/dx_ij of mean_i lse_i^2 = 2 lse_i softmax(x_i)_j / B, zero at padding.
    logits.grad = None
    balance.router_z_loss(logits, 1.0, keep).backward()
    x = logits.detach().double()
    want = 2 * x.logsumexp(-1, keepdim=True) * x.softmax(-1) * keep.unsqueeze(1) / keep.sum()
    # The gradient comes back in the logits' dtype: bf16 rounds it (2^-9 relative).
    tol = dict(rtol=1e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits.grad.double(), want, **tol)
    no_tokens = torch.zeros(37, dtype=torch.bool)
    assert float(balance.router_z_loss(logits, 1.0, no_tokens).detach()) == 0.0


def test_load_stats_of_one_layer():
    stats = balance.load_stats(torch.tensor([8, 0, 4, 4]), torch.tensor([0.5, -0.25, 0.0, 0.0]))
    # mean 4: std = sqrt((16 + 16 + 0 + 0) / 4) = sqrt(8)
    assert stats == pytest.approx(
        {
            "maxvio": 1.0,
            "cv": math.sqrt(8) / 4,
            "dead_experts": 0.25,
            "min_load": 0.0,
            "max_load": 2.0,
            "bias_min": -0.25,
            "bias_max": 0.5,
        }  # fmt: skip
    )
    assert balance.load_stats(torch.tensor([3, 3, 3]))["cv"] == 0.0
    assert math.isnan(balance.load_stats(torch.zeros(4, dtype=torch.int64))["maxvio"])


def test_balance_telemetry_per_layer_and_over_the_model():
    counts = {"a": torch.tensor([8, 0, 4, 4]), "b": torch.tensor([2, 2, 2, 2, 1, 3, 0, 4])}
    telemetry = balance.balance_telemetry(counts, {"a": torch.tensor([0.1, -0.3, 0, 0]), "b": None})
    a, b = balance.load_stats(counts["a"]), balance.load_stats(counts["b"])
    assert telemetry["maxvio/a"] == a["maxvio"] and telemetry["cv/b"] == b["cv"]
    assert telemetry["maxvio"] == pytest.approx((a["maxvio"] + b["maxvio"]) / 2)
    assert telemetry["max_load"] == pytest.approx((2.0 + 2.0) / 2)
    assert telemetry["dead_experts"] == pytest.approx(2 / 12)  # one of 4, one of 8
    assert telemetry["bias_min"] == pytest.approx(-0.3) and "bias_max/b" not in telemetry
    assert balance.balance_telemetry({}) == {}
