// The grouped GEMM family for CUDA tensors: checks, device guard, allocation, current stream.
// Compiled twice: for the CUDA build, and for the CPU emulator (moe_kernels.emulate()).
// backend="auto" (or its older name "kernel") runs this package's fastest kernel for the device
// (auto_gemm_path: wgmma + TMA on sm_90, mma.sync from sm_80, SIMT for the rest), "wgmma" and
// "mma" one of them by name, an error where it cannot run; all with no host synchronisation:
// tokens_per_expert stays on the device and is not checked (counts are clamped to the rows that
// exist, so a wrong count gives wrong rows, never an out-of-bounds access). backend="cublas" runs
// one cuBLAS GEMM per expert (grouped_gemm_blas.cpp): it reads the counts on the host, and checks
// them. backend="torch" runs torch._grouped_mm (grouped_gemm_torch.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common/dispatch.h"
#include "common/nvtx.h"
#include "device/torch_device.h"
#include "grouped_gemm/grouped_gemm.h"
#include "grouped_gemm/grouped_gemm_launch.h"

namespace moe_kernels::gemm::MOE_KERNELS_TARGET {
namespace {

// The kernel a backend of this package's kernels asks the launcher for.
GemmKernel gemm_kernel(Backend backend) {
  switch (backend) {
    case Backend::kWgmma:
      return GemmKernel::kWgmma;
    case Backend::kMma:
      return GemmKernel::kMma;
    default:
      return GemmKernel::kAuto;
  }
}

// A kernel asked for by name that cannot run the problem, or not on this device.
void check_named_kernel(cudaError_t err, Backend backend) {
  TORCH_CHECK(err != cudaErrorNotSupported || backend != Backend::kWgmma,
              "backend 'wgmma' needs an sm_90 GPU (and a build for sm_90a) and 16-byte aligned "
              "bf16/fp16 operands (K and N multiples of 8); backend='auto' picks the kernel that "
              "runs");
  TORCH_CHECK(err != cudaErrorNotSupported || backend != Backend::kMma,
              "backend 'mma' needs an sm_80 or newer GPU and 16-byte aligned bf16/fp16 operands "
              "(K and N multiples of 8); backend='auto' picks the kernel that runs");
}

// Operands of c = a_e @ b[e] (or b[e]^T): a is K-major; b[e] is K-major when transposed.
GroupedGemmProblem product_problem(const at::Tensor& a, const at::Tensor& b, bool trans_b) {
  GroupedGemmProblem p;
  p.grouping = Grouping::kRows;
  p.m = a.size(0);
  p.k = a.size(1);
  p.n = b.size(trans_b ? 1 : 2);
  p.lhs = {a.const_data_ptr(), p.k, 0, true};
  p.rhs = {b.const_data_ptr(), trans_b ? p.k : p.n, p.k * p.n, trans_b};
  return p;
}

// Runs the problem's kernels on `like`'s dtype, with the segment counts and a workspace for the
// tile schedule.
void run(GroupedGemmProblem& p, const at::Tensor& tokens_per_expert_in, const at::Tensor& like,
         Backend backend) {
  const at::Tensor tokens_per_expert = tokens_per_expert_in.contiguous();
  p.num_experts = tokens_per_expert.size(0);
  p.tokens_per_expert = tokens_per_expert.const_data_ptr();
  p.tokens_int32 = tokens_per_expert.scalar_type() == at::kInt;
  at::Tensor workspace = at::empty({2 * (p.num_experts + 1)}, like.options().dtype(at::kLong));
  p.workspace = workspace.mutable_data_ptr<int64_t>();
  MOE_KERNELS_DISPATCH_FLOATING(like.scalar_type(), "grouped_gemm_cuda", [&] {
    using T = typename device::DeviceScalar<scalar_t>::type;
    const cudaError_t err =
        launch_grouped_gemm<T>(p, gemm_kernel(backend), device::current_stream());
    check_named_kernel(err, backend);
    device::check_launch(err);
  });
}

}  // namespace

at::Tensor grouped_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                             const at::Tensor& tokens_per_expert_in, bool trans_b,
                             c10::string_view backend) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm");
  const Backend choice =
      check_grouped_gemm_args(a_in, b_in, tokens_per_expert_in, trans_b, backend);
  const device::DeviceGuard guard(a_in.device());
  if (choice == Backend::kCublas) {
    return grouped_gemm_blas(a_in, b_in, tokens_per_expert_in, trans_b);
  }
  if (choice == Backend::kTorch) {
    return grouped_gemm_torch(a_in, b_in, tokens_per_expert_in, trans_b);
  }
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  GroupedGemmProblem p = product_problem(a, b, trans_b);
  auto c = at::empty({p.m, p.n}, a.options());
  p.out = {c.mutable_data_ptr(), p.n, 0};
  run(p, tokens_per_expert_in, a, choice);
  return c;
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_swiglu_cuda(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& tokens_per_expert_in,
    bool trans_b, c10::string_view backend, bool keep_product, double alpha,
    std::optional<double> limit, double up_offset) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm_swiglu");
  const Backend choice =
      check_grouped_gemm_swiglu_args(a_in, b_in, tokens_per_expert_in, trans_b, backend);
  const GluParams glu = check_glu_params(alpha, limit, up_offset);
  const device::DeviceGuard guard(a_in.device());
  if (choice == Backend::kTorch) {
    return grouped_gemm_swiglu_torch(a_in, b_in, tokens_per_expert_in, trans_b, keep_product, glu);
  }
  if (choice == Backend::kCublas) {
    // The library product, then SwiGLU in ATen ops (in fp32, rounded once, as the kernel does);
    // the caching allocator makes a discarded product cheap on a GPU, so it is not blocked.
    return swiglu_of_product(grouped_gemm_blas(a_in, b_in, tokens_per_expert_in, trans_b),
                             keep_product, glu);
  }
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  GroupedGemmProblem p = product_problem(a, b, trans_b);
  p.swiglu = true;
  p.swiglu_half = p.n / 2;
  p.glu = glu;
  auto out = at::empty({p.m, p.swiglu_half}, a.options());
  auto pre = at::empty({keep_product ? p.m : 0, p.n}, a.options());
  p.out = {out.mutable_data_ptr(), p.swiglu_half, 0};
  p.pre = {keep_product ? pre.mutable_data_ptr() : nullptr, p.n, 0};  // null: the epilogue skips it
  run(p, tokens_per_expert_in, a, choice);
  return {out, pre};
}

