// verify_greedy: longest accepted root path per sequence (docs/design.md, "Verification (greedy)").
//
// One block per sequence. The block first stages parents[b, :] and each node's own test
// ok[i] = tokens[i] >= 0 && tokens[i] == target[parents[i]] in shared memory (for T up to
// kSharedMaxNodes; beyond that the same code reads global memory). Then each thread takes nodes
// i = tid, tid + blockDim, ...: node i is accepted iff ok holds on every link of its path to the
// root; the walk also gives its depth. The winner (deepest; ties to the smallest index) is a
// shared atomicMax over the key (depth + 1) << 32 | ~i. Thread 0 writes the path root-first.
//
// Bounded: a walk follows only links to smaller indices, so it ends at the root or at a malformed
// link (then the node is not accepted) within T steps; the root is always accepted, so the winner
// always exists, and every output element of the sequence is written.
#include "treedec_cuda.h"

namespace treedec {
namespace {

constexpr int64_t kSharedMaxNodes = 8192;  // 5 bytes per node: 40 KiB of shared memory

template <bool kShared>
__global__ void verify_greedy_kernel(const int32_t* __restrict__ parents, const int64_t* __restrict__ tokens,
                                     const int64_t* __restrict__ target, int32_t* __restrict__ accept_len,
                                     int32_t* __restrict__ accept_nodes, int64_t* __restrict__ bonus,
                                     int64_t num_nodes) {
  extern __shared__ int32_t shared_parents[];  // [T] when kShared, then uint8 ok[T]
  __shared__ unsigned long long best;
  const int64_t b = blockIdx.x;
  const int32_t* tree = parents + b * num_nodes;
  const int64_t* node_tokens = tokens + b * num_nodes;
  const int64_t* node_target = target + b * num_nodes;
  uint8_t* shared_ok = reinterpret_cast<uint8_t*>(shared_parents + (kShared ? num_nodes : 0));

  // parent of node n and whether link n -> parent is valid and accepted (n >= 1)
  auto link_ok = [&](int64_t n, int64_t parent) -> bool {
    return parent >= 0 && parent < n && node_tokens[n] >= 0 && node_tokens[n] == node_target[parent];
  };

  if (threadIdx.x == 0) best = 0;
  if (kShared) {
    for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x) {
      const int32_t parent = tree[i];
      shared_parents[i] = parent;
      shared_ok[i] = i > 0 && link_ok(i, parent);
    }
  }
  __syncthreads();

  unsigned long long mine = 0;
  for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x) {
    int64_t node = i;
    int64_t depth = 0;
    bool accepted = false;
    for (int64_t step = 0; step < num_nodes; ++step) {
      if (node == 0) {
        accepted = true;
        break;
      }
      const int64_t parent = kShared ? shared_parents[node] : tree[node];
      const bool ok = kShared ? (shared_ok[node] != 0) : link_ok(node, parent);
      if (!ok) break;  // rejected draft or malformed link (ok implies 0 <= parent < node)
      node = parent;
      ++depth;
    }
    if (accepted) {
      const unsigned long long key =
          (static_cast<unsigned long long>(depth + 1) << 32) | (0xFFFFFFFFull - static_cast<uint32_t>(i));
      mine = key > mine ? key : mine;
    }
  }
  if (mine) atomicMax(&best, mine);
  __syncthreads();

  const int64_t depth = static_cast<int64_t>(best >> 32) - 1;  // >= 0: the root is always accepted
  const int64_t deepest = 0xFFFFFFFFll - static_cast<int64_t>(best & 0xFFFFFFFFull);
  int32_t* path = accept_nodes + b * num_nodes;
  for (int64_t j = depth + 1 + threadIdx.x; j < num_nodes; j += blockDim.x) path[j] = -1;
  if (threadIdx.x == 0) {
    int64_t node = deepest;
    for (int64_t j = depth; j >= 0; --j) {  // the winner's links were all checked: node stays in [0, T)
      path[j] = static_cast<int32_t>(node);
      node = kShared ? shared_parents[node] : tree[node];
    }
    accept_len[b] = static_cast<int32_t>(depth);
    bonus[b] = node_target[deepest];
  }
}

}  // namespace

cudaError_t launch_verify_greedy(const int32_t* parents, const int64_t* tokens, const int64_t* target,
                                 int32_t* accept_len, int32_t* accept_nodes, int64_t* bonus, int64_t batch,
                                 int64_t num_nodes, cudaStream_t stream) {
  if (batch <= 0 || num_nodes <= 0) return cudaSuccess;
  if (batch > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const int64_t rounded = (num_nodes + 31) / 32 * 32;
  const int threads = static_cast<int>(rounded < 256 ? rounded : 256);
  const unsigned grid = static_cast<unsigned>(batch);
  if (num_nodes <= kSharedMaxNodes) {
    const size_t shared_bytes = static_cast<size_t>(num_nodes) * (sizeof(int32_t) + 1);
    verify_greedy_kernel<true><<<grid, threads, shared_bytes, stream>>>(parents, tokens, target, accept_len,
                                                                       accept_nodes, bonus, num_nodes);
  } else {
    verify_greedy_kernel<false><<<grid, threads, 0, stream>>>(parents, tokens, target, accept_len,
                                                              accept_nodes, bonus, num_nodes);
  }
  return cudaGetLastError();
}

}  // namespace treedec
