// Every op's schema, declared once. Kernels register per dispatch key in their own files
// (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered in moe_kernels/_meta.py and
// moe_kernels/_autograd.py. pybind11 carries only what is not an op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <map>
#include <string>
#include <tuple>

#include "comm/dispatch.h"
#include "emu/mode.h"

#if defined(MOE_KERNELS_WITH_NCCL)
#include "comm/nccl_transport.h"
#endif
#if defined(MOE_KERNELS_WITH_CUDA)
#include "grouped_gemm/grouped_gemm.h"
#endif

namespace moe_kernels::emu::selftest {
void bind(pybind11::module_& m);
}

TORCH_LIBRARY(moe_kernels, m) {
  // Routing (SPEC.md section 1).
  m.def(
      "biased_topk(Tensor logits, Tensor? bias, int k, str score_fn=\"sigmoid\", int n_groups=1, "
      "int topk_groups=1, bool normalize=True, float scale=1.0, str group_score=\"top2\", "
      "Tensor? token_mask=None, float norm_eps=0.0, float norm_min=0.0, "
      "str choose_on=\"scores\") -> "
      "(Tensor topk_weights, Tensor topk_ids, Tensor tokens_per_expert)");
  m.def(
      "biased_topk_backward(Tensor grad_weights, Tensor logits, Tensor topk_ids, str score_fn, "
      "bool normalize, float scale, float norm_eps=0.0, float norm_min=0.0) -> Tensor");
  m.def("expert_histogram(Tensor topk_ids, int num_experts) -> Tensor");

  // Loss-free balancing (SPEC.md section 2).
  m.def(
      "update_bias(Tensor(a!) bias, Tensor tokens_per_expert, float rate, str rule=\"sign\", "
      "bool centered=False) -> ()");

  // Permutation (SPEC.md section 3).
  m.def(
      "permute(Tensor hidden, Tensor topk_ids, int num_experts, int align=1) -> "
      "(Tensor rows, Tensor row_map, Tensor tokens_per_expert)");
  m.def(
      "permute_with_map(Tensor hidden, Tensor row_map, Tensor? topk_weights, int num_rows) -> "
      "Tensor");
  m.def("unpermute(Tensor rows, Tensor row_map, Tensor? topk_weights) -> Tensor");
  m.def("unpermute_weights_grad(Tensor grad_output, Tensor rows, Tensor row_map) -> Tensor");
  m.def(
      "drop_over_capacity(Tensor topk_ids, Tensor? topk_weights, int num_experts, int capacity, "
      "str policy=\"probs\") -> (Tensor kept_ids, Tensor slots, Tensor dropped_per_expert)");

  // Grouped GEMM (SPEC.md section 4).
  m.def(
      "grouped_gemm(Tensor a, Tensor b, Tensor tokens_per_expert, bool trans_b=False, "
      "str backend=\"auto\") -> Tensor");
  m.def(
      "grouped_gemm_wgrad(Tensor a, Tensor grad_c, Tensor tokens_per_expert, bool trans_b=False, "
      "str backend=\"auto\") -> Tensor");
  m.def(
      "grouped_gemm_swiglu(Tensor a, Tensor b, Tensor tokens_per_expert, bool trans_b=False, "
      "str backend=\"auto\", bool keep_product=True, float alpha=1.0, float? limit=None, "
      "float up_offset=0.0) -> (Tensor out, Tensor pre)");
  m.def("swiglu(Tensor pre, float alpha=1.0, float? limit=None, float up_offset=0.0) -> Tensor");
  m.def(
      "swiglu_backward(Tensor grad_out, Tensor pre, float alpha=1.0, float? limit=None, "
      "float up_offset=0.0) -> Tensor");

  // Expert-parallel dispatch and combine (SPEC.md section 5; csrc/comm/dispatch.cpp): the row
  // movement over a group, and the reordering of the received rows by local expert.
  m.def("transpose_segments(Tensor rows, Tensor counts) -> Tensor");
  m.def(
      "ep_plan(Tensor rows, Tensor tokens_per_expert, str group_name, "
      "str transport=\"process_group\") -> (Tensor send_grid, Tensor recv_counts, "
      "Tensor recv_counts_device, Tensor group_tokens_per_expert)");
  m.def(
      "ep_dispatch_rows(Tensor rows, Tensor recv_counts, int[] send_grid, int[] recv_grid, "
      "str group_name, str transport=\"process_group\", str layout=\"transpose\") -> Tensor");
  m.def(
      "ep_combine_rows(Tensor expert_rows, Tensor recv_counts, int[] send_grid, "
      "int[] recv_grid, str group_name, str transport=\"process_group\", "
      "str layout=\"transpose\") -> Tensor");
}

