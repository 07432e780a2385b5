// An NVTX3 range named "moe_kernels::<op>" around every op, so Nsight Systems shows each call
// on the timeline. NVTX3 is header-only; without a profiler attached a range costs a few ns.
#pragma once

#if defined(MOE_KERNELS_WITH_NVTX)
#include <nvtx3/nvtx3.hpp>

namespace moe_kernels {
struct NvtxDomain {
  static constexpr char const* name{"moe_kernels"};
};
}  // namespace moe_kernels

// The registered string is created once per op; the range lives until the end of the scope.
#define MOE_KERNELS_NVTX_RANGE(op)                                                   \
  static const nvtx3::registered_string_in<::moe_kernels::NvtxDomain> nvtx_op_name_{ \
      "moe_kernels::" op};                                                           \
  const nvtx3::scoped_range_in<::moe_kernels::NvtxDomain> nvtx_op_range_ { nvtx_op_name_ }
#else
#define MOE_KERNELS_NVTX_RANGE(op) \
  do {                             \
  } while (false)
#endif
