// Torch-free entry points of the grouped GEMM kernels: a problem (grouped_gemm_problem.h), a
// stream. T is a device storage type (float, double, device::bf16, device::fp16).
#pragma once

#include <cstdint>

#include "device/runtime_api.h"
#include "device/types.h"
#include "grouped_gemm/grouped_gemm_problem.h"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {

// Which kernel a problem runs on: wgmma + TMA (sm_90a), mma.sync (sm_80+), or SIMT.
enum class GemmPath : int { kTensorCore = 0, kSimt = 1, kWgmma = 2 };

// The tensor-core kernel a caller asks for: the fastest one the device has (kAuto), or one by
// name, to compare them (backend "wgmma" / "mma"); a kernel the device or the problem cannot run
// is cudaErrorNotSupported.
enum class GemmKernel : int { kAuto = 0, kWgmma = 1, kMma = 2 };

// Tensor cores for bf16 / fp16 operands whose rows all start 16-byte aligned (K, N and the
// SwiGLU half multiples of 8); the SIMT kernel otherwise.
template <typename T>
GemmPath gemm_path(const GroupedGemmProblem& p);

// The kernel GemmKernel::kAuto runs for aligned 16-bit operands on a device of compute
// capability major.minor: wgmma on sm_90 when this build has the sm_90a kernel, mma.sync from
// sm_80, SIMT before. The emulator has every kernel.
GemmPath auto_gemm_path(int major, int minor);

// Two kernels on `stream`, no host synchronisation: the tile schedule from tokens_per_expert
// into p.workspace, then the GEMM. Layouts: kRows takes a K-major lhs; kReduction an M-major lhs
// and an N-major rhs (the weight gradient); anything else is cudaErrorInvalidValue.
template <typename T>
cudaError_t launch_grouped_gemm(const GroupedGemmProblem& p, GemmKernel kernel,
                                cudaStream_t stream);

// out [rows, half] = swiglu of pre [rows, 2 * half] = [gate | up] (the variant `glu`).
template <typename T>
cudaError_t launch_swiglu(const T* pre, int64_t rows, int64_t half, GluParams glu, T* out,
                          cudaStream_t stream);

// grad_pre [rows, 2 * half] from grad_out [rows, half] and pre [rows, 2 * half].
template <typename T>
cudaError_t launch_swiglu_backward(const T* grad_out, const T* pre, int64_t rows, int64_t half,
                                   GluParams glu, T* grad_pre, cudaStream_t stream);

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET
