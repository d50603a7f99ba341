// KV compaction on the CPU: every layer's keys and values in one call (see treedec_cpu.h).
#include <cstring>

#include "treedec_cpu.h"

namespace treedec {

namespace {

// Below this many bytes to move, one thread copies faster than an OpenMP region starts and
// joins (a decode step moves a few MB at most; on a shared machine a join can cost a time slice).
constexpr int64_t kParallelBytes = 16 << 20;

}  // namespace

int64_t compact_kv(const std::vector<CacheView>& caches, const int32_t* prefix_len, const int32_t* accept_nodes,
                   int64_t B, int64_t S, int64_t T, int num_threads) {
  // Per sequence: the (src, dst) node pairs to move, checked once, shared by every tensor.
  std::vector<int32_t> moves(static_cast<size_t>(B * T * 2));
  std::vector<int64_t> num_moves(static_cast<size_t>(B), 0);
  int64_t skipped = 0;
  int64_t total_rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* path = accept_nodes + b * T;
    const int64_t base = prefix_len[b];
    if (base < 0 || base + T > S) {
      for (int64_t j = 0; j < T; ++j) skipped += path[j] >= 0;
      continue;
    }
    int64_t n = 0;
    for (int64_t j = 0; j < T; ++j) {
      const int32_t src = path[j];
      if (src < 0) continue;
      if (src < n || src >= T) {  // not a root path: moving it could overwrite a row still to be read
        ++skipped;
        continue;
      }
      if (src != n) {
        int32_t* m = moves.data() + (b * T + num_moves[b]) * 2;
        m[0] = src;
        m[1] = static_cast<int32_t>(n);
        ++num_moves[b];
      }
      ++n;
    }
    total_rows += num_moves[b];
  }
  if (total_rows == 0) return skipped;

  int64_t row_bytes_sum = 0;
  for (const CacheView& c : caches) row_bytes_sum += c.heads * c.row_bytes;
  const int64_t num_tensors = static_cast<int64_t>(caches.size());
  const int64_t work = num_tensors * B;
  // Sources increase along a path and src >= dst, so copying in path order never reads a row that
  // was already overwritten; distinct rows never overlap, memmove covers the degenerate case.
#pragma omp parallel for num_threads(num_threads) if (total_rows * row_bytes_sum > kParallelBytes) schedule(static)
  for (int64_t w = 0; w < work; ++w) {
    const CacheView& c = caches[static_cast<size_t>(w / B)];
    const int64_t b = w % B;
    const int64_t count = num_moves[b];
    if (count == 0) continue;
    const int64_t base = prefix_len[b];
    const int32_t* m = moves.data() + b * T * 2;
    char* seq = c.data + b * c.stride_b;
    for (int64_t h = 0; h < c.heads; ++h) {
      char* head = seq + h * c.stride_h;
      for (int64_t i = 0; i < count; ++i) {
        std::memmove(head + (base + m[2 * i + 1]) * c.stride_s, head + (base + m[2 * i]) * c.stride_s,
                     static_cast<size_t>(c.row_bytes));
      }
    }
  }
  return skipped;
}

}  // namespace treedec
