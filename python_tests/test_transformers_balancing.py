"""Loss-free balancing of patched transformers models: the bias update, its all-reduce over
data-parallel ranks, and the ``Trainer`` callback."""

from __future__ import annotations

import importlib
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from hf_families import (
    INSTALLED,
    TEXT_VOCAB,
    forward_inputs,
    moe_blocks,
    routed_tokens,
    text_blocks,
    tiny_model,
)
from ranks import run_on_ranks
from transformers import Trainer, TrainingArguments

from moe_kernels.balance import balance_telemetry
from moe_kernels.integrations.transformers import (
    LossFreeBalancingCallback,
    moe_routers,
    patch,
    unpatch,
    update_balance,
)
from moe_kernels.integrations.transformers.routing import BIAS

# The families' battery runs the same Python and CPU code in either build variant: slow, which
# the CUDA build's CI step skips.
pytestmark = pytest.mark.slow


def routed_counts(model, ids):
    """The [E] counts each patched router records for one training forward of ``ids``."""
    for _, router in moe_routers(model):
        router.tokens_per_expert.zero_()
    model.train()
    model(ids, **forward_inputs(model, ids))
    return {name: router.tokens_per_expert.clone() for name, router in moe_routers(model)}


def test_update_balance_moves_the_bias_by_the_sign_rule_over_the_whole_step():
    model = tiny_model("mixtral")
    patch(model, balancing="loss_free", rate=0.01)
    g = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(3, TEXT_VOCAB, (2, 10), generator=g) for _ in range(3)]
    expected = None
    for ids in micro_batches:
        counts = routed_counts(model, ids)
        expected = counts if expected is None else {k: expected[k] + counts[k] for k in counts}
    for _, router in moe_routers(model):
        router.tokens_per_expert.zero_()
    for ids in micro_batches:  # the step counts all of its micro-batches
        model(ids)
    step_counts = update_balance(model)
    assert step_counts.keys() == expected.keys() == {name for name, _ in moe_blocks(model)}
    for name, router in moe_routers(model):
        counts = step_counts[name]
        assert torch.equal(counts, expected[name])
        sign = torch.sign(counts.double().mean() - counts.double()).float()
        torch.testing.assert_close(router.balancing_bias(), 0.01 * sign, rtol=0, atol=1e-9)
        assert not router.tokens_per_expert.any()


def test_a_centred_bias_moves_by_the_sign_less_its_mean():
    model = tiny_model("mixtral")
    patch(model, balancing="loss_free", rate=0.01, center_bias=True)
    counts = routed_counts(model, torch.randint(3, TEXT_VOCAB, (2, 10)))
    step_counts = update_balance(model)
    for name, router in moe_routers(model):
        assert torch.equal(step_counts[name], counts[name])
        sign = torch.sign(counts[name].double().mean() - counts[name].double())
        want = (0.01 * (sign - sign.mean())).float()
        torch.testing.assert_close(router.balancing_bias(), want, rtol=0, atol=1e-9)
        assert abs(float(router.balancing_bias().mean())) < 1e-8


@pytest.mark.parametrize("family", INSTALLED)
def test_the_bias_update_balance_moves_is_the_one_the_routers_choose_with(family):
    """Wherever a family holds it (the router, its moe_statics, or the block that passes it to
    the router), the bias is fp32 through a bf16 cast, saved in the state_dict, and chooses."""
    model = tiny_model(family)
    patch(model, balancing="loss_free")
    model.to(torch.bfloat16)
    saved = {tensor.data_ptr() for tensor in model.state_dict().values()}
    for _, router in moe_routers(model):
        bias = router.balancing_bias()
        assert bias.dtype == torch.float32 and bias.data_ptr() in saved
        bias.zero_()[3] = 100.0  # far above any score: every token takes expert 3
    ids = torch.randint(3, TEXT_VOCAB, (2, 10))
    counts = routed_counts(model, ids)
    for name, _ in text_blocks(model):
        assert int(counts[name][3]) == routed_tokens(model, name, ids)
    unpatch(model)  # the classes are the model's own again, blocks holding a bias included
    assert [type(m) for m in model.modules()] == [type(m) for m in tiny_model(family).modules()]


def test_without_balancing_update_balance_counts_but_keeps_the_models_bias():
    model = tiny_model("deepseek_v3")
    patch(model)
    biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith(BIAS)}
    ids = torch.randint(3, TEXT_VOCAB, (2, 10))
    counts = routed_counts(model, ids)
    assert update_balance(model).keys() == counts.keys()
    for name, bias in biases.items():
        assert torch.equal(model.get_buffer(name), bias)


