"""Launches every ``__global__`` kernel of the package at least once, on small ragged shapes:
the program that compute-sanitizer's tools (memcheck, racecheck, synccheck, initcheck) watch in
``make gpu-check``.

    python benchmarks/launch_every_kernel.py [--device cuda|emu] [--schedule forward]
                                             [--check-coverage]

The shapes are the ones where kernels go wrong: experts with no rows and with one row, K and N
that are not multiples of any tile, permute with align > 1, capacity with dropped pairs, group-limited routing (whose
padding slots pass group 63 at 448 experts in 64 groups), fp32 (CUDA cores) and bf16 (tensor
cores), every op's backward. Each result is checked against the pure-PyTorch reference, so a
kernel that a sanitizer passes but computes wrongly still fails the run.

``--device emu`` runs the same launches on the CPU emulator under ``--schedule`` (the dry run
of ``make gpu-check``).
``--check-coverage`` also records which kernels ran (the emulator's launch counts, or on a GPU
torch.profiler's kernel trace; not under compute-sanitizer, whose tools and the profiler's
CUPTI do not mix) and fails if a kernel declared in csrc/ never did.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import moe_kernels as mk
from moe_kernels import reference as ref
from moe_kernels.emulator import emulate, emulated_launches

CSRC = Path(__file__).resolve().parent.parent / "csrc"
KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")


def declared_kernels() -> set[str]:
    """The names of every ``__global__`` function in csrc/."""
    names = set()
    for path in CSRC.rglob("*.cuh"):
        names.update(KERNEL.findall(path.read_text()))
    return names


def launched(names: list[str], declared: set[str]) -> set[str]:
    """The declared kernels that appear, as whole words, in the launched kernels' names."""
    return {kernel for kernel in declared if any(re.search(rf"\b{kernel}\b", n) for n in names)}


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    tolerance = 1e-4 if got.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tolerance, atol=tolerance,
                               msg=what)  # fmt: skip


def tie_free_logits(num_tokens: int, num_experts: int, g: torch.Generator) -> torch.Tensor:
    """Each row a permutation of an even grid on [-3, 3]: two experts' scores are equal or
    further apart than any device's math error, so ids compare exactly on every device."""
    grid = torch.linspace(-3.0, 3.0, num_experts)
    return grid[torch.rand(num_tokens, num_experts, generator=g).argsort(dim=1)]


