"""MoELayer against a dense pure-PyTorch reference, and the balancing strategies' contracts."""

import math

import pytest
import torch
import torch.nn.functional as F
from ranks import run_on_ranks
from torch.utils.checkpoint import checkpoint

import moe_kernels as mk
from conftest import near_ties, on_backends
from moe_kernels import balance, reference
from moe_kernels.layer import BALANCING, MoELayer, total_aux_loss, update_balance

TOKEN_CHOICE = [b for b in BALANCING if b != "expert_choice"]
# The ops of the layer's forward and backward.
LAYER_OPS = (
    "biased_topk",
    "biased_topk_backward",
    "permute",
    "permute_with_map",
    "unpermute",
    "unpermute_weights_grad",
    "grouped_gemm",
    "grouped_gemm_swiglu",
    "grouped_gemm_wgrad",
    "swiglu_backward",
)
H, F_, E, K = 16, 8, 8, 2


def make_layer(balancing="loss_free", seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(hidden_size=H, ffn_hidden_size=F_, num_experts=E, topk=K)
    options.update(kwargs)
    return MoELayer(balancing=balancing, **options)


def expert_outputs(layer, x):
    """[E, T, H]: every expert applied to every token, in fp64."""
    gate_up, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
    gate, up = torch.einsum("th,efh->etf", x, gate_up).chunk(2, dim=-1)
    return torch.einsum("etf,ehf->eth", F.silu(gate) * up, down)


def shared_output(layer, x):
    if layer.shared_experts is None:
        return 0.0
    gate, up = F.linear(x, layer.shared_experts.gate_up_proj.double()).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, layer.shared_experts.down_proj.double())


def reference_moe(layer, hidden):
    """The layer's computation without any of the package's ops: routing by the reference of
    ``biased_topk``, then a dense sum over experts of weight * expert(token), in fp64 (from the
    layer's fp32 logits, so the choices are the layer's)."""
    router = layer.router
    x = hidden.reshape(-1, H)
    logits = F.linear(x.float(), router.weight).double()
    weights, ids, _ = reference.biased_topk(
        logits,
        layer.balancer.bias,
        layer.topk,
        router.score_fn,
        router.n_groups,
        router.topk_groups,
        router.normalize,
        router.route_scale,
        router.group_score,
    )
    x = x.double()
    per_expert = torch.stack([(weights * (ids == e)).sum(1) for e in range(layer.num_experts)])
    out = (per_expert.unsqueeze(-1) * expert_outputs(layer, x)).sum(0) + shared_output(layer, x)
    return out.view(hidden.shape)


def set_bias(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    layer.balancer.bias.copy_(torch.randn(layer.num_experts, generator=g) * 0.2)


def parameters_and_input_grads(out, layer, x, grad):
    return torch.autograd.grad(out, [x, *layer.parameters()], grad)


@pytest.mark.parametrize("balancing", TOKEN_CHOICE)
@pytest.mark.parametrize(
    "routing",
    [
        dict(score_fn="sigmoid", route_scale=2.5, num_shared_experts=1),
        dict(score_fn="softmax", normalize=False),
        dict(score_fn="sigmoid", n_groups=4, topk_groups=2, num_shared_experts=2),
        dict(score_fn="sqrtsoftplus", n_groups=2, topk_groups=1),
    ],
    ids=["sigmoid-shared", "softmax", "groups", "sqrtsoftplus-groups"],
)
def test_forward_and_backward_match_the_reference(balancing, routing):
    layer = make_layer(balancing, **routing)
    if balancing == "loss_free":
        set_bias(layer)
    x = torch.randn(3, 7, H, requires_grad=True)
    out = layer(x)
    want = reference_moe(layer, x)
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got_grads = parameters_and_input_grads(out, layer, x, grad)
    want_grads = parameters_and_input_grads(want, layer, x, grad.double())
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@on_backends(*LAYER_OPS)
def test_layer_runs_on_every_backend(device):
    layer = make_layer(num_shared_experts=1).to(device)
    set_bias(layer)
    # The same tokens on every backend (built on the CPU), routed alike by the layer (fp32; on
    # a GPU with CUDA's expf) and the reference (fp64): no choice value near a tie.
    x = torch.randn(20, H).to(device).requires_grad_()
    router = layer.router
    routing = (router.score_fn, router.n_groups, router.topk_groups, router.group_score)
    assert not near_ties(router.logits(x.detach()), layer.balancer.bias, K, *routing).any()
    out = layer(x)
    want = reference_moe(layer, x)
    # fp32 against fp64 with the tolerances of the CPU test above: on a GPU the fp32 grouped
    # GEMMs run on the SIMT kernel (fp32 FMAs, no TF32) and torch's fp32 matmuls in IEEE fp32
    # (the device fixture), so only rounding and summation order differ from the CPU.
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(20, H).to(device)
    got_grads = parameters_and_input_grads(out, layer, x, grad)
    want_grads = parameters_and_input_grads(want, layer, x, grad.double())
    assert all(g.device.type == device for g in got_grads)
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_layer_keeps_router_and_bias_in_fp32():
    layer = make_layer(num_shared_experts=1)
    set_bias(layer)
    layer.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32
    assert layer.balancer.bias.dtype == torch.float32
    assert layer.experts.gate_up_proj.dtype == torch.bfloat16
    assert layer.balancer.tokens_per_expert.dtype == torch.int64
    x = torch.randn(40, H).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference_moe(layer, x).to(out.dtype), rtol=2e-2, atol=2e-2)


