// build_tree: depth and packed ancestor mask of a batch of trees.
//
// One thread per (sequence b, node i, mask word w): it walks node i's parent chain to the root
// and ORs the bits of the ancestors that fall in word w; the w == 0 thread also writes the depth.
// The walk takes at most T steps and follows a link only if it points to a smaller index, so a
// malformed tree can neither hang the kernel nor send it out of bounds; every output is written.
#include "treedec_cuda.h"

namespace treedec {
namespace {

__global__ void build_tree_kernel(const int32_t* __restrict__ parents, int32_t* __restrict__ depth,
                                  int32_t* __restrict__ tree_mask, int64_t batch, int64_t num_nodes,
                                  int64_t words) {
  const int64_t total = batch * num_nodes * words;
  for (int64_t item = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = item % words;
    const int64_t row = item / words;  // b * T + i
    const int64_t i = row % num_nodes;
    const int32_t* tree = parents + (row - i);  // parents[b, :]
    const int64_t lo = w * 32, hi = lo + 32;
    uint32_t bits = 0;
    int32_t steps = 0;
    int64_t node = i;
    for (int64_t step = 0; step <= num_nodes; ++step) {  // bounded: a valid chain has <= T - 1 links
      if (node >= lo && node < hi) bits |= 1u << (node - lo);
      if (node == 0) break;
      const int64_t parent = tree[node];
      if (parent < 0 || parent >= node) break;  // malformed link: stop here
      node = parent;
      ++steps;
    }
    tree_mask[item] = static_cast<int32_t>(bits);  // item == (b * T + i) * W + w
    if (w == 0) depth[row] = steps;
  }
}

}  // namespace

cudaError_t launch_build_tree(const int32_t* parents, int32_t* depth, int32_t* tree_mask, int64_t batch,
                              int64_t num_nodes, cudaStream_t stream) {
  if (batch <= 0 || num_nodes <= 0) return cudaSuccess;
  const int64_t words = (num_nodes + 31) / 32;
  const int64_t total = batch * num_nodes * words;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 32 ? blocks : 65535 * 32);
  build_tree_kernel<<<grid, threads, 0, stream>>>(parents, depth, tree_mask, batch, num_nodes, words);
  return cudaGetLastError();
}

}  // namespace treedec
