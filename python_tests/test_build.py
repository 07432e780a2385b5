"""The package as installed: what was built, and what importing it does."""

import shutil
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk

from conftest import has_kernel

OPS = ["biased_topk", "biased_topk_backward", "expert_histogram", "update_bias", "permute",
       "permute_with_map", "unpermute", "unpermute_weights_grad", "grouped_gemm", "grouped_gemm_wgrad"]


def test_every_op_has_a_cpu_kernel():
    assert all(has_kernel(op, "CPU") for op in OPS)


def test_cuda_kernels_are_registered_exactly_when_built():
    info = mk.build_info()
    for op in ("expert_histogram", "update_bias"):
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
    out = subprocess.run(["readelf", "-d", mk._C.__file__], capture_output=True, text=True, check=True)
    assert "libgomp" in out.stdout