@pytest.mark.parametrize(
    "family,module",
    [("mixtral", "mixtral"), ("qwen3_moe", "qwen3_moe"), ("olmoe", "olmoe")],
)
def test_the_loss_free_bias_composes_with_the_familys_own_aux_loss(family, module):
    """The bias chooses the experts while the model's own load-balancing loss
    (``output_router_logits``, ``router_aux_loss_coef``) is computed as the family defines it,
    from the unbiased router logits, and trains the router: the DeepSeek-V3 composition."""
    load_balancing_loss_func = importlib.import_module(
        f"transformers.models.{module}.modeling_{module}"
    ).load_balancing_loss_func
    model = tiny_model(family, router_aux_loss_coef=0.02)
    patch(model, balancing="loss_free")
    g = torch.Generator().manual_seed(5)
    for _, router in moe_routers(model):
        router.balancing_bias().copy_(torch.randn(8, generator=g))  # large: it moves choices
    ids = torch.randint(3, TEXT_VOCAB, (2, 12), generator=g)
    model.train()
    plain = model(ids, labels=ids)
    for _, router in moe_routers(model):
        router.tokens_per_expert.zero_()
    out = model(ids, labels=ids, output_router_logits=True)
    topk = model.config.get_text_config().num_experts_per_tok
    want = load_balancing_loss_func(out.router_logits, 8, topk)
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(out.loss, plain.loss + 0.02 * want)
    # The choice is the bias's: a layer's counts are not the unbiased top-k of its logits.
    unbiased = [
        torch.bincount(logits.topk(topk, dim=-1).indices.flatten(), minlength=8)
        for logits in out.router_logits
    ]
    routed = [router.tokens_per_expert for _, router in moe_routers(model)]
    assert any(not torch.equal(r, u) for r, u in zip(routed, unbiased, strict=True))
    (gate_grad,) = torch.autograd.grad(0.02 * out.aux_loss, [moe_blocks(model)[0][1].gate.weight])
    assert gate_grad.abs().sum() > 0


def skewed_model(balancing):
    """A tiny Qwen3-MoE whose tokens share one direction that every router's expert 0 favours:
    unbalanced from the first step."""
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1).add_(0.5)
        for _, block in moe_blocks(model):
            block.gate.weight[0] += 0.15
    patch(model, balancing=balancing, rate=0.01)
    return model