// grad_b[e] = a_e^T @ grad_c_e ([K, N]); with trans_b, grad_c_e^T @ a_e ([N, K]). The segments
// are the reduction: both operands are read with their rows as K.
at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& a_in, const at::Tensor& grad_c_in,
                                   const at::Tensor& tokens_per_expert_in, bool trans_b,
                                   c10::string_view backend) {
  MOE_KERNELS_NVTX_RANGE("grouped_gemm_wgrad");
  const Backend choice =
      check_grouped_gemm_wgrad_args(a_in, grad_c_in, tokens_per_expert_in, backend);
  const device::DeviceGuard guard(a_in.device());
  if (choice == Backend::kCublas) {
    return grouped_gemm_wgrad_blas(a_in, grad_c_in, tokens_per_expert_in, trans_b);
  }
  if (choice == Backend::kTorch) {
    return grouped_gemm_wgrad_torch(a_in, grad_c_in, tokens_per_expert_in, trans_b);
  }
  const at::Tensor a = a_in.contiguous(), grad_c = grad_c_in.contiguous();
  const at::Tensor& lhs = trans_b ? grad_c : a;
  const at::Tensor& rhs = trans_b ? a : grad_c;
  GroupedGemmProblem p;
  p.grouping = Grouping::kReduction;
  p.m = lhs.size(1);
  p.n = rhs.size(1);
  p.k = a.size(0);
  p.lhs = {lhs.const_data_ptr(), p.m, 0, false};
  p.rhs = {rhs.const_data_ptr(), p.n, 0, false};
  auto grad_b = at::empty({tokens_per_expert_in.size(0), p.m, p.n}, a.options());
  p.out = {grad_b.mutable_data_ptr(), p.n, p.m * p.n};
  run(p, tokens_per_expert_in, a, choice);
  return grad_b;
}

std::string auto_kernel_name(int major, int minor) {
  switch (auto_gemm_path(major, minor)) {
    case GemmPath::kWgmma:
      return "wgmma";
    case GemmPath::kTensorCore:
      return "mma";
    case GemmPath::kSimt:
      return "simt";
  }
  return "simt";
}

at::Tensor swiglu_cuda(const at::Tensor& pre_in, double alpha, std::optional<double> limit,
                       double up_offset) {
  MOE_KERNELS_NVTX_RANGE("swiglu");
  check_swiglu_args(pre_in);
  const GluParams glu = check_glu_params(alpha, limit, up_offset);
  const device::DeviceGuard guard(pre_in.device());
  const at::Tensor pre = pre_in.contiguous();
  auto out = at::empty({pre.size(0), pre.size(1) / 2}, pre.options());
  MOE_KERNELS_DISPATCH_FLOATING(pre.scalar_type(), "swiglu_cuda", [&] {
    device::check_launch(launch_swiglu(device::device_ptr<scalar_t>(pre), pre.size(0), out.size(1),
                                       glu, device::mutable_device_ptr<scalar_t>(out),
                                       device::current_stream()));
  });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& pre_in,
                                double alpha, std::optional<double> limit, double up_offset) {
  MOE_KERNELS_NVTX_RANGE("swiglu_backward");
  check_swiglu_backward_args(grad_out_in, pre_in);
  const GluParams glu = check_glu_params(alpha, limit, up_offset);
  const device::DeviceGuard guard(pre_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), pre = pre_in.contiguous();
  auto grad_pre = at::empty_like(pre);
  MOE_KERNELS_DISPATCH_FLOATING(pre.scalar_type(), "swiglu_backward_cuda", [&] {
    device::check_launch(launch_swiglu_backward(
        device::device_ptr<scalar_t>(grad_out), device::device_ptr<scalar_t>(pre), pre.size(0),
        grad_out.size(1), glu, device::mutable_device_ptr<scalar_t>(grad_pre),
        device::current_stream()));
  });
  return grad_pre;
}

}  // namespace moe_kernels::gemm::MOE_KERNELS_TARGET

#if !defined(MOE_KERNELS_EMULATOR)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("grouped_gemm", &moe_kernels::gemm::cuda::grouped_gemm_cuda);
  m.impl("grouped_gemm_swiglu", &moe_kernels::gemm::cuda::grouped_gemm_swiglu_cuda);
  m.impl("grouped_gemm_wgrad", &moe_kernels::gemm::cuda::grouped_gemm_wgrad_cuda);
  m.impl("swiglu", &moe_kernels::gemm::cuda::swiglu_cuda);
  m.impl("swiglu_backward", &moe_kernels::gemm::cuda::swiglu_backward_cuda);
}
#endif
