// transpose_segments for CUDA tensors: checks, device guard, allocation, current stream.
// Compiled twice: for the CUDA build, and for the CPU emulator (moe_kernels.emulate()). Unlike
// the CPU op, this one does not check the counts' values (that would synchronise the host with
// the device): the kernels clamp them, as the launcher says.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "comm/transpose_segments.h"
#include "comm/transpose_segments_launch.h"
#include "common/dispatch.h"
#include "common/nvtx.h"
#include "device/torch_device.h"

namespace moe_kernels::comm::MOE_KERNELS_TARGET {

at::Tensor transpose_segments_cuda(const at::Tensor& rows_in, const at::Tensor& counts_in) {
  MOE_KERNELS_NVTX_RANGE("transpose_segments");
  check_transpose_segments_args(rows_in, counts_in);
  const device::DeviceGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const int64_t A = counts.size(0), B = counts.size(1);
  auto workspace = at::empty({2 * A * B + 1}, counts.options());
  auto out = at::empty_like(rows);
  MOE_KERNELS_DISPATCH_FLOATING(rows.scalar_type(), "transpose_segments_cuda", [&] {
    device::check_launch(launch_transpose_segments(
        device::device_ptr<scalar_t>(rows), rows.size(0), rows.size(1),
        counts.const_data_ptr<int64_t>(), A, B, workspace.mutable_data_ptr<int64_t>(),
        device::mutable_device_ptr<scalar_t>(out), device::current_stream()));
  });
  return out;
}

}  // namespace moe_kernels::comm::MOE_KERNELS_TARGET

#if !defined(MOE_KERNELS_EMULATOR)
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("transpose_segments", &moe_kernels::comm::cuda::transpose_segments_cuda);
}
#endif
