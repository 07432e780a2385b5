"""The package as installed: what was built, and what importing it does."""

import os
import shutil
import subprocess
import sys

import pytest

import moe_kernels as mk
from conftest import has_kernel
from moe_kernels.emulator import emulated_ops

OPS = [
    "biased_topk",
    "biased_topk_backward",
    "expert_histogram",
    "update_bias",
    "permute",
    "permute_with_map",
    "unpermute",
    "unpermute_weights_grad",
    "drop_over_capacity",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "grouped_gemm_swiglu",
    "swiglu",
    "swiglu_backward",
    "transpose_segments",
]


def test_every_op_has_a_cpu_kernel():
    assert all(has_kernel(op, "CPU") for op in OPS)


def test_every_cuda_kernel_runs_on_the_emulator():
    assert emulated_ops() == sorted(OPS)


def test_cuda_kernels_are_registered_exactly_when_built():
    info = mk.build_info()
    for op in OPS:
        assert has_kernel(op, "CUDA") == info["cuda"]
    if info["cuda"]:
        assert info["cuda_archs"]


def test_import_never_initialises_cuda():
    code = "import torch, moe_kernels; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
def test_native_module_links_openmp():
    # ATen's OpenMP backend is inlined into the extension: built without OpenMP, every
    # at::parallel_for would silently run on one thread.
    out = subprocess.run(
        ["readelf", "-d", mk._C.__file__], capture_output=True, text=True, check=True
    )
    assert "libgomp" in out.stdout


def _cuobjdump() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "cuobjdump")):
            return os.path.join(root, "bin", "cuobjdump")
    return shutil.which("cuobjdump")


@pytest.mark.skipif(
    not mk.build_info()["cuda"] or _cuobjdump() is None, reason="needs the CUDA build and cuobjdump"
)
def test_cuda_code_is_built_for_the_requested_archs():
    # TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX) decides the machine code in the module, and
    # "+PTX" adds the PTX that a GPU newer than every listed architecture compiles at load time
    # (without it, such a GPU fails with "no kernel image" at the first launch).
    archs = mk.build_info()["cuda_archs"].split(",")
    wanted_elf = {"sm_" + arch.removesuffix("+PTX").replace(".", "") for arch in archs}
    wanted_ptx = {
        "sm_" + arch.removesuffix("+PTX").replace(".", "")
        for arch in archs
        if arch.endswith("+PTX")
    }

    def listed(flag: str, suffix: str) -> set[str]:
        out = subprocess.run(
            [_cuobjdump(), flag, mk._C.__file__], capture_output=True, text=True, check=True
        )
        return {name.split(".")[-2] for name in out.stdout.split() if name.endswith(suffix)}

    assert listed("--list-elf", ".cubin") == wanted_elf
    assert listed("--list-ptx", ".ptx") == wanted_ptx
