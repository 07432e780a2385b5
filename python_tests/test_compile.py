"""The ops compose under torch.compile(fullgraph=True): route -> permute -> grouped GEMM with
the SwiGLU epilogue -> grouped GEMM -> unpermute, forward and backward, with the same results
as eager; so does a whole MoELayer, with every balancing strategy and with token-choice
capacity, and a training step of the built-in model."""

import copy
import dataclasses

import pytest
import torch

import moe_kernels as mk
from conftest import tie_free_logits
from moe_kernels.layer import BALANCING, MoELayer, total_aux_loss, update_balance
from moe_kernels.train.config import ModelConfig, TrainConfig
from moe_kernels.train.model import MoETransformer, language_model_loss

NUM_EXPERTS, TOPK, HIDDEN, FFN = 16, 4, 32, 24


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each case compiles its own graphs: without a reset, the cases' layers count as
    recompilations of one function and reach dynamo's limit of 8."""
    torch._dynamo.reset()


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


def layer_step(layer, x):
    """A training forward of ``layer``: its output and the loss with the layer's aux losses."""
    out = layer(x)
    loss = out.square().mean()
    aux = total_aux_loss(layer)
    return out, loss if aux is None else loss + aux


def assert_layers_match(compiled_layer, eager_layer, x_compiled, x_eager):
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-6)
    for (name, got), want in zip(
        compiled_layer.named_parameters(), eager_layer.parameters(), strict=True
    ):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Buffer mutations (the step's counts, the running global counts) are applied alike.
    for (name, got), want in zip(
        compiled_layer.named_buffers(), eager_layer.buffers(), strict=True
    ):
        assert torch.equal(got, want), name


# Every strategy; and token-choice capacity, with and without padding to it.
CAPACITY = {"probs": dict(drop_policy="probs", capacity_factor=0.75),
            "position-padded": dict(drop_policy="position", pad_to_capacity=True)}  # fmt: skip
LAYER_CASES = [
    *((balancing, None) for balancing in [*BALANCING, "loss_free+seq_aux_loss"]),
    ("loss_free", "probs"),
    ("loss_free+seq_aux_loss", "position-padded"),
]


@pytest.mark.parametrize("balancing,capacity", LAYER_CASES)
def test_a_whole_layer_compiles_in_one_graph_and_matches_eager(balancing, capacity):
    # fullgraph=True fails on any graph break: none for any strategy (one process). AOTAutograd
    # traces forward and backward with the ops' fake kernels and autograd formulas; "aot_eager"
    # runs those graphs without Inductor's code generation (the test below runs Inductor).
    torch.manual_seed(0)
    eager = MoELayer(HIDDEN, FFN, NUM_EXPERTS, TOPK, balancing=balancing, num_shared_experts=1,
                     n_groups=4, topk_groups=2, z_loss_coeff=1e-3, rate=0.01,
                     **CAPACITY.get(capacity, {}))  # fmt: skip
    layer = copy.deepcopy(eager)
    step = torch.compile(layer_step, fullgraph=True, backend="aot_eager")
    for seed in range(2):  # two optimizer steps: the second routes with a moved bias
        x = torch.randn(2, 24, HIDDEN, generator=torch.Generator().manual_seed(seed))
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_eager, loss_eager = layer_step(eager, x_eager)
        out_compiled, loss_compiled = step(layer, x_compiled)
        torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-7)
        loss_eager.backward(), loss_compiled.backward()
        assert_layers_match(layer, eager, x_compiled, x_eager)
        eager.update_balance(), layer.update_balance()
        eager.zero_grad(), layer.zero_grad()


def test_a_training_step_of_the_model_compiles_with_inductor_and_matches_eager():
    config = dataclasses.replace(
        TrainConfig(),
        model=ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                          num_experts=8, topk=2, expert_ffn_hidden_size=16, max_seq_len=16),
        z_loss_coeff=1e-3,
    )  # fmt: skip
    torch.manual_seed(0)
    eager = MoETransformer(config)
    model = copy.deepcopy(eager)

    def loss_of(model, tokens):
        logits = model(tokens[:, :-1])
        loss = language_model_loss(logits, tokens[:, 1:])
        return loss + total_aux_loss(model)

    compiled = torch.compile(loss_of, fullgraph=True)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    loss_eager, loss_compiled = loss_of(eager, tokens), compiled(model, tokens)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    loss_eager.backward(), loss_compiled.backward()
    for (name, got), want in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert [c.tolist() for c in update_balance(model)] == [
        c.tolist() for c in update_balance(eager)
    ]
