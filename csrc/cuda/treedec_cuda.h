// treedec CUDA kernels: host launchers shared by the .cu files and bindings.cpp.
//
// Every launcher takes raw device pointers, sizes and the stream to launch on, returns the
// launch's cudaError_t (cudaSuccess when there was nothing to do), and never synchronises.
// Data contracts: docs/design.md (tree, verification, KV compaction).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace treedec {

// parents int32 [B, T] -> depth int32 [B, T], tree_mask int32 [B, T, ceil(T/32)] (packed
// ancestor mask, little-endian bits: bit j of row i set iff j is i or an ancestor of i).
// A malformed parent link (not in [0, i)) ends the walk: the node keeps the ancestors found so far.
cudaError_t launch_build_tree(const int32_t* parents, int32_t* depth, int32_t* tree_mask,
                              int64_t batch, int64_t num_nodes, cudaStream_t stream);

// Greedy verification, one block per sequence. parents int32 [B, T], tokens int64 [B, T]
// (-1 = padding node), target int64 [B, T] -> accept_len int32 [B], accept_nodes int32 [B, T]
// (root path, -1 padded), bonus int64 [B]. A node behind a malformed link is never accepted.
cudaError_t launch_verify_greedy(const int32_t* parents, const int64_t* tokens, const int64_t* target,
                                 int32_t* accept_len, int32_t* accept_nodes, int64_t* bonus,
                                 int64_t batch, int64_t num_nodes, cudaStream_t stream);

// Inverse-CDF sampling, one block per row (rule: treedec.reference.sample_tokens).
// probs float32 [N, V] (non-negative, need not sum to 1), uniforms float32 [N] -> tokens int64
// [N]: the first v whose running float64 sum exceeds uniforms[n] * sum(row), else the last v with
// positive weight, else V - 1.
cudaError_t launch_sample_tokens(const float* probs, const float* uniforms, int64_t* tokens, int64_t rows,
                                 int64_t vocab, cudaStream_t stream);

// KV compaction over num_tensors caches [B, H, S, D] (contiguous, elem_size bytes per element)
// in one launch. tensor_ptrs: device array of int64 data pointers. For every j with
// accept_nodes[b, j] >= 0, row prefix_len[b] + accept_nodes[b, j] moves to row prefix_len[b] + j.
// Rows outside [0, S) and nodes outside [0, T) are skipped, never touched.
cudaError_t launch_compact_kv(const int64_t* tensor_ptrs, int64_t num_tensors, const int32_t* prefix_len,
                              const int32_t* accept_nodes, int64_t batch, int64_t heads, int64_t seq_len,
                              int64_t head_dim, int64_t elem_size, int64_t num_nodes, cudaStream_t stream);

}  // namespace treedec
