// sample_tokens: inverse-CDF sampling, one token per row (rule: treedec.reference.sample_tokens).
//
// One block per row. The row's mass is a float64 block reduction; then a float64 block scan runs
// over the row in chunks of kChunk tokens (kItems consecutive per thread), carrying the sum of
// the chunks before, and stops at the first chunk where the running sum exceeds
// uniform * mass: peaked distributions end after a chunk or two. Summation order differs from
// torch.cumsum's, so a token can differ from the reference only when the threshold falls within
// rounding of a CDF step.
//
// Bounded: every loop runs over V; NaN weights never compare above the threshold, and the
// fallback (last positive weight, else V - 1) always gives an index in [0, V).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "treedec_cuda.h"

namespace treedec {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;                  // consecutive tokens per thread in one scan chunk
constexpr int kChunk = kThreads * kItems;  // tokens per scan chunk
constexpr unsigned long long kNone = ~0ull;

using BlockReduce = cub::BlockReduce<double, kThreads>;
using BlockScan = cub::BlockScan<double, kThreads>;

__global__ void __launch_bounds__(kThreads)
    sample_tokens_kernel(const float* __restrict__ probs, const float* __restrict__ uniforms,
                         int64_t* __restrict__ tokens, int64_t vocab) {
  __shared__ union {
    BlockReduce::TempStorage reduce;
    BlockScan::TempStorage scan;
  } temp;
  __shared__ double threshold;
  __shared__ unsigned long long found, last_positive;  // first crossing; last positive index + 1

  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x;
  const float* row = probs + n * vocab;

  double part = 0.0;
  for (int64_t v = tid; v < vocab; v += kThreads) part += static_cast<double>(row[v]);
  const double mass = BlockReduce(temp.reduce).Sum(part);
  if (tid == 0) {
    threshold = static_cast<double>(uniforms[n]) * mass;
    found = kNone;
    last_positive = 0;
  }
  __syncthreads();

  double carry = 0.0;  // sum of the chunks before this one
  unsigned long long my_last = 0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t first = start + static_cast<int64_t>(tid) * kItems;
    double local[kItems];
    double sum = 0.0;
    for (int k = 0; k < kItems; ++k) {
      local[k] = first + k < vocab ? static_cast<double>(row[first + k]) : 0.0;
      sum += local[k];
    }
    double prefix, aggregate;
    BlockScan(temp.scan).ExclusiveSum(sum, prefix, aggregate);
    double running = carry + prefix;
    for (int k = 0; k < kItems; ++k) {
      running += local[k];
      if (running > threshold) {
        atomicMin(&found, static_cast<unsigned long long>(first + k));
        break;
      }
      if (local[k] > 0.0) my_last = static_cast<unsigned long long>(first + k) + 1;  // padding has weight 0
    }
    __syncthreads();  // `found` is final for this chunk, and the scan storage may be reused
    if (found != kNone) break;
    carry += aggregate;
  }
  if (my_last) atomicMax(&last_positive, my_last);
  __syncthreads();
  if (tid == 0) {
    // No crossing only by rounding: the last positive weight, else V - 1 (as the reference).
    tokens[n] = found != kNone ? static_cast<int64_t>(found)
                               : (last_positive ? static_cast<int64_t>(last_positive) - 1 : vocab - 1);
  }
}

}  // namespace

cudaError_t launch_sample_tokens(const float* probs, const float* uniforms, int64_t* tokens, int64_t rows,
                                 int64_t vocab, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7FFFFFFF || vocab <= 0) return cudaErrorInvalidValue;
  sample_tokens_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(probs, uniforms, tokens, vocab);
  return cudaGetLastError();
}

}  // namespace treedec
