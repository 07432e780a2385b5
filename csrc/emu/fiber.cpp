#include "emu/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace moe_kernels::emu {
namespace {

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer must be told of every stack switch, or it takes the fibers' stacks for
// overflows. The context switched from learns its stack's bounds here (the scheduler's stack is
// not a FiberStack), so that switching back to it can name them.
thread_local FiberContext* switched_from = nullptr;

void finish_switch(void* fake_stack) {
  __sanitizer_finish_switch_fiber(fake_stack, &switched_from->stack_bottom,
                                  &switched_from->stack_size);
}

// A failed launch abandons fibers in the middle of calls, whose redzones stay poisoned on the
// stack that the next launch reuses: a new fiber starts on a clean one.
void clean_stack(FiberStack& stack) {
  ASAN_UNPOISON_MEMORY_REGION(stack.top() - FiberStack::kSize, FiberStack::kSize);
}
#else
void finish_switch(void*) {}
void clean_stack(FiberStack&) {}
#endif

// What a new fiber holds whichever switch runs it: its entry, and its stack (clean).
void prepare_fiber(FiberContext& fiber, FiberStack& stack, void (*entry)(void*), void* arg) {
  clean_stack(stack);
  fiber.entry = entry;
  fiber.arg = arg;
  fiber.stack_bottom = stack.top() - FiberStack::kSize;
  fiber.stack_size = FiberStack::kSize;
}

// The first code a new fiber runs.
void start_fiber(void* fiber) {
  finish_switch(nullptr);
  auto* self = static_cast<FiberContext*>(fiber);
  self->entry(self->arg);
  __builtin_unreachable();  // entry switches away for good
}

}  // namespace

FiberStack::FiberStack() {
  const size_t guard = page_size();
  void* mapping = mmap(nullptr, kSize + guard, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapping == MAP_FAILED) throw std::bad_alloc();
  mapping_ = static_cast<char*>(mapping);
  // A kernel that overflows its stack faults on the guard page instead of corrupting memory.
  mprotect(mapping_, guard, PROT_NONE);
  base_ = mapping_ + guard;
}

FiberStack::~FiberStack() { munmap(mapping_, kSize + page_size()); }

#if !defined(MOE_KERNELS_EMU_USE_UCONTEXT)

// moe_emu_switch(void** save_sp, void* load_sp): push the callee-saved registers, store the
// stack pointer, load the other one, pop its registers and return into it. A new fiber's stack
// is laid out by make_fiber so that this "returns" into moe_emu_fiber_start, which calls
// r13(r12). (The x87 and SSE control words are callee-saved too; no kernel changes them, so
// they are not switched.)
asm(R"(
  .text
  .p2align 4
  .globl moe_emu_switch
  .hidden moe_emu_switch
  .type moe_emu_switch, @function
moe_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size moe_emu_switch, .-moe_emu_switch

  .p2align 4
  .globl moe_emu_fiber_start
  .hidden moe_emu_fiber_start
  .type moe_emu_fiber_start, @function
moe_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size moe_emu_fiber_start, .-moe_emu_fiber_start
)");

extern "C" void moe_emu_switch(void** save_sp, void* load_sp);
extern "C" void moe_emu_fiber_start();

void make_fiber(FiberContext& fiber, FiberStack& stack, void (*entry)(void*), void* arg) {
  prepare_fiber(fiber, stack, entry, arg);
  // Registers popped by moe_emu_switch, lowest address first, then its return address. The
  // stack is 16-byte aligned at the call in moe_emu_fiber_start, as the ABI wants.
  auto top = reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uintptr_t*>(top - 72);
  sp[0] = 0;                                                  // r15
  sp[1] = 0;                                                  // r14
  sp[2] = reinterpret_cast<uintptr_t>(&start_fiber);          // r13
  sp[3] = reinterpret_cast<uintptr_t>(&fiber);                // r12
  sp[4] = 0;                                                  // rbx
  sp[5] = 0;                                                  // rbp
  sp[6] = reinterpret_cast<uintptr_t>(&moe_emu_fiber_start);  // return address
  fiber.stack_pointer = sp;
}

void raw_switch(FiberContext& from, FiberContext& to) {
  moe_emu_switch(&from.stack_pointer, to.stack_pointer);
}

#else  // Portable fallback.

namespace {

// makecontext passes only int arguments: the fiber being started is handed over here instead.
thread_local FiberContext* starting = nullptr;

void ucontext_start() { start_fiber(starting); }

}  // namespace

void make_fiber(FiberContext& fiber, FiberStack& stack, void (*entry)(void*), void* arg) {
  prepare_fiber(fiber, stack, entry, arg);
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack.top() - FiberStack::kSize;
  fiber.context.uc_stack.ss_size = FiberStack::kSize;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, ucontext_start, 0);
}

void raw_switch(FiberContext& from, FiberContext& to) {
  starting = &to;
  swapcontext(&from.context, &to.context);
}

#endif

void switch_fiber(FiberContext& from, FiberContext& to) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, to.stack_bottom, to.stack_size);
  switched_from = &from;
  raw_switch(from, to);
  finish_switch(fake_stack);
#else
  raw_switch(from, to);
#endif
}

}  // namespace moe_kernels::emu
