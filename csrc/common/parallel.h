// at::parallel_for for bodies that call ATen ops.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace moe_kernels {

// A worker thread starts in the default thread-local state: grad mode on, autograd not
// excluded. An ATen call there on a view of a tensor that requires grad (a saved output such as
// SwiGLU's product) would dispatch to autograd again, and an out= call would be refused. The
// workers take over the caller's state instead (below autograd, no grad, inference mode).
template <typename Body>
void parallel_for_in_caller_state(int64_t begin, int64_t end, int64_t grain, const Body& body) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard guard(caller_state);
    body(first, last);
  });
}

}  // namespace moe_kernels