def test_autocast_runs_the_experts_in_bf16_from_fp32_weights():
    layer = make_layer(num_shared_experts=1)
    x = torch.randn(40, H, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference_moe(layer, x).to(out.dtype), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.experts.gate_up_proj.grad.dtype == torch.float32
    assert layer.router.weight.grad.dtype == torch.float32


def test_bias_never_enters_the_combine_weights():
    """Weights are the unbiased scores of the chosen experts, written out by hand; the bias
    changes only which experts are chosen (here, for some tokens), so shifting every expert's
    bias by the same amount changes nothing at all, and no gradient reaches the bias."""
    layer = make_layer("loss_free")
    set_bias(layer, seed=4)
    x = torch.randn(64, H, requires_grad=True)
    out = layer(x)
    logits = F.linear(x.detach(), layer.router.weight.detach()).double()
    scores = logits.sigmoid()
    ids = (scores + layer.balancer.bias.double()).topk(K, dim=1).indices
    assert not torch.equal(ids, scores.topk(K, dim=1).indices), "the bias must change a choice"
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(1, keepdim=True)
    experts = expert_outputs(layer, x.detach().double())
    want = sum(weights[:, j, None] * experts[ids[:, j], torch.arange(64)] for j in range(K))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)

    layer.balancer.bias += 0.75
    assert torch.equal(layer(x), out)
    out.sum().backward()
    assert not layer.balancer.bias.requires_grad and layer.balancer.bias.grad is None
    # The router's gradient is that of the unbiased weights.
    (router_grad,) = torch.autograd.grad(
        reference_moe(layer, x.detach()).sum(), layer.router.weight
    )
    torch.testing.assert_close(layer.router.weight.grad, router_grad, rtol=1e-4, atol=1e-6)


def skewed_batch(layer, num_tokens, generator):
    """Tokens that all lean toward the first quarter of the experts (a router skewed on
    purpose): the router's weight rows of those experts align with a direction every token
    shares."""
    direction = torch.ones(H) / math.sqrt(H)
    return torch.randn(num_tokens, H, generator=generator) + 2.0 * direction


@torch.no_grad()
def maxvio_over_steps(balancing, steps=120):
    layer = make_layer(balancing, rate=0.01, num_experts=16, topk=2)
    layer.router.weight[:4] += torch.ones(H) / math.sqrt(H)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(steps):
        layer(skewed_batch(layer, 256, g))
        history.append(float(balance.max_violation(layer.update_balance())))
    return history


def test_loss_free_drives_maxvio_down_on_a_skewed_router_while_none_does_not():
    loss_free, none = maxvio_over_steps("loss_free"), maxvio_over_steps("none")
    start = sum(none[:10]) / 10
    assert start > 2.0, "the router must start skewed"
    assert sum(loss_free[-20:]) / 20 < 0.25 * start
    assert sum(none[-20:]) / 20 > 0.8 * start


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_counts_are_not_doubled_under_activation_checkpointing(use_reentrant):
    # Shared experts run after the counting: a recompute that stops early once it has every
    # tensor backward needs (torch's non-reentrant checkpoint does) still reaches it.
    layer = make_layer("loss_free", num_shared_experts=1)
    x = torch.randn(30, H, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=use_reentrant)
    once = layer.tokens_per_expert.clone()
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(layer.balancer.tokens_per_expert, once)
    assert int(once.sum()) == 30 * K


