"""The overlapped expert-parallel dispatch on 2 and 4 Gloo ranks: a started dispatch or combine
moves the rows and gradients of ``dispatch``/``combine``; the layer computes its shared experts
while rows travel, forward and backward (shown by its stage timeline), and gives the outputs
and gradients of the unsharded layer on the same tokens."""

import pytest
import torch
import torch.distributed as dist
from ranks import run_on_ranks

import moe_kernels as mk
from moe_kernels import timeline
from moe_kernels.dispatch import ExpertParallelDispatcher, init_nccl, nccl_available

H, F_, E, K = 16, 8, 8, 2


def _rows(rank):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(20 + 7 * rank, H, generator=g)
    ids = torch.randint(E, (x.shape[0], 2), generator=g)
    return mk.permute(x, ids, E)


def _started_moves(rank, world_size, layout):
    dispatcher = ExpertParallelDispatcher(E, layout=layout)
    rows, _, counts = _rows(rank)
    grads = torch.randn(2, rows.shape[0], H, generator=torch.Generator().manual_seed(9 + rank))
    results = {}
    for started in (False, True):
        leaf = rows.clone().requires_grad_()
        plan = dispatcher.plan(leaf, counts)
        if started:
            expert_rows = dispatcher.start_dispatch(leaf, plan).wait()
            scaled = expert_rows * 2
            back = dispatcher.start_combine(scaled, plan).wait()
        else:
            expert_rows, _ = dispatcher.dispatch(leaf, counts)
            scaled = expert_rows * 2
            back = dispatcher.combine(scaled, plan)
        (back * grads[0]).sum().backward()
        results[started] = (expert_rows.detach(), back.detach(), leaf.grad)
    return results, rows


@pytest.mark.parametrize("layout", ["transpose", "grouped"])
def test_started_moves_equal_the_blocking_ones(tmp_path, layout):
    for results, rows in run_on_ranks(_started_moves, 2, tmp_path, layout):
        for blocking, started in zip(results[False], results[True], strict=True):
            assert torch.equal(started, blocking)
        assert torch.equal(results[True][1], 2 * rows)  # the combine inverts the dispatch


def _layer(ep_group=None, ep_overlap=True, num_shared_experts=1, **options):
    torch.manual_seed(0)
    return mk.MoELayer(
        H,
        F_,
        E,
        K,
        num_shared_experts=num_shared_experts,
        balancing="loss_free+aux_loss",
        aux_coeff=0.01,
        ep_group=ep_group,
        ep_overlap=ep_overlap,
        **options,
    )


def _forward_backward(layer, x, grad):
    x = x.clone().requires_grad_()
    with timeline.record() as stages:
        out = layer(x)
        ((out * grad).sum() + layer.aux_loss).backward()
    grads = {name: p.grad.cpu() for name, p in layer.named_parameters()}
    return out.detach().cpu(), x.grad.cpu(), grads, stages


def _overlap_step(rank, world_size, num_shared_experts, layout, device="cpu", transport="auto"):
    if transport == "nccl":
        init_nccl()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, 5 + rank, H, generator=g).to(device)
    grad = torch.randn(x.shape, generator=g).to(device)
    local = _layer(num_shared_experts=num_shared_experts).to(device)
    shard = slice(rank * E // world_size, (rank + 1) * E // world_size)
    results = {"local": _forward_backward(local, x, grad)}
    for overlap in (False, True):
        layer = _layer(dist.group.WORLD, overlap, num_shared_experts, ep_transport=transport)
        layer.to(device).dispatcher.layout = layout
        with torch.no_grad():
            layer.experts.gate_up_proj.copy_(local.experts.gate_up_proj[shard])
            layer.experts.down_proj.copy_(local.experts.down_proj[shard])
        results[overlap] = _forward_backward(layer, x, grad)
    return results, shard


def _between(stages, inner, start, wait):
    """Whether the stage ``inner`` ran after ``start`` ended and before ``wait`` began."""
    (inner,), (start,), (wait,) = (stages.named(n) for n in (inner, start, wait))
    return start.end <= inner.begin and inner.end <= wait.begin


@pytest.mark.parametrize(
    "world_size,num_shared_experts,layout",
    [(2, 0, "transpose"), (2, 1, "transpose"), (4, 0, "transpose"), (4, 1, "grouped")],
)
def test_the_layer_overlaps_its_shared_experts_with_the_moves(
    tmp_path, world_size, num_shared_experts, layout
):
    check_overlapped_layer(
        run_on_ranks(_overlap_step, world_size, tmp_path, num_shared_experts, layout),
        num_shared_experts,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("transport", ["process_group", "nccl"])
@pytest.mark.parametrize("layout", ["transpose", "grouped"])
def test_the_overlapped_layer_on_a_gpu(tmp_path, transport, layout):
    """One rank per GPU over NCCL: the streams' overlap gives the unsharded layer's results."""
    if transport == "nccl" and not nccl_available():
        pytest.skip("this build has no NCCL transport")
    world_size = min(torch.cuda.device_count(), 4)
    ranks = run_on_ranks(
        _overlap_step, world_size, tmp_path, 1, layout, "cuda", transport, backend="nccl"
    )
    check_overlapped_layer(ranks, 1)


def check_overlapped_layer(ranks, num_shared_experts):
    # A rank's experts take the gradients of every rank's tokens routed to them.
    expert_grads = {
        name: sum(results["local"][2][name] for results, _ in ranks)
        for name in ("experts.gate_up_proj", "experts.down_proj")
    }
    for results, shard in ranks:
        want_out, want_dx, want_grads, _ = results["local"]
        for overlap in (False, True):
            out, dx, grads, stages = results[overlap]
            torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
            for name, want in want_grads.items():
                want = expert_grads[name][shard] if name in expert_grads else want
                torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=name)
            if not num_shared_experts:
                assert not stages.named("shared_experts.up")
                continue
            overlapped = [
                _between(stages, "shared_experts.up", "dispatch.start", "dispatch.wait"),
                _between(stages, "shared_experts.down", "combine.start", "combine.wait"),
                _between(
                    stages,
                    "shared_experts.down.backward",
                    "combine.backward.start",
                    "combine.backward.wait",
                ),
                _between(
                    stages,
                    "shared_experts.up.backward",
                    "dispatch.backward.start",
                    "dispatch.backward.wait",
                ),
            ]
            assert overlapped == [overlap] * 4, overlapped


def test_no_timeline_records_outside_a_recording():
    layer = _layer()
    with timeline.record() as stages:
        pass
    layer(torch.randn(4, H)).sum().backward()
    assert stages == [] and not timeline.recording()
