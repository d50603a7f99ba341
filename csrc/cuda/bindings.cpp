// pybind11 module treedec._cuda: the CUDA kernels behind raw device pointers (Python ints), sizes
// and a cudaStream_t passed as an int (torch.cuda.current_stream().cuda_stream). No torch headers,
// so one build works with any torch version. Argument checking lives in treedec.ops; launches are
// asynchronous on the given stream and raise RuntimeError if the launch itself fails.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "treedec_cuda.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check(cudaError_t status, const char* op) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("treedec._cuda.") + op + ": " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
}

void build_tree(std::uintptr_t parents, std::uintptr_t depth, std::uintptr_t tree_mask, int64_t batch,
                int64_t num_nodes, std::uintptr_t stream) {
  check(treedec::launch_build_tree(as_ptr<const int32_t>(parents), as_ptr<int32_t>(depth),
                                   as_ptr<int32_t>(tree_mask), batch, num_nodes, as_stream(stream)),
        "build_tree");
}

void verify_greedy(std::uintptr_t parents, std::uintptr_t tokens, std::uintptr_t target, std::uintptr_t accept_len,
                   std::uintptr_t accept_nodes, std::uintptr_t bonus, int64_t batch, int64_t num_nodes,
                   std::uintptr_t stream) {
  check(treedec::launch_verify_greedy(as_ptr<const int32_t>(parents), as_ptr<const int64_t>(tokens),
                                      as_ptr<const int64_t>(target), as_ptr<int32_t>(accept_len),
                                      as_ptr<int32_t>(accept_nodes), as_ptr<int64_t>(bonus), batch, num_nodes,
                                      as_stream(stream)),
        "verify_greedy");
}

void sample_tokens(std::uintptr_t probs, std::uintptr_t uniforms, std::uintptr_t tokens, int64_t rows, int64_t vocab,
                   std::uintptr_t stream) {
  check(treedec::launch_sample_tokens(as_ptr<const float>(probs), as_ptr<const float>(uniforms),
                                      as_ptr<int64_t>(tokens), rows, vocab, as_stream(stream)),
        "sample_tokens");
}

void compact_kv(std::uintptr_t tensor_ptrs, int64_t num_tensors, std::uintptr_t prefix_len,
                std::uintptr_t accept_nodes, int64_t batch, int64_t heads, int64_t seq_len, int64_t head_dim,
                int64_t elem_size, int64_t num_nodes, std::uintptr_t stream) {
  check(treedec::launch_compact_kv(as_ptr<const int64_t>(tensor_ptrs), num_tensors, as_ptr<const int32_t>(prefix_len),
                                   as_ptr<const int32_t>(accept_nodes), batch, heads, seq_len, head_dim, elem_size,
                                   num_nodes, as_stream(stream)),
        "compact_kv");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "treedec CUDA kernels (raw device pointers, sizes, stream); see treedec.ops for the checked API";
  m.def("build_tree", &build_tree, py::arg("parents_ptr"), py::arg("depth_ptr"), py::arg("mask_ptr"), py::arg("B"),
        py::arg("T"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "parents int32 [B,T] -> depth int32 [B,T], tree_mask int32 [B,T,ceil(T/32)]");
  m.def("verify_greedy", &verify_greedy, py::arg("parents_ptr"), py::arg("tokens_ptr"), py::arg("target_ptr"),
        py::arg("accept_len_ptr"), py::arg("accept_nodes_ptr"), py::arg("bonus_ptr"), py::arg("B"), py::arg("T"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "parents int32, tokens/target int64 [B,T] -> accept_len int32 [B], accept_nodes int32 [B,T], bonus int64 [B]");
  m.def("sample_tokens", &sample_tokens, py::arg("probs_ptr"), py::arg("uniforms_ptr"), py::arg("tokens_ptr"),
        py::arg("N"), py::arg("V"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "probs float32 [N,V], uniforms float32 [N] -> tokens int64 [N] (inverse CDF)");
  m.def("compact_kv", &compact_kv, py::arg("ptr_array_ptr"), py::arg("num_tensors"), py::arg("prefix_len_ptr"),
        py::arg("accept_nodes_ptr"), py::arg("B"), py::arg("H"), py::arg("S"), py::arg("D"), py::arg("elem_size"),
        py::arg("T"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "in place over num_tensors contiguous [B,H,S,D] caches whose int64 data pointers are at ptr_array_ptr "
        "(device memory)");
}
