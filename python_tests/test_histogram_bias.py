"""expert_histogram and update_bias against the reference (SPEC.md sections 1 and 2)."""

import pytest
import torch

import moe_kernels as mk
from conftest import backends_for, on_backends, random_ids
from moe_kernels import reference as ref


@on_backends("expert_histogram")
@pytest.mark.parametrize("num_experts,topk", [(1, 1), (8, 2), (64, 8), (256, 8), (256, 256)])
@pytest.mark.parametrize("num_tokens", [0, 1, 17, 5000])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_expert_histogram_matches_reference(device, num_experts, topk, num_tokens, id_dtype):
    # Half of the experts receive nothing.
    ids = random_ids(num_tokens, num_experts, topk, used=max(topk, num_experts // 2)).to(id_dtype)
    counts = mk.expert_histogram(ids.to(device), num_experts)
    assert counts.dtype == torch.int64 and counts.device.type == device
    # Exact on every device: integer atomics give the same sum in any order.
    assert torch.equal(counts.cpu(), ref.expert_histogram(ids, num_experts))


@pytest.mark.parametrize("device", backends_for("expert_histogram")[1:], indirect=True)
def test_cuda_histogram_skips_ids_out_of_range(device):
    # The CUDA op cannot raise on them without a host synchronisation (the CPU op raises).
    ids = torch.tensor([[0, 7], [8, -1], [3, 3]])
    assert mk.expert_histogram(ids.to(device), 8).tolist() == [1, 0, 0, 2, 0, 0, 0, 1]


def test_histogram_of_routing_equals_routing_counts():
    logits = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    _, ids, counts = mk.biased_topk(logits, None, 6)
    assert torch.equal(mk.expert_histogram(ids, 64), counts)


COUNT_CASES = {
    "skewed": [40, 0, 3, 17, 0, 0, 12, 8],
    "balanced": [5, 5, 5, 5, 5, 5, 5, 5],
    "empty": [0, 0, 0, 0, 0, 0, 0, 0],
    "mean_not_integer": [1, 2, 0, 0, 0, 0, 0, 0],
}


@on_backends("update_bias")
@pytest.mark.parametrize("rule", ["sign", "proportional"])
@pytest.mark.parametrize("case", sorted(COUNT_CASES))
@pytest.mark.parametrize("count_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("centered", [False, True])
def test_update_bias_matches_reference(device, rule, case, count_dtype, centered):
    counts = torch.tensor(COUNT_CASES[case], dtype=count_dtype)
    bias = torch.linspace(-0.5, 0.5, 8)
    want = bias.clone()
    ref.update_bias(want, counts, 1e-2, rule, centered)
    got = bias.to(device)
    storage = got.data_ptr()
    mk.update_bias(got, counts.to(device), 1e-2, rule, centered)
    assert got.data_ptr() == storage  # in place
    # Every backend computes the CPU kernel's bits (bias_update_rule.h: an exact sign less an
    # exact integer mean, times the rate, or one fp64 product and quotient, then one fp32 add:
    # nothing for a GPU's FMA contraction to fuse); rtol 1e-6 is for the reference's other
    # formula (an fp64 mean).
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)


@on_backends("update_bias")
def test_a_centred_update_keeps_the_mean_over_many_experts(device):
    # 300 experts: more than the CUDA kernel's 256 threads, so its second sum spans strides.
    counts = torch.randint(0, 100, (300,), generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(300, device=device)
    for _ in range(50):
        mk.update_bias(bias, counts.to(device), 1e-2, "sign", centered=True)
    plain = torch.zeros(300)
    for _ in range(50):
        mk.update_bias(plain, counts, 1e-2, "sign")
    assert abs(float(plain.mean())) > 1e-3  # without centring the mean drifts
    assert abs(float(bias.mean())) < 1e-6
    offset = plain - bias.cpu()
    assert float(offset.max() - offset.min()) < 1e-5  # the same biases up to one constant


def test_centring_changes_no_routing_choice():
    # The loss-free loop of the test below, twice, with and without centring: the biases differ
    # by a constant (the drift of the mean) and route every token alike. The rate and E are
    # powers of two, so the centred updates are exact.
    g = torch.Generator().manual_seed(2)
    skew = torch.linspace(2.0, -2.0, 16)
    plain, centred = torch.zeros(16), torch.zeros(16)
    for _ in range(300):
        logits = torch.randn(512, 16, generator=g) + skew
        _, ids, counts = mk.biased_topk(logits, plain, 2)
        _, centred_ids, centred_counts = mk.biased_topk(logits, centred, 2)
        assert torch.equal(ids, centred_ids)
        mk.update_bias(plain, counts, 2**-7)
        mk.update_bias(centred, centred_counts, 2**-7, centered=True)
    assert abs(float(plain.mean())) > 2**-7 and float(centred.mean()) == 0.0


def test_sign_rule_moves_overloaded_down_and_underloaded_up():
    counts = torch.tensor([10, 2, 6, 6])  # mean 6
    bias = torch.zeros(4)
    mk.update_bias(bias, counts, 0.25)
    assert bias.tolist() == [-0.25, 0.25, 0.0, 0.0]


def test_update_bias_balances_a_skewed_router():
    # Loss-free balancing in miniature: route, count, update, repeat. The bias must bring the
    # skewed router's load (summed over many batches, so that sampling noise stays small)
    # close to uniform.
    g = torch.Generator().manual_seed(0)
    skew = torch.linspace(2.0, -2.0, 16)
    bias = torch.zeros(16)
    history = []
    for _ in range(300):
        logits = torch.randn(512, 16, generator=g) + skew
        _, _, counts = mk.biased_topk(logits, bias, 2)
        history.append(counts)
        mk.update_bias(bias, counts, 1e-2)

    def max_violation(counts):
        return float((counts.max() - counts.float().mean()) / counts.float().mean())

    assert max_violation(sum(history[:10])) > 2.0
    assert max_violation(sum(history[-50:])) < 0.1
    assert bias[0] < 0 < bias[-1]  # overloaded experts pushed down, underloaded up
