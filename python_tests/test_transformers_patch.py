"""``moe_kernels.integrations.transformers.patch``: real transformers MoE blocks, before and after,
in every supported family (tiny random configs, no download)."""

from __future__ import annotations

import copy
import warnings
from operator import attrgetter

import pytest
import torch
import transformers
from hf_families import (
    BLOCK_DIFFUSION,
    CAUSAL_LMS,
    COMMON,
    DBRX_FFN,
    DEEPSEEK_MLA,
    INSTALLED,
    TEXT_VOCAB,
    block_inputs,
    canvas,
    forward_inputs,
    moe_blocks,
    text_blocks,
    tiny_model,
)

from conftest import backends_for, near_ties
from moe_kernels.integrations.transformers import (
    families,
    patch,
    supported_routers,
    unpatch,
)
from moe_kernels.integrations.transformers.blocks import BLOCKS
from moe_kernels.integrations.transformers.experts import FusedExperts
from moe_kernels.integrations.transformers.router_source import family_of
from moe_kernels.integrations.transformers.routing import BIAS, FusedRouter, score_function

LAYER_OPS = (
    "biased_topk",
    "permute",
    "grouped_gemm_swiglu",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "swiglu_backward",
    "unpermute",
)
# Patched against unpatched, both in fp32 on one device: only rounding and summation order
# differ (on a GPU: the SIMT grouped GEMM's fp32 FMAs against cuBLAS in IEEE fp32, never TF32,
# which the device fixture keeps off; CUDA's expf against torch's in the router), a few ulps.
FP32 = dict(rtol=1e-5, atol=1e-6)
# The whole-model tests on the CPU and on a GPU (the emulator would take minutes to generate).
CPU_AND_CUDA = pytest.mark.parametrize(
    "device", ["cpu", backends_for(*LAYER_OPS)[-1]], indirect=True
)
# The block tests: the CPU, the emulator's adversarial schedule (as the ASan run; the kernels'
# own suites run both schedules, the families' battery only drives the kernels) and a GPU.
BLOCK_BACKENDS = pytest.mark.parametrize(
    "device",
    [b for b in backends_for(*LAYER_OPS) if getattr(b, "values", (b,))[0] != "emu-forward"],
    indirect=True,
)

# The families' battery runs the same Python and CPU code in either build variant: slow, which
# the CUDA build's CI step skips.
pytestmark = pytest.mark.slow


def patched_copy(model, **kwargs):
    fused = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(fused, **kwargs) == len(moe_blocks(model))
    return fused


def router_of(block):
    return next(child for child in block.children() if type(child) in supported_routers())


def router_of_fused(block):
    return next(child for child in block.children() if isinstance(child, FusedRouter))


def routing_of(router):
    if isinstance(router, FusedRouter):
        return router.moe_routing
    return supported_routers()[type(router)]


def decisions(block, router, x):
    """(logits, [T, k] weights, [T, k] ids) of a block's router, unpatched or patched, called
    as the block calls it (with the block's bias, where the block holds it)."""
    routing = routing_of(router)
    bias = () if routing.bias_argument is None else (getattr(block, routing.bias_argument, None),)
    if family_of(type(block)) == "afmoe":  # its block passes the router [B, S, H] tokens
        x = x[None]
    out = router(x, *bias)
    if isinstance(out, torch.Tensor):  # DBRX's logits, from which its block routes
        weights, ids = block.route_tokens_to_experts(out)
        return out, weights, ids
    if len(out) == 4:  # Inkling's: its shared experts' weights (gammas) fourth
        out = out[:3]
    if len(out) == 2:  # Llama 4's: [T, E] scores, zero where an expert is not chosen; logits
        scores, logits = out
        weights, ids = scores.topk(router.top_k, dim=-1)
        return logits, weights, ids
    if isinstance(router, FusedRouter) and router.moe_routing.scores_first:
        weights, logits, ids = out
        return logits, weights, ids
    return out


def hidden_states(model, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, model.config.get_text_config().hidden_size, generator=g)
    return x.to(device, dtype).requires_grad_()


