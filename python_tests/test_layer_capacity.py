"""MoELayer with token-choice capacity (``drop_policy``) against a dense pure-PyTorch reference
written from the definition (GShard / Switch, Megatron-Core's token drop), and the contracts
around it: the bias balances the routing choices, dropped pairs are reported, padding tokens
take no capacity, expert parallelism drops per rank."""

import math

import pytest
import torch
import torch.nn.functional as F
from ranks import run_on_ranks
from test_layer import LAYER_OPS, expert_outputs, set_bias, shared_output

from conftest import near_ties, on_backends
from moe_kernels import balance, reference
from moe_kernels.layer import MoELayer, update_balance

H, F_, E, K = 16, 8, 8, 2
CAPACITY_OPS = (*LAYER_OPS, "drop_over_capacity")


def make_layer(drop_policy="probs", seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(capacity_factor=0.75, drop_policy=drop_policy, num_shared_experts=1)
    options.update(kwargs)
    return MoELayer(H, F_, E, K, **options)


def reference_capacity_moe(layer, hidden, padding_mask=None):
    """The layer by its definition, in fp64, without the package's ops: reference routing;
    per expert, its capacity ceil(cf * T * k / E) of the pairs of real tokens, ranked by weight
    (ties to the earlier pair) or by position; the kept pairs' weighted expert outputs summed
    densely. Returns the output, the routing counts before dropping, which pairs are kept, and
    the ids."""
    router = layer.router
    x = hidden.reshape(-1, H)
    logits = F.linear(x.float(), router.weight).double()
    weights, ids, _ = reference.biased_topk(
        logits, layer.balancer.bias, layer.topk, router.score_fn, router.n_groups,
        router.topk_groups, router.normalize, router.route_scale, router.group_score,
    )  # fmt: skip
    real = torch.ones(x.shape[0], dtype=torch.bool)
    if padding_mask is not None:
        real = ~padding_mask.reshape(-1)
    capacity = math.ceil(layer.capacity_factor * x.shape[0] * layer.topk / layer.num_experts)
    kept = torch.zeros_like(ids, dtype=torch.bool)
    for e in range(layer.num_experts):
        pairs = ((ids == e) & real.unsqueeze(1)).flatten().nonzero().flatten()
        if layer.drop_policy == "probs":  # stable: equal weights keep pair order
            pairs = pairs[torch.sort(weights.flatten()[pairs], descending=True, stable=True)[1]]
        kept.view(-1)[pairs[:capacity]] = True
    x = x.double()
    per_expert = torch.stack([(weights * ((ids == e) & kept)).sum(1) for e in range(E)])
    out = (per_expert.unsqueeze(-1) * expert_outputs(layer, x)).sum(0) + shared_output(layer, x)
    counts = torch.bincount(ids[real].flatten(), minlength=E)
    return out.view(hidden.shape), counts, kept, ids


def assert_matches_reference(layer, x, padding_mask=None):
    out = layer(x, padding_mask)
    want, counts, kept, ids = reference_capacity_moe(layer, x, padding_mask)
    assert (~kept).any(), "the case must drop something"
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    want_grads = torch.autograd.grad(want, [x, *layer.parameters()], grad.double())
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-5)
    # The bias's counts are the routing choices; the dropped pairs are reported beside them.
    assert torch.equal(layer.tokens_per_expert.cpu(), counts)
    want_dropped = counts - torch.bincount(ids[kept], minlength=E)
    assert torch.equal(layer.dropped_per_expert.cpu(), want_dropped)


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
@pytest.mark.parametrize("pad_to_capacity", [False, True])
@pytest.mark.parametrize(
    "routing",
    [
        dict(balancing="loss_free"),
        dict(balancing="loss_free+seq_aux_loss", score_fn="softmax", n_groups=4, topk_groups=2),
        dict(balancing="aux_loss", score_fn="sqrtsoftplus", capacity_factor=1.0),
    ],
    ids=["loss_free", "composed-softmax-groups", "aux_loss-sqrtsoftplus"],
)
def test_capacity_layer_matches_the_reference(drop_policy, pad_to_capacity, routing):
    layer = make_layer(drop_policy, pad_to_capacity=pad_to_capacity, **routing)
    if layer.balancer.bias is not None:
        set_bias(layer)
    x = torch.randn(3, 21, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert_matches_reference(layer, x)


@on_backends(*CAPACITY_OPS)
@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_capacity_layer_runs_on_every_backend(device, pad_to_capacity):
    layer = make_layer(pad_to_capacity=pad_to_capacity).to(device)
    set_bias(layer)
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(2)).to(device)
    router = layer.router
    routing = (router.score_fn, router.n_groups, router.topk_groups, router.group_score)
    assert not near_ties(router.logits(x), layer.balancer.bias, K, *routing).any()
    assert_matches_reference(layer, x.requires_grad_())


@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_padding_tokens_take_no_capacity(pad_to_capacity):
    layer = make_layer("position", pad_to_capacity=pad_to_capacity)
    x = torch.randn(2, 30, H, generator=torch.Generator().manual_seed(3), requires_grad=True)
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[0, :12] = True  # left padding: by position it would take the first places
    padding[1, 25:] = True
    assert_matches_reference(layer, x, padding)


