// The Hopper grouped GEMM (wgmma_kernels.cuh), torch-free. Compiled for sm_90a only (and for the
// CPU emulator): a CUDA build whose architectures include 9.0 defines MOE_KERNELS_WITH_SM90A.
#pragma once

#include "device/runtime_api.h"
#include "grouped_gemm/grouped_gemm_problem.h"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

#if defined(MOE_KERNELS_EMULATOR) || defined(MOE_KERNELS_WITH_SM90A)
constexpr bool kHasWgmmaKernel = true;
#else
constexpr bool kHasWgmmaKernel = false;
#endif

// Whether the wgmma kernel takes the problem: T 16-bit, operands that tensor maps can describe
// (16-byte aligned origins and rows, which gemm_path's tensor-core conditions already are) and a
// non-empty reduction dimension.
bool wgmma_supports(const GroupedGemmProblem& p);

enum class WgmmaMutation : int;

// The schedule kernel, then the wgmma kernel, on `stream`; the problem's layout as
// launch_grouped_gemm takes it. T: device::bf16 or device::fp16. The emulator also has the
// kernel with each mutation (wgmma_kernels.cuh), for bf16.
template <typename T, WgmmaMutation kMutation>
cudaError_t launch_wgmma_gemm(const GroupedGemmProblem& p, cudaStream_t stream);

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