def train(model, tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(3, 96, (256, 16), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=80,
        learning_rate=1e-3,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[LossFreeBalancingCallback()]
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "maxvio_batch" in entry]


def padded_batch(sequences, side):
    """``sequences`` padded (id 0) to one length on ``side``, their attention mask, and the
    position ids of their real tokens (as ``generate`` gives a left-padded batch)."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        start = 0 if side == "right" else length - len(sequence)
        ids[row, start : start + len(sequence)] = sequence
        mask[row, start : start + len(sequence)] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def step_counts_of(model, batches):
    """The counts of one training step over ``batches`` of forward arguments."""
    for _, router in moe_routers(model):
        router.tokens_per_expert.zero_()
    model.train()
    for args, kwargs in batches:
        model(*args, **kwargs)
    return {name: router.tokens_per_expert.clone() for name, router in moe_routers(model)}


@pytest.mark.parametrize("family", INSTALLED)
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_moves_the_bias_as_its_unpadded_sequences_would(family, side):
    # The real tokens' hidden states differ from their unpadded ones by rounding only (fp64
    # would not do: a fully masked left-padding row overflows to NaN there), and the tiny
    # models' router logits are spread far wider than that.
    model = tiny_model(family)
    patch(model, balancing="loss_free", rate=0.01)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, TEXT_VOCAB, (n,), generator=g) for n in (10, 3, 7)]
    unpadded = step_counts_of(
        model, [((s[None],), forward_inputs(model, s[None])) for s in sequences]
    )
    ids, mask, positions = padded_batch(sequences, side)
    inputs = dict(forward_inputs(model, ids, mask), position_ids=positions)
    # The mask passed by keyword and by position (the forward's second parameter, or a later one
    # in multimodal models, whose others are then None).
    with warnings.catch_warnings():
        # The mask maps onto every block's tokens (a block-diffusion decoder's holds none).
        warnings.simplefilter("error")
        padded = step_counts_of(model, [((ids,), dict(inputs, attention_mask=mask))])
    at = list(inspect.signature(model.forward).parameters).index("attention_mask")
    by_position = (ids, *[None] * (at - 1), mask)
    positional = step_counts_of(model, [(by_position, inputs)])
    before = {name: router.balancing_bias().clone() for name, router in moe_routers(model)}
    step = update_balance(model)
    top_k = model.config.get_text_config().num_experts_per_tok
    reached = {name for name, _ in text_blocks(model)}
    for name, router in moe_routers(model):
        if name not in reached:
            continue
        # A block-diffusion decoder's canvas is never padded: the same for each sequence.
        if routed_tokens(model, name, ids) == ids.numel():
            real = sum(map(len, sequences))
            assert int(unpadded[name].sum()) == top_k * real < top_k * ids.numel()
        assert torch.equal(padded[name], unpadded[name])
        assert torch.equal(positional[name], unpadded[name])
        sign = torch.sign(step[name].double().mean() - step[name].double()).float()
        moved = router.balancing_bias() - before[name]
        torch.testing.assert_close(moved, 0.01 * sign, rtol=0, atol=1e-8)
    # Without a mask every position counts; unpatch removes the hook.
    without = step_counts_of(model, [((ids,), inputs)])
    assert all(
        int(without[name].sum()) == top_k * routed_tokens(model, name, ids) for name in reached
    )
    unpatch(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_mask_that_does_not_map_onto_the_tokens_is_warned_about_and_padding_counts():
    model = tiny_model("qwen3_moe")
    patch(model, balancing="loss_free")
    ids = torch.arange(3, 15).view(2, 6)
    # A 4-D mask (transformers takes it as given): causal, in the model's dtype.
    causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1).expand(2, 1, 6, 6)
    with pytest.warns(UserWarning, match=r"shape \(2, 1, 6, 6\) does not map onto the 12"):
        counts = step_counts_of(model, [((ids,), {"attention_mask": causal})])
    assert all(int(c.sum()) == 2 * ids.numel() for c in counts.values())


def test_trainer_with_loss_free_balancing_lowers_maxvio_of_a_skewed_router(tmp_path):
    balanced = train(skewed_model("loss_free"), tmp_path / "loss_free")
    unbalanced = train(skewed_model(None), tmp_path / "none")
    assert [entry["step"] for entry in balanced] == list(range(10, 81, 10))
    layers = [f"maxvio_batch/{name}" for name, _ in moe_blocks(tiny_model("qwen3_moe"))]
    for entry in balanced:
        per_layer = [entry[key] for key in layers]
        assert entry["maxvio_batch"] == sum(per_layer) / len(per_layer)
    # Skewed from the start; loss-free balancing halves MaxVio while the unbalanced run stays.
    assert balanced[0]["maxvio_batch"] > 1.2 and unbalanced[0]["maxvio_batch"] > 1.2
    assert balanced[-1]["maxvio_batch"] < 0.5 * balanced[0]["maxvio_batch"]
    assert unbalanced[-1]["maxvio_batch"] > 0.8 * unbalanced[0]["maxvio_batch"]


def test_the_callback_logs_the_balance_telemetry_of_its_window():
    model = tiny_model("mixtral")
    patch(model, balancing="loss_free", rate=0.01)
    callback = LossFreeBalancingCallback()
    state = SimpleNamespace(log_history=[], global_step=2)
    window = {}
    for seed in range(2):  # two steps between logs
        ids = torch.randint(3, TEXT_VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
        for name, counts in routed_counts(model, ids).items():
            window[name] = window.get(name, 0) + counts
        callback.on_step_end(None, state, None, model=model)
    logs = {}
    callback.on_log(None, state, None, logs=logs)
    biases = {name: router.balancing_bias() for name, router in moe_routers(model)}
    want = balance_telemetry(window, biases)
    assert {k: v for k, v in logs.items() if k.startswith("balance/")} == {
        f"balance/{k}": v for k, v in want.items()
    }
    assert "balance/dead_experts" in logs and "balance/bias_max" in logs


def _update_on_rank(rank, world_size):
    model = tiny_model("olmoe")
    patch(model, balancing="loss_free", rate=0.01)
    ids = torch.randint(3, TEXT_VOCAB, (2, 10), generator=torch.Generator().manual_seed(rank))
    local = routed_counts(model, ids)
    step_counts = update_balance(model)
    biases = {name: router.balancing_bias().clone() for name, router in moe_routers(model)}
    return local, step_counts, biases


@pytest.mark.slow
def test_update_balance_sums_counts_over_data_parallel_ranks(tmp_path):
    results = run_on_ranks(_update_on_rank, 2, tmp_path)
    (local0, step0, bias0), (local1, step1, bias1) = results
    for name in local0:
        assert not torch.equal(local0[name], local1[name])  # different data on each rank
        total = local0[name] + local1[name]
        assert torch.equal(step0[name], total) and torch.equal(step1[name], total)
        assert torch.equal(bias0[name], bias1[name])
        sign = torch.sign(total.double().mean() - total.double()).float()
        torch.testing.assert_close(bias0[name], 0.01 * sign, rtol=0, atol=1e-9)