def choice_bias(block, router):
    """The [E] bias ``router`` chooses with (its own, or its block's), or None."""
    routing = routing_of(router)
    holder, path = (
        (router, routing.bias) if routing.bias_argument is None else (block, routing.bias_argument)
    )
    try:
        bias = attrgetter(path)(holder)
    except AttributeError:
        return None
    return None if bias is None else bias.view(-1)


def assert_tie_free(block, x):
    """No token of ``x`` has choice values (nor, in the grouped families, kept and dropped group
    scores) close enough for torch's score function and ours (CUDA's expf on a GPU) to order
    them differently: the patched block routes every token as the unpatched one does."""
    router = router_of(block)
    routing = routing_of(router)
    logits, _, ids = decisions(block, router, x.detach().reshape(-1, x.shape[-1]))
    groups = (*routing.groups(router), routing.group_score, routing.choose_on)
    bias = choice_bias(block, router)
    score_fn = score_function(router, routing)
    assert not near_ties(logits, bias, ids.shape[1], score_fn, *groups).any()


def forward_backward(model, block, x, grad_out):
    x = x.detach().clone().requires_grad_()
    block.zero_grad()
    out = block(x, **block_inputs(model, block, x))
    if isinstance(out, tuple):  # gpt-oss's block also returns its routing weights, Llama 4's logits
        out = out[0]
    out.backward(grad_out.reshape(out.shape))  # Llama 4's block returns its tokens flattened
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("family", INSTALLED)
def test_patch_switches_router_and_experts_of_every_block(family):
    model = tiny_model(family)
    fused = patched_copy(model)
    for (name, block), (fused_name, fused_block) in zip(
        moe_blocks(model), moe_blocks(fused), strict=True
    ):
        assert name == fused_name
        if family in BLOCKS:  # the block's class switched too, to a subclass of its own
            assert isinstance(fused_block, BLOCKS[family].fused)
            assert type(fused_block).__bases__[1] is type(block)
        else:
            assert type(block) is type(fused_block)
        assert isinstance(fused_block.experts, FusedExperts)
        assert isinstance(fused_block.experts, type(block.experts))
        router, fused_router = router_of(block), router_of_fused(fused_block)
        assert isinstance(fused_router, type(router))
        # Every other child is the same class as before.
        for child_name, child in fused_block.named_children():
            if child is not fused_block.experts and child is not fused_router:
                assert type(child) is type(getattr(block, child_name))


@BLOCK_BACKENDS
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family", INSTALLED)
def test_block_outputs_and_gradients_equal_the_original(family, mode, device):
    assert_blocks_match_the_original(tiny_model(family).to(device), mode, device)


def assert_blocks_match_the_original(model, mode, device):
    """Each MoE block of ``model`` and its patched copy's: the same outputs, input gradients and
    parameter gradients (fp32 tolerance) in ``mode``, on tie-free tokens."""
    fused = patched_copy(model)
    x = hidden_states(model, device=device)
    grad_out = torch.randn_like(x)
    for (_, block), (_, fused_block) in zip(moe_blocks(model), moe_blocks(fused), strict=True):
        block.train(mode == "train")
        fused_block.train(mode == "train")
        # The tokens the router sees, which a decoder layer (Gemma 4's) computes first.
        routed = []
        hook = router_of(block).register_forward_pre_hook(
            lambda _, args, routed=routed: routed.append(args[0])
        )
        out, grad_x, grads = forward_backward(model, block, x, grad_out)
        hook.remove()
        assert_tie_free(block, routed[0].detach())
        fused_out, fused_grad_x, fused_grads = forward_backward(fused, fused_block, x, grad_out)
        assert_close_fp32(fused_out, out)
        assert_close_fp32(fused_grad_x, grad_x)
        assert fused_grads.keys() == grads.keys()
        for name in grads:
            assert_close_fp32(fused_grads[name], grads[name], msg=name)