def route(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    for experts, groups, keep, k, score_fn in [
        (8, 1, 1, 2, "softmax"),
        (448, 64, 4, 8, "sigmoid"),  # padding slots' groups pass 63
        (96, 8, 3, 6, "sigmoid"),
    ]:
        for dtype in (torch.float32, torch.bfloat16):
            logits = tie_free_logits(37, experts, g).to(dtype)
            bias = torch.randint(-1, 2, (experts,), generator=g).float()  # never makes a tie
            dev_logits = logits.to(device).requires_grad_()
            weights, ids, counts = mk.biased_topk(
                dev_logits, bias.to(device), k, score_fn, groups, keep
            )
            want_weights, want_ids, want_counts = ref.biased_topk(
                logits, bias, k, score_fn, groups, keep
            )
            what = f"biased_topk, {experts} experts, {dtype}"
            assert torch.equal(ids.cpu(), want_ids) and torch.equal(counts.cpu(), want_counts), what
            close(weights, want_weights, what)
            assert torch.equal(mk.expert_histogram(ids, experts).cpu(), want_counts)
            weights.sum().backward()  # biased_topk_backward
            assert dev_logits.grad is not None and torch.isfinite(dev_logits.grad).all()


def balance(device: str) -> None:
    counts = torch.tensor([0, 1, 9, 3, 0, 2, 7, 1])
    for rule in ("sign", "proportional"):
        bias = torch.zeros(8, device=device)
        mk.update_bias(bias, counts.to(device), rate=1e-2, rule=rule)
        want = torch.zeros(8)
        ref.update_bias(want, counts, rate=1e-2, rule=rule)
        close(bias, want, f"update_bias {rule}")


def permute_rows(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    # 12 experts of which several get no row and some one row.
    ids = torch.stack([torch.randperm(5, generator=g)[:2] * 2 for _ in range(7)])
    weights = torch.rand(7, 2, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        for align in (1, 8):
            x = torch.randn(7, 24, generator=g).to(dtype)
            dev_x = x.to(device).requires_grad_()
            dev_weights = weights.to(device).requires_grad_()
            rows, row_map, counts = mk.permute(dev_x, ids.to(device), 12, align)
            want_rows, want_map, want_counts = ref.permute(x, ids, 12, align)
            assert torch.equal(rows.cpu(), want_rows) and torch.equal(row_map.cpu(), want_map)
            assert torch.equal(counts.cpu(), want_counts), "permute's tokens_per_expert"
            out = mk.unpermute(rows * 2, row_map, dev_weights)
            close(out, ref.unpermute(want_rows * 2, want_map, weights), "unpermute")
            out.square().sum().backward()  # permute_with_map, unpermute_weights_grad
            assert dev_x.grad is not None and dev_weights.grad is not None


def capacity(device: str) -> None:
    """Token-choice capacity: an expert over capacity by hundreds of pairs (the select's many
    tiles), one with none, ids already dropped (-1), capacity 0; then the permute family on
    the dropped pairs, compact and padded to capacity."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 5, (300, 2), generator=g)
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, 3, (300,), generator=g)) % 5
    ids[ids == 3] = 0  # expert 3 gets nothing, expert 0 far more than its share
    ids[::17] = -1
    weights = torch.rand(300, 2, generator=g)
    weights[::5] = 0.5  # ties, broken by position
    for policy, capacity in [("probs", 70), ("position", 70), ("probs", 0)]:
        for dtype in (torch.float32, torch.float64):  # the kernel's two key widths
            given = weights.to(dtype)
            got = mk.drop_over_capacity(ids.to(device), given.to(device), 5, capacity, policy)
            want = ref.drop_over_capacity(ids, given, 5, capacity, policy)
            for name, a, b in zip(("kept_ids", "slots", "dropped"), got, want, strict=True):
                assert torch.equal(a.cpu(), b), f"drop_over_capacity {policy} {dtype} {name}"
    kept_ids, slots, _ = ref.drop_over_capacity(ids, weights, 5, 70, "probs")
    x = torch.randn(300, 16, generator=g)
    rows, row_map, counts = mk.permute(x.to(device), kept_ids.to(device), 5)
    want_rows, want_map, want_counts = ref.permute(x, kept_ids, 5)
    assert torch.equal(rows.cpu(), want_rows) and torch.equal(row_map.cpu(), want_map)
    assert torch.equal(counts.cpu(), want_counts), "permute of dropped pairs"
    close(mk.unpermute(rows, row_map, weights.to(device)), ref.unpermute(want_rows, want_map,
          weights), "unpermute of dropped pairs")  # fmt: skip
    padded_map = torch.where(kept_ids >= 0, kept_ids * 70 + slots, -1)
    padded = mk.permute_with_map(x.to(device), padded_map.to(device), None, 5 * 70)
    assert torch.equal(padded.cpu(), ref.permute_with_map(x, padded_map, None, 5 * 70))


def gemms(device: str) -> None:
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([0, 1, 37, 0, 70, 5])  # empty and single-row experts
    rows = int(counts.sum())
    for dtype in (torch.float32, torch.bfloat16):
        # 16-bit products run on the device's fastest kernel ("auto": wgmma on sm_90, the
        # emulator's device too) and, by name, on the mma.sync kernel that auto passes over there.
        for backend in ("auto",) if dtype == torch.float32 else ("auto", "mma"):
            for hidden, ffn in [(40, 24), (72, 56)]:  # K, N not multiples of a tile; 8-aligned
                a = torch.randn(rows, hidden, generator=g).to(dtype)
                w_up = (torch.randn(6, hidden, 2 * ffn, generator=g) / hidden**0.5).to(dtype)
                w_down = (torch.randn(6, ffn, hidden, generator=g) / ffn**0.5).to(dtype)
                dev = [t.to(device).requires_grad_() for t in (a, w_up, w_down)]
                dev_counts = counts.to(device)
                h = mk.grouped_gemm_swiglu(dev[0], dev[1], dev_counts, backend=backend)
                out = mk.grouped_gemm(h, dev[2], dev_counts, backend=backend)
                pre = ref.grouped_gemm(a.float(), w_up.float(), counts)
                gate, up = pre.chunk(2, dim=1)
                want_h = torch.nn.functional.silu(gate) * up
                what = f"grouped GEMMs ({backend})"
                close(out, ref.grouped_gemm(want_h, w_down.float(), counts), what)
                out.square().sum().backward()  # dgrad (trans_b), wgrad, swiglu_backward
                assert all(t.grad is not None for t in dev)
                close(dev[1].grad[0], torch.zeros(hidden, 2 * ffn), "an empty expert's wgrad")
        # The standalone activation (gpt-oss's variant, whose clamps bite at these sizes), and
        # its backward, on rows of 16 bytes' packs and of single elements.
        for half in (24, 13):
            pre = (3 * torch.randn(rows, 2 * half, generator=g)).to(dtype)
            variant = dict(alpha=1.702, limit=2.0, up_offset=1.0)
            on_device = pre.to(device).requires_grad_()
            out = mk.swiglu(on_device, **variant)
            close(out, ref.swiglu(pre.float(), **variant), "swiglu")
            out.sum().backward()
            assert on_device.grad is not None


def segments(device: str) -> None:
    counts = torch.tensor([[2, 0, 1], [0, 0, 4], [3, 1, 0]])  # [ranks, local experts]
    x = torch.randn(int(counts.sum()), 10)
    got = mk.transpose_segments(x.to(device), counts.to(device))
    assert torch.equal(got.cpu(), ref.transpose_segments(x, counts))


def launch_every_kernel(device: str) -> None:
    for part in (route, balance, permute_rows, capacity, gemms, segments):
        part(device)
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def kernel_trace(device: str) -> Iterator[list[str]]:
    """Collects the names of the kernels launched inside the block."""
    names: list[str] = []
    if device == "emu":
        emulated_launches(reset=True)
        yield names
        names.extend(emulated_launches())
        return
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        yield names
    names.extend(event.name for event in profile.events() if event.device_type.name == "CUDA")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "emu"])
    parser.add_argument("--schedule", default="forward", choices=["forward", "reverse", "random"])
    parser.add_argument("--check-coverage", action="store_true")
    args = parser.parse_args()
    emulating = emulate(args.schedule) if args.device == "emu" else contextlib.nullcontext()
    device = "cpu" if args.device == "emu" else "cuda"
    with emulating:
        if not args.check_coverage:
            launch_every_kernel(device)
            print("every kernel launched; results match the reference")
            return
        with kernel_trace(args.device) as names:
            launch_every_kernel(device)
    declared = declared_kernels()
    missing = declared - launched(names, declared)
    print(f"{len(declared) - len(missing)} of {len(declared)} kernels launched")
    if missing:
        sys.exit(f"never launched: {', '.join(sorted(missing))}")


if __name__ == "__main__":
    main()
