// The CPU emulator's cp.async, behind device/async_copy.h: each thread's copies wait in its
// AsyncCopyQueue until a wait covers their group; under schedule "forward" their bytes are
// written at the issue, under the others at that wait. As on hardware, a wait covers committed
// groups only: a copy issued after the last commit stays in flight, unwritten under "reverse"
// and "random". Misuse (a destination outside shared memory, a misaligned address, src_bytes
// past the copy) fails the launch.
#pragma once

namespace moe_kernels::emu {

// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes.
void async_copy(void* dst, const void* src, int bytes, int src_bytes);
// cp.async.commit_group.
void async_copy_commit();
// cp.async.wait_group in_flight.
void async_copy_wait(int in_flight);

}  // namespace moe_kernels::emu