def assert_close_fp32(actual, expected, msg=None):
    """FP32's tolerance, its atol scaled by the tensor's size: fp32 rounding grows with it, and
    norms after the experts magnify gradients (AXK-1's post-MLP norm divides by its small
    output's rms, some hundredfold; Gemma 4's layer norms the experts' input and output)."""
    if expected is None:  # a gradient text never reaches (a vision tower's)
        assert actual is None, msg
        return
    atol = FP32["atol"] * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=FP32["rtol"], atol=atol, msg=msg)


@CPU_AND_CUDA
@pytest.mark.parametrize("family", INSTALLED)
def test_bf16_error_at_most_twice_the_original_blocks(family, device):
    # Judged against the fp32 block on the same device, so that tensor cores (ours, and torch's
    # grouped GEMM or cuBLAS in the unpatched block) are held to the unpatched block's accuracy.
    model = tiny_model(family).to(device)
    x = hidden_states(model, device=device)
    grad_out = torch.randn_like(x)
    block = moe_blocks(model)[0][1]
    exact_out, exact_grad_x, _ = forward_backward(model, block, x, grad_out)
    bf16_model = in_bf16(model)
    fused_bf16 = patched_copy(bf16_model)
    x16, grad16 = x.detach().bfloat16(), grad_out.bfloat16()
    out, grad_x, _ = forward_backward(bf16_model, moe_blocks(bf16_model)[0][1], x16, grad16)
    fused_out, fused_grad_x, _ = forward_backward(
        fused_bf16, moe_blocks(fused_bf16)[0][1], x16, grad16
    )
    assert fused_out.dtype == out.dtype == torch.bfloat16

    def error(a, b):
        return (a.float() - b).abs().max().item()

    assert error(fused_out, exact_out) <= 2 * error(out, exact_out)
    assert error(fused_grad_x, exact_grad_x) <= 2 * error(grad_x, exact_grad_x)


