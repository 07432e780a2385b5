"""Fused Mixture-of-Experts kernels for PyTorch, with auxiliary-loss-free load balancing.

Importing the package loads the native library (``moe_kernels._C``), which registers the ops
under ``torch.ops.moe_kernels``, then their fake kernels and autograd formulas. It never
initialises CUDA, so it imports on machines without a GPU.
"""

import torch  # the native library links against torch: load torch first

# The native library registers the ops (torch.ops.moe_kernels.*); _meta and _autograd then add
# their fake kernels and autograd formulas.
from . import _C, _autograd, _meta  # noqa: F401
from .balancer import Balancer
from .layer import MoELayer, moe_layers, total_aux_loss, update_balance
from .memory import keep_freed_memory
from .ops import (
    biased_topk,
    drop_over_capacity,
    expert_capacity,
    expert_histogram,
    grouped_gemm,
    grouped_gemm_swiglu,
    grouped_gemm_wgrad,
    padded_tokens_per_expert,
    permute,
    permute_with_map,
    swiglu,
    swiglu_backward,
    transpose_segments,
    unpermute,
    update_bias,
)

__version__ = "0.1.0"


def build_info() -> dict[str, object]:
    """How the native library was built: ``{"cuda": bool, "cuda_archs": str, "nccl": str | None
    (the version of the NCCL library the direct transport links), "nvtx": bool,
    "grouped_gemm": {device: kernel}}``.

    ``"grouped_gemm"`` names what ``backend="auto"`` runs the grouped GEMM ops with on each
    device of this process: ``{"cpu": "cpu"}`` (one BLAS call per expert), and in a CUDA build
    for each visible GPU, as ``"cuda:0 (NVIDIA H200, sm_90)"``, the kernel bf16/fp16 operands
    with K and N multiples of 8 get: ``"wgmma"`` (sm_90), ``"mma"`` (mma.sync, sm_80 on) or
    ``"simt"`` (fp32, fp64 and unaligned shapes run ``"simt"`` on every GPU). Listing the GPUs
    initialises CUDA.
    """
    info = _C.build_info()
    return {
        "cuda": info["cuda"] == "1",
        "cuda_archs": info["cuda_archs"],
        "nccl": info["nccl"] or None,
        "nvtx": info["nvtx"] == "1",
        "grouped_gemm": _grouped_gemm_auto_kernels(),
    }


def _grouped_gemm_auto_kernels() -> dict[str, str]:
    kernels = {"cpu": "cpu"}
    if hasattr(_C, "grouped_gemm_auto_kernel") and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            name = f"cuda:{index} ({props.name}, sm_{props.major}{props.minor})"
            kernels[name] = _C.grouped_gemm_auto_kernel(props.major, props.minor)
    return kernels


__all__ = [
    "Balancer",
    "MoELayer",
    "biased_topk",
    "build_info",
    "drop_over_capacity",
    "expert_capacity",
    "expert_histogram",
    "grouped_gemm",
    "grouped_gemm_swiglu",
    "grouped_gemm_wgrad",
    "keep_freed_memory",
    "moe_layers",
    "padded_tokens_per_expert",
    "permute",
    "permute_with_map",
    "swiglu",
    "swiglu_backward",
    "total_aux_loss",
    "transpose_segments",
    "unpermute",
    "update_balance",
    "update_bias",
]