def test_padded_and_unpadded_layouts_give_the_same_layer():
    unpadded, padded = make_layer(), make_layer(pad_to_capacity=True)
    x = torch.randn(50, H, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(padded(x), unpadded(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(padded.dropped_per_expert, unpadded.dropped_per_expert)


def test_the_bias_moves_with_the_routing_choices_and_the_step_sums_the_dropped_pairs():
    layer = make_layer(rate=0.01)
    plain = make_layer(rate=0.01, drop_policy=None)  # the same weights, no capacity
    routed, dropped = torch.zeros(E, dtype=torch.int64), torch.zeros(E, dtype=torch.int64)
    for seed in range(3):  # three micro-batches of one step
        x = torch.randn(40, H, generator=torch.Generator().manual_seed(seed))
        layer(x), plain(x)
        routed += layer.tokens_per_expert
        dropped += layer.dropped_per_expert
        assert torch.equal(layer.tokens_per_expert, plain.tokens_per_expert)
    assert dropped.sum() > 0
    assert torch.equal(layer.update_balance(), routed)
    assert torch.equal(layer.balancer.step_dropped_per_expert, dropped)
    plain.update_balance()
    assert torch.equal(layer.balancer.bias, plain.balancer.bias)
    assert not layer.balancer.dropped_per_expert.any()  # the next step starts from zero
    stats = balance.load_stats(routed, layer.balancer.bias, dropped)
    assert stats["drop_rate"] == pytest.approx(float(dropped.sum()) / float(routed.sum()))
    # Telemetry is not state: checkpoints are what they were.
    assert "balancer.dropped_per_expert" not in layer.state_dict()


def test_eval_forwards_report_their_drops_but_do_not_count():
    layer = make_layer().eval()
    layer(torch.randn(40, H))
    assert layer.dropped_per_expert.sum() > 0
    assert not layer.balancer.dropped_per_expert.any()


def test_telemetry_gives_the_drop_rate_per_layer_and_over_the_model():
    counts = {"a": torch.tensor([10, 30]), "b": torch.tensor([20, 20]), "c": torch.tensor([5, 5])}
    dropped = {"a": torch.tensor([0, 6]), "b": torch.tensor([2, 0])}
    telemetry = balance.balance_telemetry(counts, None, dropped)
    assert telemetry["drop_rate/a"] == pytest.approx(6 / 40)
    assert telemetry["drop_rate/b"] == pytest.approx(2 / 40)
    assert "drop_rate/c" not in telemetry  # a layer without capacity
    assert telemetry["drop_rate"] == pytest.approx(8 / 80)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(drop_policy="lowest"), "drop_policy must be one of"),
        (dict(balancing="expert_choice"), "drop_policy is token-choice capacity"),
        (dict(drop_policy=None, pad_to_capacity=True), "pad_to_capacity pads to the capacity"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
    ],
)
def test_bad_capacity_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layer(**kwargs)


def _capacity_ep_step(rank, world_size, pad_to_capacity):
    group = torch.distributed.group.WORLD
    x = torch.randn(30 + 10 * rank, H, generator=torch.Generator().manual_seed(rank))
    local = make_layer(pad_to_capacity=pad_to_capacity)
    sharded = make_layer(pad_to_capacity=pad_to_capacity, ep_group=group)
    shard = slice(rank * E // world_size, (rank + 1) * E // world_size)
    with torch.no_grad():
        sharded.experts.gate_up_proj.copy_(local.experts.gate_up_proj[shard])
        sharded.experts.down_proj.copy_(local.experts.down_proj[shard])
    return {
        "local": local(x).detach(),
        "sharded": sharded(x).detach(),
        "local_dropped": local.dropped_per_expert,
        "sharded_dropped": sharded.dropped_per_expert,
    }


@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_expert_parallel_ranks_drop_among_their_own_tokens(tmp_path, pad_to_capacity):
    ranks = run_on_ranks(_capacity_ep_step, 2, tmp_path, pad_to_capacity)
    for result in ranks:
        assert result["local_dropped"].sum() > 0
        assert torch.equal(result["sharded_dropped"], result["local_dropped"])
        torch.testing.assert_close(result["sharded"], result["local"], rtol=1e-5, atol=1e-6)


def test_update_balance_sums_the_dropped_pairs_with_the_counts():
    model = torch.nn.Sequential(make_layer(seed=0), make_layer(seed=1, drop_policy=None))
    x = torch.randn(40, H)
    for layer in model:
        layer(x)
    dropped = model[0].dropped_per_expert.clone()
    counts = update_balance(model)
    assert [int(c.sum()) for c in counts] == [40 * K, 40 * K]
    assert torch.equal(model[0].balancer.step_dropped_per_expert, dropped)
    assert not model[1].balancer.step_dropped_per_expert.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("pad_to_capacity", [False, True])
def test_capacity_layer_on_a_gpu_never_synchronises(pad_to_capacity):
    layer = make_layer(pad_to_capacity=pad_to_capacity).cuda()
    x = torch.randn(64, H, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # warm-up: first launches, allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.dropped_per_expert.sum() > 0
