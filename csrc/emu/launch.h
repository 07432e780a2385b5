// emu::launch<Kernel>(grid, block, shared_bytes, args...): what `kernel<<<...>>>(args...)` becomes
// when kernels run on the CPU emulator.
#pragma once

#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "emu/mode.h"
#include "emu/scheduler.h"

namespace moe_kernels::emu {

// The kernel's name as the compiler spells the template argument, for error messages.
template <auto Kernel>
std::string kernel_name() {
  const std::string_view pretty = __PRETTY_FUNCTION__;
  const size_t start = pretty.find("Kernel = ");
  if (start == std::string_view::npos) return std::string(pretty);
  const std::string_view rest = pretty.substr(start + 9);
  return std::string(rest.substr(0, rest.find_first_of(";]")));
}

template <typename... Params>
struct KernelCall {
  void (*kernel)(Params...);
  std::tuple<std::decay_t<Params>...> args;  // converted once, as the CUDA runtime does

  static void invoke(void* self) {
    auto& call = *static_cast<KernelCall*>(self);
    std::apply(call.kernel, call.args);  // every thread gets its own copy of the parameters
  }
};

template <auto Kernel, typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   Args&&... args) {
  KernelCall<Params...> call{kernel, {std::forward<Args>(args)...}};
  const Mode mode = current_mode();
  const LaunchSpec spec{kernel_name<Kernel>(),
                        reinterpret_cast<const void*>(Kernel),
                        grid,
                        block,
                        shared_bytes,
                        mode.schedule,
                        mode.seed};
  note_emulated_launch(spec.kernel_name);
  run_launch(spec, &KernelCall<Params...>::invoke, &call);
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  launch_kernel<Kernel>(Kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
}

}  // namespace moe_kernels::emu