def test_eval_forwards_do_not_count():
    layer = make_layer("loss_free")
    layer.eval()
    layer(torch.randn(30, H))
    assert int(layer.balancer.tokens_per_expert.sum()) == 0
    assert int(layer.tokens_per_expert.sum()) == 30 * K  # but the forward's own counts are kept


def test_update_uses_the_counts_of_every_micro_batch():
    layer = make_layer("loss_free", rate=0.01)
    set_bias(layer)
    bias = layer.balancer.bias.clone()
    counts = torch.zeros(E, dtype=torch.int64)
    for seed in range(3):
        layer(torch.randn(20, H, generator=torch.Generator().manual_seed(seed))).sum().backward()
        counts += layer.tokens_per_expert
    assert torch.equal(layer.balancer.tokens_per_expert, counts)
    assert torch.equal(layer.update_balance(), counts)
    mk.update_bias(bias, counts, 0.01)
    assert torch.equal(layer.balancer.bias, bias)
    assert int(layer.balancer.tokens_per_expert.sum()) == 0
    assert int(layer.balancer.updates) == 1


def test_rate_schedule_and_freeze():
    layer = make_layer("loss_free", rate=lambda step: 0.1 * (step + 1), freeze_after=2)
    moves = []
    for _ in range(4):
        layer(torch.randn(20, H))
        before = layer.balancer.bias.clone()
        layer.update_balance()
        moves.append(float((layer.balancer.bias - before).abs().max()))
    assert moves == pytest.approx([0.1, 0.2, 0.0, 0.0])


def test_state_dict_round_trip_carries_bias_and_counts():
    layer = make_layer("loss_free")
    set_bias(layer)
    layer(torch.randn(20, H))
    state = layer.state_dict()
    assert state["balancer.bias"].dtype == torch.float32
    assert state["balancer.tokens_per_expert"].dtype == torch.int64
    assert {"balancer.updates", "balancer.step_tokens_per_expert"} <= state.keys()
    other = make_layer("loss_free", seed=5)
    other.load_state_dict(state)
    x = torch.randn(20, H)
    assert torch.equal(other(x), layer(x))
    assert torch.equal(other.balancer.tokens_per_expert, layer.balancer.tokens_per_expert)


@pytest.mark.parametrize("balancing", ["aux_loss", "seq_aux_loss", "global_aux_loss", "none"])
def test_padding_is_routed_but_never_counted(balancing):
    layer = make_layer(balancing)
    x = torch.randn(2, 6, H)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    out = layer(x, padding_mask=padding)
    assert int(layer.tokens_per_expert.sum()) == 10 * K
    assert int(layer.balancer.tokens_per_expert.sum()) == 10 * K
    # Token choice is per token: the kept tokens' outputs do not depend on the padding.
    fresh = make_layer(balancing)
    assert torch.allclose(out[0], fresh(x[0]), atol=1e-6)
    assert torch.allclose(out[1, :4], fresh(x[1, :4]), atol=1e-6)
    if balancing == "none":
        assert layer.aux_loss is None
        return
    if balancing == "seq_aux_loss":
        first, second = make_layer(balancing), make_layer(balancing)
        first(x[:1])
        second(x[1:, :4])
        want = (first.aux_loss + second.aux_loss) / 2
    else:
        whole = make_layer(balancing)
        whole(x.reshape(12, H)[torch.cat([torch.arange(6), torch.arange(6, 10)])])
        want = whole.aux_loss
    torch.testing.assert_close(layer.aux_loss, want)


def test_global_aux_loss_equals_the_micro_batch_loss_with_one_micro_batch_and_one_rank():
    x = torch.randn(24, H)
    micro, global_ = make_layer("aux_loss", aux_coeff=0.01), make_layer("global_aux_loss")
    global_.aux_coeff = 0.01
    micro(x)
    global_(x)
    torch.testing.assert_close(global_.aux_loss, micro.aux_loss)
    assert float(micro.aux_loss.detach()) > 0


