// The direct NCCL transport's life cycle, bound to Python (moe_kernels.dispatch.init_nccl):
// rank 0 makes a unique id, the group broadcasts it, every rank creates its communicator.
#pragma once

#include <string>

namespace moe_kernels::comm {

std::string nccl_version();
std::string nccl_unique_id();
void init_nccl_transport(const std::string& group_name, const std::string& unique_id, int rank,
                         int size, int device, double timeout_s);
void release_nccl_transport(const std::string& group_name);

}  // namespace moe_kernels::comm
