// compact_kv: move each sequence's accepted tree rows next to its prefix, in every layer, in one
// launch (docs/design.md, "KV compaction").
//
// For every cache tensor [B, H, S, D] (its data pointer read from a device array of int64) and
// every j with accept_nodes[b, j] >= 0: row prefix_len[b] + accept_nodes[b, j] -> row
// prefix_len[b] + j.
//
// Work split: one thread per (tensor, b, h, chunk of the row), a chunk being `Vec` bytes
// (16 when the row size allows). The thread walks j = 0, 1, ..., T-1 itself, so no two threads
// ever touch the same bytes and there is no cross-thread race at all; parallelism comes from
// tensors x B x H x chunks.
//
// Why the in-place walk is right: on a valid path a_0 = 0 < a_1 < ... < a_L with a_j >= j.
// Step j writes row j (relative to the prefix) and reads row a_j. A row r that is ever a source
// is read at the unique step j' with a_j' = r, and j' <= r; it is overwritten only at step r
// (when r <= L and a_r != r). So every read of row r comes no later than its overwrite, and at the
// same step (j' = r) the read precedes the write. The thread batches kBatch steps: it loads the
// sources of steps j..j+kBatch-1 into registers and then stores them. This is still safe: a row
// written in the batch (rows j..j+kBatch-1) could only be a source of steps <= itself, i.e. of
// this batch or earlier ones, whose loads are already done. Steps with a_j == j are skipped.
//
// Bounded and in range whatever the input: nodes outside [0, T) and rows outside [0, S) are
// skipped. On malformed (non-increasing) paths the result is unspecified but memory-safe.
#include "treedec_cuda.h"

namespace treedec {
namespace {

constexpr int kBatch = 4;

// Walk the path of one (tensor, b, h) for one column chunk: `rows` points at the chunk in row
// prefix_len[b], `stride` is the row size in T units, `limit` the rows that exist from there.
template <typename T>
__device__ __forceinline__ void walk_path(T* rows, int64_t stride, int64_t limit, const int32_t* path,
                                          int64_t num_nodes) {
  for (int64_t j0 = 0; j0 < num_nodes; j0 += kBatch) {
    T staged[kBatch];
    int64_t dest[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t j = j0 + u;
      dest[u] = -1;
      if (j >= num_nodes || j >= limit) continue;
      const int64_t src = path[j];
      if (src < 0 || src >= num_nodes || src >= limit || src == j) continue;
      staged[u] = rows[src * stride];  // all loads of the batch before any of its stores
      dest[u] = j;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (dest[u] >= 0) rows[dest[u] * stride] = staged[u];
    }
  }
}

template <typename Vec>
__global__ void compact_kv_kernel(const int64_t* __restrict__ tensor_ptrs, int64_t num_tensors,
                                  const int32_t* __restrict__ prefix_len, const int32_t* __restrict__ accept_nodes,
                                  int64_t batch, int64_t heads, int64_t seq_len, int64_t row_bytes,
                                  int64_t num_nodes) {
  const int64_t chunks = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t total = num_tensors * batch * heads * chunks;
  for (int64_t item = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t chunk = item % chunks;
    const int64_t bh = (item / chunks) % (batch * heads);  // b * H + h
    const int64_t tensor = item / (chunks * batch * heads);
    const int64_t b = bh / heads;
    const int64_t prefix = prefix_len[b];
    if (prefix < 0 || prefix >= seq_len) continue;
    char* row0 = reinterpret_cast<char*>(static_cast<uintptr_t>(tensor_ptrs[tensor])) +
                 (bh * seq_len + prefix) * row_bytes + chunk * static_cast<int64_t>(sizeof(Vec));
    const int32_t* path = accept_nodes + b * num_nodes;
    const int64_t limit = seq_len - prefix;
    if (reinterpret_cast<uintptr_t>(row0) % alignof(Vec) == 0) {
      walk_path(reinterpret_cast<Vec*>(row0), chunks, limit, path, num_nodes);
    } else {  // a tensor view with an odd storage offset: same walk, byte by byte
      for (int k = 0; k < static_cast<int>(sizeof(Vec)); ++k)
        walk_path(reinterpret_cast<uint8_t*>(row0) + k, row_bytes, limit, path, num_nodes);
    }
  }
}

template <typename Vec>
cudaError_t launch_with(const int64_t* tensor_ptrs, int64_t num_tensors, const int32_t* prefix_len,
                        const int32_t* accept_nodes, int64_t batch, int64_t heads, int64_t seq_len,
                        int64_t row_bytes, int64_t num_nodes, cudaStream_t stream) {
  const int64_t total = num_tensors * batch * heads * (row_bytes / static_cast<int64_t>(sizeof(Vec)));
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 32 ? blocks : 65535 * 32);
  compact_kv_kernel<Vec><<<grid, threads, 0, stream>>>(tensor_ptrs, num_tensors, prefix_len, accept_nodes,
                                                       batch, heads, seq_len, row_bytes, num_nodes);
  return cudaGetLastError();
}

}  // namespace

// The vector width is chosen from the row size (the pointers live on the device); a tensor whose
// data pointer is not aligned to it (a view with an odd storage offset) is copied byte by byte.
cudaError_t launch_compact_kv(const int64_t* tensor_ptrs, int64_t num_tensors, const int32_t* prefix_len,
                              const int32_t* accept_nodes, int64_t batch, int64_t heads, int64_t seq_len,
                              int64_t head_dim, int64_t elem_size, int64_t num_nodes, cudaStream_t stream) {
  if (num_tensors <= 0 || batch <= 0 || heads <= 0 || seq_len <= 0 || head_dim <= 0 || elem_size <= 0 ||
      num_nodes <= 0)
    return cudaSuccess;
  const int64_t row_bytes = head_dim * elem_size;
  if (row_bytes % 16 == 0)
    return launch_with<uint4>(tensor_ptrs, num_tensors, prefix_len, accept_nodes, batch, heads, seq_len,
                              row_bytes, num_nodes, stream);
  if (row_bytes % 8 == 0)
    return launch_with<uint2>(tensor_ptrs, num_tensors, prefix_len, accept_nodes, batch, heads, seq_len,
                              row_bytes, num_nodes, stream);
  if (row_bytes % 4 == 0)
    return launch_with<uint32_t>(tensor_ptrs, num_tensors, prefix_len, accept_nodes, batch, heads, seq_len,
                                 row_bytes, num_nodes, stream);
  if (row_bytes % 2 == 0)
    return launch_with<uint16_t>(tensor_ptrs, num_tensors, prefix_len, accept_nodes, batch, heads, seq_len,
                                 row_bytes, num_nodes, stream);
  return launch_with<uint8_t>(tensor_ptrs, num_tensors, prefix_len, accept_nodes, batch, heads, seq_len,
                              row_bytes, num_nodes, stream);
}

}  // namespace treedec