def test_seq_aux_loss_groups_span_one_sequence_to_the_micro_batch():
    """aux_group_size g balances groups of g consecutive sequences: g = 1 is the per-sequence
    loss, g = B the micro-batch loss, and g in between the mean of the groups' own losses."""
    x = torch.randn(4, 6, H)

    def loss(balancing, inputs, **kwargs):
        layer = make_layer(balancing, aux_coeff=0.01, **kwargs)
        layer(inputs)
        return layer.aux_loss

    torch.testing.assert_close(loss("seq_aux_loss", x, aux_group_size=4), loss("aux_loss", x))
    pairs = [loss("aux_loss", x[first : first + 2]) for first in (0, 2)]
    torch.testing.assert_close(loss("seq_aux_loss", x, aux_group_size=2), sum(pairs) / 2)
    per_sequence = loss("seq_aux_loss", x)
    assert not torch.allclose(per_sequence, loss("aux_loss", x))
    with pytest.raises(ValueError, match="aux_group_size=3"):
        loss("seq_aux_loss", x, aux_group_size=3)


def hand_global_loss(layer, x, counts, num_tokens):
    logits = F.linear(x, layer.router.weight)
    scores = balance.routing_probabilities(logits, layer.router.score_fn)
    return layer.aux_coeff * E / (K * num_tokens * x.shape[0]) * (counts * scores.sum(0)).sum()


