"""SwiGLU's CPU row loops (csrc/grouped_gemm/swiglu_cpu_kernel.cpp) in every instruction set they
are compiled for, each in a process of its own with ``ATEN_CPU_CAPABILITY`` set (the copy torch
would run is the copy that runs): the fused epilogue of grouped_gemm_swiglu and swiglu_backward
against torch's silu and silu_backward composed in the accumulator type, on rows whose length is
no multiple of any vector width, on a broadcast gradient (row stride 0) and on a gradient of
column stride 2.

bf16 and fp16 must equal that composition rounded once: both compute in fp32 with Sleef's exp,
the same formulas in the same order. fp32 and fp64 may differ by rounding (torch's own kernels
for those types order the arithmetic differently).
"""

import os
import subprocess
import sys

import pytest

CHECK = r"""
import torch
import torch.nn.functional as F
import moe_kernels  # noqa: F401

ops = torch.ops.moe_kernels
print(torch.backends.cpu.get_cpu_capability())
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for half in (77, 13, 1):
        rows = 29
        a = (2 * torch.randn(rows, 2 * half, generator=g)).to(dtype)
        identity = torch.eye(2 * half, dtype=dtype)[None]
        counts = torch.tensor([rows])
        out, pre = ops.grouped_gemm_swiglu(a, identity, counts, False, "auto", True)
        gate, up = pre[:, :half].to(acc), pre[:, half:].to(acc)
        grads = {
            "dense": torch.randn(rows, half, generator=g).to(dtype),
            "broadcast": torch.randn(1, half, generator=g).to(dtype).expand(rows, half),
            "column stride 2": torch.randn(rows, 2 * half, generator=g).to(dtype)[:, ::2],
        }
        results = [("forward", out, (F.silu(gate) * up).to(dtype))]
        for name, grad in grads.items():
            got = ops.swiglu_backward(grad, pre)
            grad_gate = torch.ops.aten.silu_backward(grad.to(acc) * up, gate).to(dtype)
            grad_up = (F.silu(gate) * grad.to(acc)).to(dtype)
            results.append((f"backward, {name} gradient", got, torch.cat([grad_gate, grad_up], 1)))
        for name, got, want in results:
            where = f"{dtype} half={half} {name}"
            if dtype in (torch.bfloat16, torch.float16):
                assert torch.equal(got, want), where
            else:
                tol = 1e-6 if dtype == torch.float32 else 1e-14
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=where)
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_swiglu_row_loops_of_every_instruction_set(capability):
    env = os.environ | {"ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ran, verdict = done.stdout.split()
    if ran != capability.upper():
        pytest.skip(f"this CPU runs {ran} when {capability} is asked for")
    assert verdict == "ok"
