// Fibers for the CUDA emulator: one per emulated CUDA thread, switched cooperatively on the OS
// thread that runs the launch. On x86-64 a hand-written switch saves the six callee-saved
// registers and swaps stacks (about 10 ns); elsewhere, or with MOE_KERNELS_EMU_UCONTEXT defined,
// ucontext (about 180 ns: it makes a sigprocmask system call on every switch).
#pragma once

#include <cstddef>

#if !defined(__x86_64__) || defined(MOE_KERNELS_EMU_UCONTEXT)
#define MOE_KERNELS_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace moe_kernels::emu {

// A 64 KB stack with a guard page below it, mapped once and reused by every launch.
class FiberStack {
 public:
  FiberStack();
  ~FiberStack();
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;

  char* top() const { return base_ + kSize; }

  static constexpr size_t kSize = 64 * 1024;

 private:
  char* mapping_;
  char* base_;
};

// The saved execution state of a suspended fiber, or of the scheduler while a fiber runs.
struct FiberContext {
#if defined(MOE_KERNELS_EMU_USE_UCONTEXT)
  ucontext_t context;
#else
  void* stack_pointer = nullptr;
#endif
  void (*entry)(void*) = nullptr;  // what a new fiber runs
  void* arg = nullptr;
  // The stack's bounds, for AddressSanitizer (learnt on the first switch away from a context
  // whose stack is not a FiberStack, such as the scheduler's).
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
};

// Prepares `fiber` to run entry(arg) on `stack` the first time it is switched to. `entry` must
// never return: a fiber ends by switching away for good.
void make_fiber(FiberContext& fiber, FiberStack& stack, void (*entry)(void*), void* arg);

// Saves the running context in `from` and resumes `to`.
void switch_fiber(FiberContext& from, FiberContext& to);

}  // namespace moe_kernels::emu
