// treedec CPU kernels: plain C++ over raw pointers and sizes (no torch headers).
//
// Every kernel is bounded: loops run over the sizes passed in, never over values read from the
// inputs, and every index read from an input is range-checked before it is dereferenced. Python
// (treedec.ops) validates arguments first; the checks here only keep a malformed input from
// hanging or reading out of bounds, and are reported back as return codes.
#pragma once

#include <cstdint>
#include <vector>

namespace treedec {

// parents int32 [B, T] -> depth int32 [B, T], tree_mask int32 [B, T, W = ceil(T/32)]
// (bit j of row i set iff node j is node i or an ancestor; little-endian words).
// Returns -1, or b * T + i of the first malformed parent (that row is written as a lone node).
int64_t build_tree(const int32_t* parents, int32_t* depth, int32_t* tree_mask, int64_t B, int64_t T,
                   int num_threads);

// Greedy verification (docs/design.md): parents int32 [B, T], tokens int64 [B, T], target int64 [B, T]
// -> accept_len int32 [B], accept_nodes int32 [B, T] (-1 padded), bonus int64 [B].
// Returns -1, or b * T + i of the first malformed parent (such a node is never accepted).
int64_t verify_greedy(const int32_t* parents, const int64_t* tokens, const int64_t* target, int32_t* accept_len,
                      int32_t* accept_nodes, int64_t* bonus, int64_t B, int64_t T, int num_threads);

// Inverse-CDF sampling (rule: treedec.reference.sample_tokens): probs float32 [N, V] (non-negative,
// need not sum to 1), uniforms float32 [N] -> tokens int64 [N]: the first v whose running float64
// sum exceeds uniforms[n] * sum(row), else the last v with positive weight, else V - 1.
void sample_tokens(const float* probs, const float* uniforms, int64_t* tokens, int64_t N, int64_t V,
                   int num_threads);

// One cache tensor [B, H, S, D] as raw bytes: rows of `row_bytes` contiguous bytes, byte strides.
struct CacheView {
  char* data;
  int64_t heads;
  int64_t row_bytes;
  int64_t stride_b, stride_h, stride_s;
};

// In place, every tensor: row prefix_len[b] + accept_nodes[b, j] -> row prefix_len[b] + n for the
// n-th valid (>= 0) entry of accept_nodes[b]. Rows outside [0, S) or entries outside [n, T) are
// skipped. Returns the number of skipped entries (0 for valid input).
int64_t compact_kv(const std::vector<CacheView>& caches, const int32_t* prefix_len, const int32_t* accept_nodes,
                   int64_t B, int64_t S, int64_t T, int num_threads);

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1 };
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The best ISA this CPU runs for `dtype` (kAvx512Bf16 only for bf16).
Isa best_isa(Dtype dtype);
const char* isa_name(Isa isa);

// hidden [N, H] (row stride ldh elements), weight [V, H] (row stride ldw), both `dtype`
// -> values float32 [N, k] (largest first), indices int64 [N, k]. Logits accumulate in float32;
// for bf16 they are rounded to bf16 before ranking (as torch's bf16 matmul returns them).
// NaN ranks above everything; equal values go to the smallest index. Never builds [N, V].
void lm_head_topk(const void* hidden, const void* weight, float* values, int64_t* indices, int64_t N, int64_t V,
                  int64_t H, int64_t ldh, int64_t ldw, int64_t k, Dtype dtype, Isa isa, int num_threads);

// x [N, H] (row stride ldx), weight [O, H] (row stride ldw), both `dtype`; bias float32 [O] or null
// -> y [N, O] contiguous, `dtype` (bf16: float32 sums rounded to nearest even). For the few rows
// of a verify step; any N works.
void linear_rows(const void* x, const void* weight, const float* bias, void* y, int64_t N, int64_t O, int64_t H,
                 int64_t ldx, int64_t ldw, Dtype dtype, Isa isa, int num_threads);

// Row gather / scatter for layer-skip batching. Rows are `row_bytes` contiguous bytes, `*_stride`
// bytes apart. gather: dst row i <- src row index[i], i < A. scatter: dst row index[i] <- block row i.
// Nothing is written unless every index lies in [0, B) (and, for scatter, none repeats: the result
// would depend on the order); otherwise returns the position of the first bad index, else -1.
int64_t gather_rows(const void* src, void* dst, const int64_t* index, int64_t A, int64_t B, int64_t row_bytes,
                    int64_t src_stride, int64_t dst_stride, int num_threads);
int64_t scatter_rows(const void* block, void* dst, const int64_t* index, int64_t A, int64_t B, int64_t row_bytes,
                     int64_t block_stride, int64_t dst_stride, int num_threads);

}  // namespace treedec