def in_bf16(model):
    """A bf16 copy of ``model`` as ``from_pretrained(dtype=torch.bfloat16)`` loads it: the
    tensors its class keeps in fp32 (``_keep_in_fp32_modules_strict``: Inkling-2's router,
    whose forward takes fp32 weights only) stay fp32."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    keep = getattr(bf16, "_keep_in_fp32_modules_strict", None) or ()
    for name, tensor in [*bf16.named_parameters(), *bf16.named_buffers()]:
        if any(key in name for key in keep):
            tensor.data = tensor.data.float()
    return bf16


@CPU_AND_CUDA
@pytest.mark.parametrize("family", INSTALLED)
def test_routing_decisions_identical_and_counted(family, device):
    model = tiny_model(family).to(device)
    fused = patched_copy(model).train()
    x = (
        hidden_states(model, seed=3, device=device)
        .detach()
        .reshape(-1, model.config.get_text_config().hidden_size)
    )
    for (_, block), (_, fused_block) in zip(moe_blocks(model), moe_blocks(fused), strict=True):
        router, fused_router = router_of(block), router_of_fused(fused_block)
        assert_tie_free(block, x)
        logits, weights, ids = decisions(block, router, x)
        fused_logits, fused_weights, fused_ids = decisions(fused_block, fused_router, x)
        # The same F.linear call on the same device: bit-equal (cuBLAS is deterministic too).
        torch.testing.assert_close(fused_logits, logits, rtol=0, atol=0)
        order, fused_order = ids.sort(dim=-1), fused_ids.sort(dim=-1)
        assert torch.equal(fused_order.values, order.values)
        torch.testing.assert_close(
            fused_weights.gather(1, fused_order.indices), weights.gather(1, order.indices), **FP32
        )
        assert fused_weights.dtype == weights.dtype
        counts = torch.bincount(ids.flatten(), minlength=fused_router.tokens_per_expert.numel())
        assert torch.equal(fused_router.tokens_per_expert, counts)


@pytest.mark.parametrize("family", INSTALLED)
def test_router_logits_under_autocast_are_the_originals(family):
    # Where the router's code turns autocast off (ERNIE, Flint, Inkling) they stay fp32; where
    # it does not (DeepSeek-V3's fp32 copies), autocast computes them in its dtype.
    model = tiny_model(family)
    fused = patched_copy(model)
    x = hidden_states(model).detach().reshape(-1, model.config.get_text_config().hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for (_, block), (_, fused_block) in zip(moe_blocks(model), moe_blocks(fused), strict=True):
            logits = decisions(block, router_of(block), x)[0]
            fused_logits = decisions(fused_block, router_of_fused(fused_block), x)[0]
            assert fused_logits.dtype == logits.dtype
            torch.testing.assert_close(fused_logits, logits, rtol=0, atol=0)


@CPU_AND_CUDA
@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_whole_model_loss_router_logits_and_generate_identical(family, device):
    model = tiny_model(family).to(device)
    fused = patched_copy(model)
    ids = torch.randint(3, TEXT_VOCAB, (2, 10), generator=torch.Generator().manual_seed(1)).to(
        device
    )
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the model's aux loss leaves it out
    kwargs = dict(attention_mask=mask, labels=ids, output_router_logits=True)
    model.train(), fused.train()
    out = original_or_skip(model, ids, **forward_inputs(model, ids), **kwargs)
    fused_out = fused(ids, **forward_inputs(fused, ids), **kwargs)
    torch.testing.assert_close(fused_out.loss, out.loss, **FP32)
    if getattr(out, "aux_loss", None) is not None:
        torch.testing.assert_close(fused_out.aux_loss, out.aux_loss, **FP32)
    # DeepSeek-style models return router logits from transformers 5.2x on.
    router_logits = getattr(out, "router_logits", None)
    if router_logits is not None:
        assert len(fused_out.router_logits) == len(router_logits) == len(text_blocks(model))
        for fused_logits, logits in zip(fused_out.router_logits, router_logits, strict=True):
            torch.testing.assert_close(fused_logits, logits, **FP32)
    out.loss.backward()
    fused_out.loss.backward()
    fused_parameters = dict(fused.named_parameters())
    for name, parameter in model.named_parameters():
        assert_close_fp32(fused_parameters[name].grad, parameter.grad, msg=name)
    model.eval(), fused.eval()
    # An encoder (the privacy filter), or a model fed embeddings (Qwen3-Omni's talker, whose
    # generation its whole model drives from its thinker's).
    if not model.can_generate() or forward_inputs(model, ids):
        return
    prompt = ids[:1, :6]
    # Text only: the multimodal families' special tokens are never generated.
    greedy = dict(
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        suppress_tokens=list(range(TEXT_VOCAB, model.config.get_text_config().vocab_size)),
    )
    generated = model.generate(prompt, output_scores=True, **greedy)
    fused_generated = fused.generate(prompt, output_scores=True, **greedy)
    # Greedy decoding takes the argmax of logits that agree to FP32 tolerance between the two
    # (about 1e-5 here): the same tokens up to the first step whose best two logits lie that
    # close, where either may win. Every step's logits up to that one, the first computed from
    # the prompt and the others from the KV cache, agree.
    best_two = torch.cat(generated.scores).topk(2, dim=-1).values
    decided = int((best_two[:, 0] - best_two[:, 1] > 1e-4).cumprod(0).sum())
    assert decided >= 1  # at least one step decoded from the cache
    length = prompt.shape[1] + decided
    assert torch.equal(fused_generated.sequences[:, :length], generated.sequences[:, :length])
    compared = zip(
        fused_generated.scores[: decided + 1], generated.scores[: decided + 1], strict=True
    )
    for step, (fused_scores, scores) in enumerate(compared):
        torch.testing.assert_close(fused_scores, scores, **FP32, msg=f"step {step}")


@CPU_AND_CUDA
@pytest.mark.parametrize("family", BLOCK_DIFFUSION)
def test_block_diffusion_model_logits_gradients_and_generate_identical(family, device):
    model = tiny_model(family).to(device)
    fused = patched_copy(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, TEXT_VOCAB, (2, 10), generator=g).to(device)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # a left-padded prompt
    noisy = canvas(model, 2).to(device)
    # A denoising loss: the canvas's logits against other tokens.
    target = torch.randint(3, TEXT_VOCAB, noisy.shape, generator=g).to(device)
    model.train(), fused.train()
    results = []
    for each in (model, fused):
        logits = each(prompt, attention_mask=mask, decoder_input_ids=noisy).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        results.append(logits)
    torch.testing.assert_close(results[1], results[0], **FP32)
    fused_parameters = dict(fused.named_parameters())
    for name, parameter in model.named_parameters():
        assert_close_fp32(fused_parameters[name].grad, parameter.grad, msg=name)
    # Its generation samples: the same seed, the same samples from logits that agree.
    model.eval(), fused.eval()
    generated = []
    for each in (model, fused):
        torch.manual_seed(3)
        generated.append(each.generate(prompt[:1], max_new_tokens=16).sequences)
    assert generated[0].shape[1] > prompt.shape[1]
    assert torch.equal(generated[1], generated[0])


def original_or_skip(model, *args, **kwargs):
    """The unpatched model's outputs, or a skip where this transformers' own model fails on
    them (5.17's Granite-SWA raises with router logits; its Qwen4-Exp gives a NaN loss with
    left padding): there is nothing to compare with."""
    version = transformers.__version__
    try:
        out = model(*args, **kwargs)
    except Exception as error:  # noqa: BLE001: whatever the model raises
        pytest.skip(f"the unpatched model fails in transformers {version}: {error!r}")
    if not torch.isfinite(out.loss):
        pytest.skip(f"the unpatched model's loss is {out.loss.item()} in transformers {version}")
    return out


@pytest.mark.parametrize("family", INSTALLED)
def test_state_dict_is_the_models_own_and_round_trips(family):
    model = tiny_model(family)
    state = model.state_dict()
    fused = tiny_model(family, seed=1)
    fused_state_before = fused.state_dict()
    assert patch(fused) == len(moe_blocks(model))
    fused_state = fused.state_dict()
    assert fused_state.keys() == state.keys()
    for key, tensor in fused_state.items():
        assert tensor.data_ptr() == fused_state_before[key].data_ptr(), key
    # A checkpoint of the unpatched model loads into the patched one, and back.
    fused.load_state_dict(state)
    ids = torch.randint(3, TEXT_VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    inputs = forward_inputs(model, ids)
    logits = model(ids, **inputs).logits
    torch.testing.assert_close(fused(ids, **inputs).logits, logits, **FP32)
    other = tiny_model(family, seed=2)
    other.load_state_dict(fused.state_dict())
    torch.testing.assert_close(other(ids, **inputs).logits, logits, **FP32)
    # unpatch restores the original classes, tensors untouched.
    assert unpatch(fused) == len(moe_blocks(model))
    assert not any(isinstance(m, (FusedRouter, FusedExperts)) for m in fused.modules())
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    assert fused.state_dict().keys() == state.keys()
    torch.testing.assert_close(fused(ids, **inputs).logits, logits, **FP32)


def test_loss_free_adds_an_fp32_bias_only_where_the_model_has_none():
    mixtral = tiny_model("mixtral")
    keys = set(mixtral.state_dict())
    patch(mixtral, balancing="loss_free")
    added = set(mixtral.state_dict()) - keys
    assert added == {f"{name}.gate.{BIAS}" for name, _ in moe_blocks(mixtral)}
    mixtral.to(torch.bfloat16)
    for name in added:
        bias = mixtral.get_buffer(name)
        assert bias.dtype == torch.float32 and not bias.any()
    unpatch(mixtral)
    assert set(mixtral.state_dict()) == keys

    deepseek = tiny_model("deepseek_v3").to(torch.bfloat16)
    own = {name: b for name, b in deepseek.named_buffers() if name.endswith(BIAS)}
    patch(deepseek, balancing="loss_free")
    for name, bias in own.items():
        fused_bias = deepseek.get_buffer(name)
        assert fused_bias.dtype == torch.float32 and torch.equal(fused_bias, bias.float())
    assert set(deepseek.state_dict()) == set(tiny_model("deepseek_v3").state_dict())


def test_gradient_checkpointing_recomputes_do_not_count_twice():
    model = tiny_model("qwen3_moe")
    patch(model)
    # activation_checkpointing_enable is the name from transformers 5.2x on.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model.train()
    ids = torch.randint(3, TEXT_VOCAB, (2, 10))
    model(ids, labels=ids).loss.backward()
    for _, block in moe_blocks(model):
        counts = router_of_fused(block).tokens_per_expert
        assert counts.sum() == ids.numel() * model.config.get_text_config().num_experts_per_tok


def test_eval_forwards_do_not_count():
    model = tiny_model("mixtral")
    patch(model)
    model.eval()
    model(torch.randint(3, TEXT_VOCAB, (2, 10)))
    for _, block in moe_blocks(model):
        assert not router_of_fused(block).tokens_per_expert.any()


def test_unsupported_blocks_are_named_and_left_whole():
    model = tiny_model("mixtral")
    (first_name, first), (second_name, second) = moe_blocks(model)
    first.experts.act_fn = torch.nn.GELU()
    unlisted = type("MyRouter", (type(second.gate),), {})
    second.gate.__class__ = unlisted
    with pytest.warns(UserWarning) as caught:
        assert patch(model) == 0
    messages = [str(w.message) for w in caught]
    assert any(first_name in m and "activation is GELU" in m for m in messages)
    assert any(second_name in m and "router" in m for m in messages)
    assert type(first.gate) is not unlisted and not isinstance(first.gate, FusedRouter)
    assert not isinstance(second.experts, FusedExperts)


@pytest.mark.parametrize(
    "family,options",
    [
        (  # left whole: the choice it gives dropped groups
            "axk2",
            dict(
                DEEPSEEK_MLA,
                first_k_dense_replace=0,
                index_topk=4,
                index_head_dim=8,
                index_n_heads=2,
                gated_norm_rank=4,
            ),
        ),
        ("phimoe", dict(num_local_experts=8)),  # left whole: sparsemixer
    ],
)
def test_a_family_left_unpatched_is_warned_about_with_its_reason(family, options):
    config = transformers.AutoConfig.for_model(family, **{**COMMON, **options})
    model = transformers.AutoModelForCausalLM.from_config(config)
    reason = families.status_of(family)[1]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.warns(UserWarning) as caught:
        assert patch(model) == 0
    blocks = moe_blocks(model)
    assert len(caught) == len(blocks) == 2
    for (name, block), warning in zip(blocks, caught, strict=True):
        assert str(warning.message) == (
            f"moe_kernels: left {name} ({type(block).__name__}) unpatched: its router is none "
            f"of the routers moe_kernels expresses ({family}: {reason})"
        )
    assert not any(isinstance(m, (FusedRouter, FusedExperts)) for m in model.modules())
    assert all(torch.equal(state[name], t) for name, t in model.state_dict().items())


@pytest.mark.skipif("dbrx" not in INSTALLED, reason="needs DBRX's transformers")
def test_dbrx_jitters_its_tokens_as_the_original_and_may_leave_its_weights_unnormalised():
    # Its router multiplies its block's tokens in place by noise in training, which the block's
    # experts then take; the family battery's config has neither the noise nor this routing.
    ffn = dict(DBRX_FFN, moe_jitter_eps=0.2, moe_normalize_expert_weights=None)
    model = tiny_model("dbrx", ffn_config=ffn).train()
    fused = patched_copy(model).train()
    x = hidden_states(model)
    grad_out = torch.randn_like(x)
    for (_, block), (_, fused_block) in zip(moe_blocks(model), moe_blocks(fused), strict=True):
        results = []
        for each in (block, fused_block):
            torch.manual_seed(7)  # the same noise
            tokens = x.detach().clone().requires_grad_()
            out = each(tokens * 1.0)  # not a leaf: the noise multiplies it in place
            out.backward(grad_out)
            grads = {name: p.grad.clone() for name, p in each.named_parameters()}
            results.append((out.detach(), tokens.grad, grads))
        (out, grad_x, grads), (fused_out, fused_grad_x, fused_grads) = results
        assert not torch.equal(out, block.eval()(x.detach()))  # the noise changed the output
        assert_close_fp32(fused_out, out)
        assert_close_fp32(fused_grad_x, grad_x)
        for name in grads:
            assert_close_fp32(fused_grads[name], grads[name], msg=name)


@pytest.mark.skipif("dbrx" not in INSTALLED, reason="needs DBRX's transformers")
def test_dbrx_weights_divided_by_another_norm_than_their_sum_are_left_whole_by_name():
    model = tiny_model("dbrx", ffn_config=dict(DBRX_FFN, moe_normalize_expert_weights=2.0))
    with pytest.warns(UserWarning, match=r"divided by their 2.0-norm, not their sum"):
        assert patch(model) == 0
    assert not any(isinstance(m, (FusedRouter, FusedExperts)) for m in model.modules())


@pytest.mark.skipif("cohere2_moe" not in INSTALLED, reason="needs Cohere2-MoE's transformers")
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_cohere2_moe_with_its_configs_sigmoid_scores(norm_topk_prob):
    # The tiny config's default is softmax, which the family battery covers.
    model = tiny_model("cohere2_moe", expert_selection_fn="sigmoid", norm_topk_prob=norm_topk_prob)
    for mode in ("train", "eval"):
        assert_blocks_match_the_original(model, mode, "cpu")


@pytest.mark.skipif("cohere2_moe" not in INSTALLED, reason="needs Cohere2-MoE's transformers")
def test_a_router_whose_score_function_the_ops_lack_is_left_whole_by_name():
    model = tiny_model("cohere2_moe")
    for _, block in moe_blocks(model):
        block.gate.expert_selection_fn = "relu"  # unpatched, its top-k logits are the weights
    with pytest.warns(UserWarning, match=r"its router's score function is 'relu', none of"):
        assert patch(model) == 0


@pytest.mark.skipif("deepseek_v4" not in INSTALLED, reason="needs DeepSeek-V4's transformers")
def test_deepseek_v4s_hash_layers_are_left_whole_and_its_learned_ones_patched():
    model = tiny_model("deepseek_v4", mlp_layer_types=["hash_moe", "moe"])
    fused = copy.deepcopy(model)
    with pytest.warns(UserWarning) as caught:
        assert patch(fused) == 1
    (hash_name, hash_block), (name, block) = moe_blocks(fused)
    assert [str(w.message) for w in caught] == [
        f"moe_kernels: left {hash_name} ({type(hash_block).__name__}) unpatched: its router is "
        "none of the routers moe_kernels expresses (deepseek_v4: its hash layers pick experts "
        "by a token-id table)"
    ]
    assert not isinstance(hash_block.experts, FusedExperts)
    assert isinstance(block.experts, FusedExperts)
    ids = torch.randint(3, TEXT_VOCAB, (2, 10))
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, **FP32)


def test_bad_arguments_raise_naming_them():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="balancing"):
        patch(model, balancing="aux_loss")
    with pytest.raises(ValueError, match="rate"):
        patch(model, balancing="loss_free", rate=-1.0)
    with pytest.raises(ValueError, match="backend"):
        patch(model, backend="triton")
    assert not any(isinstance(m, FusedRouter) for m in model.modules())
    patch(model)
    with pytest.raises(ValueError, match="already patched"):
        patch(model)


def test_blocks_whose_forward_another_library_wrapped_are_left_whole():
    model = tiny_model("mixtral")
    (name, block), (_, other) = moe_blocks(model)
    original_forward = block.gate.forward
    block.gate.forward = lambda hidden_states: original_forward(hidden_states)  # as accelerate
    with pytest.warns(UserWarning, match=f"{name} .*forward is replaced on the instance"):
        assert patch(model) == 1
    assert not isinstance(block.gate, FusedRouter) and isinstance(other.gate, FusedRouter)


def test_save_pretrained_of_a_patched_model_loads_unpatched(tmp_path):
    model = tiny_model("qwen2_moe")
    fused = patched_copy(model)
    fused.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, (FusedRouter, FusedExperts)) for m in loaded.modules())
    ids = torch.randint(3, TEXT_VOCAB, (2, 10))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **FP32)
