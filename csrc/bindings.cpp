// pybind11 bindings of the CPU kernels as `treedec._C`.
//
// Tensors cross as integers (torch's data_ptr()) plus sizes, so the module never includes torch
// headers and one build works with any torch version. treedec.ops validates shapes, dtypes and
// contiguity before calling; every entry point releases the GIL while it runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "treedec_cpu.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(address));
}

treedec::Isa isa_from_name(const std::string& name, treedec::Dtype dtype) {
  if (name.empty() || name == "auto") return treedec::best_isa(dtype);
  if (name == "scalar") return treedec::Isa::kScalar;
  if (name == "avx2") return treedec::Isa::kAvx2;
  if (name == "avx512") return treedec::Isa::kAvx512;
  if (name == "avx512bf16") return treedec::Isa::kAvx512Bf16;
  throw std::invalid_argument("isa must be one of auto, scalar, avx2, avx512, avx512bf16; got " + name);
}

bool isa_runs(treedec::Isa isa, treedec::Dtype dtype) {
  return static_cast<int>(isa) <= static_cast<int>(treedec::best_isa(dtype)) ||
         (isa == treedec::Isa::kAvx512Bf16 && treedec::best_isa(treedec::Dtype::kBFloat16) == isa);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "treedec C++ CPU kernels over raw pointers (see csrc/treedec_cpu.h)";

  m.def(
      "build_tree",
      [](int64_t parents, int64_t depth, int64_t tree_mask, int64_t B, int64_t T, int num_threads) {
        return treedec::build_tree(ptr<const int32_t>(parents), ptr<int32_t>(depth), ptr<int32_t>(tree_mask), B, T,
                                   num_threads);
      },
      py::arg("parents_ptr"), py::arg("depth_ptr"), py::arg("tree_mask_ptr"), py::arg("B"), py::arg("T"),
      py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>(),
      "int32 parents [B,T] -> depth [B,T], tree_mask [B,T,ceil(T/32)]. Returns -1 or b*T+i of the first bad parent.");

  m.def(
      "verify_greedy",
      [](int64_t parents, int64_t tokens, int64_t target, int64_t accept_len, int64_t accept_nodes, int64_t bonus,
         int64_t B, int64_t T, int num_threads) {
        return treedec::verify_greedy(ptr<const int32_t>(parents), ptr<const int64_t>(tokens),
                                      ptr<const int64_t>(target), ptr<int32_t>(accept_len),
                                      ptr<int32_t>(accept_nodes), ptr<int64_t>(bonus), B, T, num_threads);
      },
      py::arg("parents_ptr"), py::arg("tokens_ptr"), py::arg("target_ptr"), py::arg("accept_len_ptr"),
      py::arg("accept_nodes_ptr"), py::arg("bonus_ptr"), py::arg("B"), py::arg("T"), py::arg("num_threads") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "Greedy tree verification. Returns -1 or b*T+i of the first bad parent.");

  m.def(
      "sample_tokens",
      [](int64_t probs, int64_t uniforms, int64_t tokens, int64_t N, int64_t V, int num_threads) {
        treedec::sample_tokens(ptr<const float>(probs), ptr<const float>(uniforms), ptr<int64_t>(tokens), N, V,
                               num_threads);
      },
      py::arg("probs_ptr"), py::arg("uniforms_ptr"), py::arg("tokens_ptr"), py::arg("N"), py::arg("V"),
      py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>(),
      "Inverse-CDF sampling: probs float32 [N,V], uniforms float32 [N] -> tokens int64 [N].");

  m.def(
      "compact_kv",
      [](const std::vector<int64_t>& meta, int64_t prefix_len, int64_t accept_nodes, int64_t B, int64_t S, int64_t T,
         int num_threads) {
        if (meta.size() % 6 != 0) throw std::invalid_argument("meta must hold 6 integers per tensor");
        std::vector<treedec::CacheView> caches(meta.size() / 6);
        for (size_t i = 0; i < caches.size(); ++i) {
          const int64_t* e = meta.data() + 6 * i;
          caches[i] = treedec::CacheView{ptr<char>(e[0]), e[1], e[2], e[3], e[4], e[5]};
        }
        py::gil_scoped_release release;
        return treedec::compact_kv(caches, ptr<const int32_t>(prefix_len), ptr<const int32_t>(accept_nodes), B, S, T,
                                   num_threads);
      },
      py::arg("meta"), py::arg("prefix_len_ptr"), py::arg("accept_nodes_ptr"), py::arg("B"), py::arg("S"),
      py::arg("T"), py::arg("num_threads") = 1,
      "In-place KV compaction of many [B,H,S,D] tensors. meta: per tensor (data_ptr, H, row_bytes, "
      "stride_b, stride_h, stride_s), strides in bytes. Returns the number of skipped (malformed) entries.");

  m.def(
      "lm_head_topk",
      [](int64_t hidden, int64_t weight, int64_t values, int64_t indices, int64_t N, int64_t V, int64_t H, int64_t ldh,
         int64_t ldw, int64_t k, bool bf16, const std::string& isa_name, int num_threads) {
        const treedec::Dtype dtype = bf16 ? treedec::Dtype::kBFloat16 : treedec::Dtype::kFloat32;
        const treedec::Isa isa = isa_from_name(isa_name, dtype);
        if (!isa_runs(isa, dtype)) throw std::invalid_argument("this CPU cannot run isa " + isa_name);
        py::gil_scoped_release release;
        treedec::lm_head_topk(ptr<const void>(hidden), ptr<const void>(weight), ptr<float>(values),
                              ptr<int64_t>(indices), N, V, H, ldh, ldw, k, dtype, isa, num_threads);
      },
      py::arg("hidden_ptr"), py::arg("weight_ptr"), py::arg("values_ptr"), py::arg("indices_ptr"), py::arg("N"),
      py::arg("V"), py::arg("H"), py::arg("ldh"), py::arg("ldw"), py::arg("k"), py::arg("bf16"),
      py::arg("isa") = "auto", py::arg("num_threads") = 1,
      "hidden [N,H] x weight [V,H] (fp32 or bf16) -> top-k values float32 [N,k], indices int64 [N,k].");

  m.def(
      "linear_rows",
      [](int64_t x, int64_t weight, int64_t bias, int64_t y, int64_t N, int64_t O, int64_t H, int64_t ldx, int64_t ldw,
         bool bf16, const std::string& isa_name, int num_threads) {
        const treedec::Dtype dtype = bf16 ? treedec::Dtype::kBFloat16 : treedec::Dtype::kFloat32;
        const treedec::Isa isa = isa_from_name(isa_name, dtype);
        if (!isa_runs(isa, dtype)) throw std::invalid_argument("this CPU cannot run isa " + isa_name);
        py::gil_scoped_release release;
        treedec::linear_rows(ptr<const void>(x), ptr<const void>(weight), ptr<const float>(bias), ptr<void>(y), N, O,
                             H, ldx, ldw, dtype, isa, num_threads);
      },
      py::arg("x_ptr"), py::arg("weight_ptr"), py::arg("bias_ptr"), py::arg("y_ptr"), py::arg("N"), py::arg("O"),
      py::arg("H"), py::arg("ldx"), py::arg("ldw"), py::arg("bf16"), py::arg("isa") = "auto",
      py::arg("num_threads") = 1,
      "x [N,H] x weight [O,H] (fp32 or bf16) + bias float32 [O] (0: none) -> y [N,O] in the input dtype.");

  m.def(
      "best_isa", [](bool bf16) {
        return std::string(treedec::isa_name(
            treedec::best_isa(bf16 ? treedec::Dtype::kBFloat16 : treedec::Dtype::kFloat32)));
      },
      py::arg("bf16") = false, "The instruction set lm_head_topk uses on this CPU for fp32 (or bf16).");

  m.def(
      "supported_isas",
      [](bool bf16) {
        const treedec::Dtype dtype = bf16 ? treedec::Dtype::kBFloat16 : treedec::Dtype::kFloat32;
        std::vector<std::string> names;
        for (int i = 0; i <= 3; ++i) {
          const auto isa = static_cast<treedec::Isa>(i);
          if (isa == treedec::Isa::kAvx512Bf16 && !bf16) continue;
          if (isa_runs(isa, dtype)) names.emplace_back(treedec::isa_name(isa));
        }
        return names;
      },
      py::arg("bf16") = false, "Every instruction set lm_head_topk can run here for fp32 (or bf16).");

#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif

  m.def(
      "gather_rows",
      [](int64_t src, int64_t dst, int64_t index, int64_t A, int64_t B, int64_t row_bytes, int64_t src_stride,
         int64_t dst_stride, int num_threads) {
        return treedec::gather_rows(ptr<const void>(src), ptr<void>(dst), ptr<const int64_t>(index), A, B, row_bytes,
                                    src_stride, dst_stride, num_threads);
      },
      py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("index_ptr"), py::arg("A"), py::arg("B"), py::arg("row_bytes"),
      py::arg("src_stride"), py::arg("dst_stride"), py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>(),
      "dst row i <- src row index[i] (strides in bytes). Returns -1, or the position of the first index outside [0, B).");

  m.def(
      "scatter_rows",
      [](int64_t block, int64_t dst, int64_t index, int64_t A, int64_t B, int64_t row_bytes, int64_t block_stride,
         int64_t dst_stride, int num_threads) {
        return treedec::scatter_rows(ptr<const void>(block), ptr<void>(dst), ptr<const int64_t>(index), A, B,
                                     row_bytes, block_stride, dst_stride, num_threads);
      },
      py::arg("block_ptr"), py::arg("dst_ptr"), py::arg("index_ptr"), py::arg("A"), py::arg("B"), py::arg("row_bytes"),
      py::arg("block_stride"), py::arg("dst_stride"), py::arg("num_threads") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "dst row index[i] <- block row i (strides in bytes). Returns -1, or the position of the first index outside "
      "[0, B) or repeated.");
}
