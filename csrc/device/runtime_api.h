// The CUDA runtime API for launchers and host code (types, errors, device attributes): the
// toolkit's, or the CPU emulator's under MOE_KERNELS_EMULATOR. Also names the namespace that
// holds everything compiled per target, so the CUDA build and the emulated build of the same
// kernel never share a symbol when both are linked into one module:
//   namespace moe_kernels::routing::inline MOE_KERNELS_TARGET { ... }
#pragma once

#if defined(MOE_KERNELS_EMULATOR)
#include "emu/runtime_api.h"
#define MOE_KERNELS_TARGET emulated
#else
#include <cuda_runtime_api.h>
#define MOE_KERNELS_TARGET cuda
#endif