namespace {

std::map<std::string, std::string> build_info() {
  std::map<std::string, std::string> info;
#if defined(MOE_KERNELS_WITH_CUDA)
  info["cuda"] = "1";
  info["cuda_archs"] = MOE_KERNELS_CUDA_ARCHS;
#else
  info["cuda"] = "0";
  info["cuda_archs"] = "";
#endif
#if defined(MOE_KERNELS_WITH_NCCL)
  info["nccl"] = moe_kernels::comm::nccl_version();
#else
  info["nccl"] = "";
#endif
#if defined(MOE_KERNELS_WITH_NVTX)
  info["nvtx"] = "1";
#else
  info["nvtx"] = "0";
#endif
  return info;
}

void set_emulation(bool enabled, const std::string& schedule, uint64_t seed) {
  using moe_kernels::emu::Schedule;
  const std::map<std::string, Schedule> schedules{{"forward", Schedule::kForward},
                                                  {"reverse", Schedule::kReverse},
                                                  {"random", Schedule::kRandom}};
  const auto it = schedules.find(schedule);
  TORCH_CHECK(it != schedules.end(),
              "schedule must be one of 'forward', 'reverse', 'random', got '", schedule, "'");
  moe_kernels::emu::set_mode({enabled, it->second, seed});
}

std::tuple<bool, std::string, uint64_t> emulation() {
  const auto mode = moe_kernels::emu::current_mode();
  const char* names[] = {"forward", "reverse", "random"};
  return {mode.enabled, names[static_cast<int>(mode.schedule)], mode.seed};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_kernels native library: ops are in torch.ops.moe_kernels";
  m.def("build_info", &build_info, "How this module was built: CUDA kernels, archs, NVTX.");
#if defined(MOE_KERNELS_WITH_CUDA)
  m.def("grouped_gemm_auto_kernel", &moe_kernels::gemm::cuda::auto_kernel_name,
        pybind11::arg("major"), pybind11::arg("minor"),
        "The grouped GEMM kernel backend='auto' runs on a device of compute capability "
        "major.minor: 'wgmma', 'mma' or 'simt'.");
#endif
  m.def("set_emulation", &set_emulation,
        "Run the CUDA kernels of the ops on the CPU emulator (or not), under a schedule.");
  m.def("emulation", &emulation, "(enabled, schedule, seed) of the CPU emulator.");
  m.def("emulated_ops", &moe_kernels::emu::emulated_ops,
        "The ops whose CUDA kernel runs on the CPU emulator under moe_kernels.emulate().");
  m.def("emulated_launches", &moe_kernels::emu::emulated_launches, pybind11::arg("reset") = false,
        "{kernel name: launches} on the CPU emulator since the last reset.");
  pybind11::class_<moe_kernels::comm::PendingRows>(
      m, "PendingRows", "Rows of an expert-parallel dispatch or combine in flight.")
      .def("arrive", &moe_kernels::comm::PendingRows::arrive,
           pybind11::call_guard<pybind11::gil_scoped_release>(),
           "Waits for the transfer (on GPUs, orders the current stream after it).")
      .def("take", &moe_kernels::comm::PendingRows::take,
           "The rows, grouped as the op would return them. Once.");
  m.def("ep_start_dispatch_rows", &moe_kernels::comm::start_dispatch_rows, pybind11::arg("rows"),
        pybind11::arg("recv_counts"), pybind11::arg("send_grid"), pybind11::arg("recv_grid"),
        pybind11::arg("group_name"), pybind11::arg("transport"), pybind11::arg("layout"),
        "ep_dispatch_rows, started: the rows travel until PendingRows.take().");
  m.def("ep_start_combine_rows", &moe_kernels::comm::start_combine_rows,
        pybind11::arg("expert_rows"), pybind11::arg("recv_counts"), pybind11::arg("send_grid"),
        pybind11::arg("recv_grid"), pybind11::arg("group_name"), pybind11::arg("transport"),
        pybind11::arg("layout"),
        "ep_combine_rows, started: the rows travel until PendingRows.take().");
#if defined(MOE_KERNELS_WITH_NCCL)
  m.def(
      "nccl_unique_id", [] { return pybind11::bytes(moe_kernels::comm::nccl_unique_id()); },
      "A new ncclUniqueId, as bytes (rank 0 makes it, the group broadcasts it).");
  m.def("init_nccl_transport", &moe_kernels::comm::init_nccl_transport, pybind11::arg("group_name"),
        pybind11::arg("unique_id"), pybind11::arg("rank"), pybind11::arg("size"),
        pybind11::arg("device"), pybind11::arg("timeout_s"),
        "Creates this rank's NCCL communicator of the direct transport of a group (collective).");
  m.def("release_nccl_transport", &moe_kernels::comm::release_nccl_transport,
        "Destroys the NCCL communicator of a group's direct transport, if any.");
#endif
  auto selftest = m.def_submodule("emulator_selftest", "Kernels that test the emulator itself.");
  moe_kernels::emu::selftest::bind(selftest);
}