def test_global_aux_loss_running_and_previous_counts():
    running, previous = make_layer("global_aux_loss"), make_layer("global_aux_loss")
    previous.global_counts = "previous"
    batches = [torch.randn(10, H, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    total = torch.zeros(E, dtype=torch.int64)
    for i, x in enumerate(batches[:2]):
        running(x)
        previous(x)
        total += running.tokens_per_expert
        torch.testing.assert_close(
            running.aux_loss, hand_global_loss(running, x, total, 10 * (i + 1))
        )
        assert float(previous.aux_loss.detach()) == 0.0  # the first step has no previous counts
    running.update_balance()
    previous.update_balance()
    previous(batches[2])
    torch.testing.assert_close(previous.aux_loss, hand_global_loss(previous, batches[2], total, 20))
    running(batches[2])
    want = hand_global_loss(running, batches[2], running.tokens_per_expert, 10)
    torch.testing.assert_close(running.aux_loss, want)


def test_global_aux_loss_is_the_same_under_checkpointing():
    """A recompute sees the counts its forward saw and adds none: the next micro-batch's loss,
    the running counts and the gradients are those of a run without checkpointing."""
    runs = []
    for use_checkpoint in (False, True):
        layer = make_layer("global_aux_loss", aux_coeff=1.0, num_shared_experts=1)
        losses, counts = [], torch.zeros(E, dtype=torch.int64)
        for seed in range(3):
            x = torch.randn(12, H, generator=torch.Generator().manual_seed(seed))
            out = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
            losses.append(layer.aux_loss.detach())
            counts += layer.tokens_per_expert
            (out.sum() + layer.aux_loss).backward()
        assert torch.equal(layer.balancer.global_tokens_per_expert, counts)
        runs.append((torch.stack(losses), layer.router.weight.grad.clone()))
    torch.testing.assert_close(runs[1], runs[0])


def reference_expert_choice(layer, x):
    num_tokens = x.shape[0]
    capacity = math.ceil(num_tokens * K * layer.capacity_factor / E)
    scores = F.linear(x.float(), layer.router.weight).double().softmax(-1)
    experts = expert_outputs(layer, x.double())
    out = torch.zeros(num_tokens, H, dtype=torch.float64)
    for e in range(E):
        top = scores[:, e].topk(capacity)
        out[top.indices] += top.values[:, None] * experts[e, top.indices]
    return out


def test_expert_choice_matches_the_reference_and_is_balanced():
    layer = make_layer("expert_choice", score_fn="softmax", capacity_factor=1.5)
    x = torch.randn(24, H)
    out = layer(x)
    torch.testing.assert_close(
        out.double(), reference_expert_choice(layer, x), rtol=1e-5, atol=1e-6
    )
    assert layer.tokens_per_expert.tolist() == [math.ceil(24 * K * 1.5 / E)] * E
    assert float(balance.max_violation(layer.tokens_per_expert)) == 0.0


def test_expert_choice_leaks_later_tokens_into_earlier_outputs_and_token_choice_does_not():
    x = torch.randn(32, H)
    changed = x.clone()
    changed[16:] = torch.randn(16, H)
    ec = make_layer("expert_choice", score_fn="softmax")
    assert not torch.equal(ec(x)[:16], ec(changed)[:16])
    tc = make_layer("loss_free")
    assert torch.equal(tc(x)[:16], tc(changed)[:16])


def test_model_helpers_collect_aux_losses_and_update_every_layer():
    model = torch.nn.Sequential(make_layer("aux_loss"), make_layer("aux_loss", num_experts=4))
    assert total_aux_loss(model) is None
    x = torch.randn(10, H)
    model(x)
    torch.testing.assert_close(total_aux_loss(model), model[0].aux_loss + model[1].aux_loss)
    counts = update_balance(model)
    assert [c.shape[0] for c in counts] == [E, 4] and all(int(c.sum()) == 10 * K for c in counts)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(balancing="auxloss"), "balancing must be one of"),
        (dict(global_counts="later"), "global_counts"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(aux_group_size=0), "aux_group_size"),
        (dict(topk=9), "topk must be in"),
        (dict(rule="linear"), "rule"),
        (dict(rate=-1.0), "rate"),
        (dict(rate=float("nan")), "rate must be a finite number >= 0, got nan"),
        (dict(rate=float("inf")), "rate must be a finite number"),
        (dict(freeze_after=-1), "freeze_after"),
        (dict(aux_coeff=float("nan")), "aux_coeff"),
        (dict(aux_coeff=-1e-3), "aux_coeff"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(score_fn="relu"), "score_fn"),
        (dict(route_scale=float("nan")), "route_scale"),
        (dict(route_scale=0.0), "route_scale"),
        (dict(n_groups=3), "n_groups must be >= 1 and divide num_experts=8"),
        (dict(n_groups=0), "n_groups"),
        (dict(n_groups=2, topk_groups=3), "topk_groups must be in"),
        (dict(n_groups=4, topk_groups=1, topk=3), "too few experts"),
        (dict(group_score="top3"), "group_score"),
        (dict(topk=0), "topk"),
        (dict(topk=2.5), "topk must be an integer"),
        (dict(num_experts=0), "num_experts"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(ffn_hidden_size=0), "ffn_hidden_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layer(**kwargs)


def test_bad_arguments_are_refused_on_the_meta_device_too():
    # What moe-train checks its options with: the routing rules are the op's, not its fake's.
    with torch.device("meta"), pytest.raises(ValueError, match="n_groups"):
        make_layer(n_groups=3)


def test_a_rate_schedule_that_gives_nan_stops_before_the_bias_moves():
    layer = make_layer(rate=lambda update: 0.01 if update == 0 else float("nan"))
    layer(torch.randn(16, H))
    layer.balancer.update()
    moved = layer.balancer.bias.clone()
    assert moved.abs().sum() > 0
    layer(torch.randn(16, H))
    with pytest.raises(ValueError, match=r"rate \(the schedule's value for update 1\)"):
        layer.balancer.update()
    assert torch.equal(layer.balancer.bias, moved)


def test_bad_inputs_name_the_argument():
    layer = make_layer()
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(4, 5))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(torch.randn(2, 3, H), padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def _two_rank_step(rank, world_size):
    group = torch.distributed.group.WORLD
    x = torch.randn(20 + 10 * rank, H, generator=torch.Generator().manual_seed(rank))
    loss_free = make_layer("loss_free", rate=0.01, process_group=group)
    loss_free(x)
    global_aux = make_layer("global_aux_loss", process_group=group)
    global_aux(x)
    return {
        "local": loss_free.tokens_per_expert,
        "aux_loss": global_aux.aux_loss.detach(),
        "counts": loss_free.update_balance(),
        "bias": loss_free.balancer.bias,
    }


def test_counts_are_summed_over_the_process_group(tmp_path):
    """Two Gloo ranks with different batches end the step with the same bias, moved by the
    sum of their counts; the global aux loss of each rank balances the two ranks' counts."""
    ranks = run_on_ranks(_two_rank_step, 2, tmp_path)
    total = ranks[0]["local"] + ranks[1]["local"]
    bias = torch.zeros(E)
    mk.update_bias(bias, total, 0.01)
    for rank, result in enumerate(ranks):
        assert torch.equal(result["counts"], total)
        assert torch.equal(result["bias"], bias)
        layer = make_layer("global_aux_loss")
        x = torch.randn(20 + 10 * rank, H, generator=torch.Generator().manual_seed(rank))
        want = hand_global_loss(layer, x, total, 50)
        torch.testing.assert_close(result["aux_loss"], want.detach())


def _three_layer_step(rank, world_size):
    group = torch.distributed.group.WORLD
    model = torch.nn.Sequential(
        *(make_layer("loss_free", seed=s, rate=0.01, process_group=group) for s in range(3))
    )
    x = torch.randn(20 + 10 * rank, H, generator=torch.Generator().manual_seed(rank))
    for layer in model:
        layer(x)
    local = [layer.tokens_per_expert.clone() for layer in model]
    all_reduce, calls = torch.distributed.all_reduce, []

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counted
    try:
        counts = update_balance(model)
    finally:
        torch.distributed.all_reduce = all_reduce
    return {"local": local, "calls": calls, "counts": counts,
            "bias": [layer.balancer.bias for layer in model]}  # fmt: skip


def test_update_balance_sums_every_layer_in_one_collective(tmp_path):
    ranks = run_on_ranks(_three_layer_step, 2, tmp_path)
    for result in ranks:
        # One all-reduce of the three layers' counts and dropped pairs.
        assert result["calls"] == [3 * 2 * E]
        for layer in range(3):
            total = ranks[0]["local"][layer] + ranks[1]["local"][layer]
            bias = torch.zeros(E)
            mk.update_bias(bias, total, 0.01)
            assert torch.equal(result["counts"][layer], total)
            assert torch.equal(result["bias"][layer], bias)


def test_a_centred_layer_bias_is_the_plain_one_less_its_mean():
    plain, centred = make_layer(rate=0.01), make_layer(rate=0.01, center_bias=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(40, H, generator=g)
        assert torch.equal(plain(x), centred(x))  # the same choices, the same output
        plain.update_balance(), centred.update_balance()
    bias, centred_bias = plain.balancer.bias, centred.balancer.bias
    assert abs(float(bias.mean())) > 1e-3 and abs(float(centred_bias.mean())) < 1e-7
    torch.testing.assert_close(centred_bias, bias - bias.mean(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("balancing", BALANCING)
def test_the_router_z_loss_composes_with_every_strategy(balancing):
    layer, plain = make_layer(balancing, z_loss_coeff=1e-2), make_layer(balancing)
    x = torch.randn(2, 12, H, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 9:] = True
    out = layer(x, padding_mask=padding)
    torch.testing.assert_close(out, plain(x, padding_mask=padding))  # the routing is the same
    logits = layer.router.logits(x.reshape(-1, H))
    keep = ~padding.reshape(-1)
    lse = logits.logsumexp(-1)
    want = 1e-2 * (lse.square() * keep).sum() / keep.sum()
    torch.testing.assert_close(layer.z_loss, want)
    if plain.aux_loss is None:
        assert layer.aux_loss is None and torch.equal(total_aux_loss(layer), layer.z_loss)
    else:
        torch.testing.assert_close(layer.aux_loss, plain.aux_loss)
        torch.testing.assert_close(total_aux_loss(layer), plain.aux_loss + layer.z_loss)
    assert plain.z_loss is None
    layer.router.weight.grad = None
    layer.z_loss.backward()  # the z-loss reaches the router's weight
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("aux", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_the_loss_free_bias_composes_with_an_aux_loss(aux):
    composed = make_layer(f"loss_free+{aux}", rate=0.05, aux_coeff=1e-4)
    bias_only = make_layer("loss_free", rate=0.05)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):  # steps, so that the bias has moved when the loss is compared
        x = torch.randn(2, 10, H, generator=g)
        out = composed(x)
        # The bias chooses: the output of the loss-free layer holding the same bias.
        bias_only.balancer.bias.copy_(composed.balancer.bias)
        torch.testing.assert_close(out, bias_only(x))
        # The loss is its strategy's, of the unbiased scores and the counts of that choice.
        logits = composed.router.logits(x.reshape(-1, H))
        _, ids, counts = composed.router(logits, composed.balancer.bias)
        scores = balance.routing_probabilities(logits, "sigmoid")
        if aux == "seq_aux_loss":
            per_sequence = balance.counts_per_sequence(ids.view(2, 10, K), E)
            want = balance.seq_aux_loss(scores.view(2, 10, E), per_sequence, K, 1e-4)
        else:  # one micro-batch a step: the global (running) counts are this batch's
            want = balance.aux_loss(scores, counts, 20, K, 1e-4)
        torch.testing.assert_close(composed.aux_loss, want)
        composed.update_balance(), bias_only.update_balance()
    assert composed.balancer.bias.abs().sum() > 0 and composed.aux_loss.requires_grad


def test_a_balancing_of_two_biases_or_two_losses_is_refused():
    for balancing in ("loss_free+loss_free", "aux_loss+seq_aux_loss", "loss_free+none"):
        with pytest.raises(ValueError, match="balancing must be one of"):
            make_layer(balancing)
