// Row gather/scatter on the CPU, for layer-skip batching (see treedec_cpu.h): a layer runs on a
// dense block of the rows that need it, and its output goes back to those rows.
#include <cstring>

#include "treedec_cpu.h"

namespace treedec {

namespace {

// Below this many bytes one thread copies faster than an OpenMP region starts and joins.
constexpr int64_t kParallelBytes = 4 << 20;

// -1 when every index lies in [0, B) (and, for a scatter, none repeats); else the first bad one.
int64_t first_bad_index(const int64_t* index, int64_t A, int64_t B, bool unique) {
  std::vector<char> seen(unique ? static_cast<size_t>(B) : 0, 0);
  for (int64_t i = 0; i < A; ++i) {
    const int64_t row = index[i];
    if (row < 0 || row >= B) return i;
    if (unique) {
      if (seen[static_cast<size_t>(row)]) return i;
      seen[static_cast<size_t>(row)] = 1;
    }
  }
  return -1;
}

void copy_rows(const char* src, char* dst, const int64_t* index, int64_t A, int64_t row_bytes, int64_t src_stride,
               int64_t dst_stride, bool gather, int num_threads) {
  const bool parallel = num_threads > 1 && A > 1 && A * row_bytes >= kParallelBytes;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t i = 0; i < A; ++i) {
    const int64_t s = gather ? index[i] : i;
    const int64_t d = gather ? i : index[i];
    std::memcpy(dst + d * dst_stride, src + s * src_stride, static_cast<size_t>(row_bytes));
  }
}

// Checks the indices (nothing is written when one is bad), then copies.
int64_t checked_copy(const void* src, void* dst, const int64_t* index, int64_t A, int64_t B, int64_t row_bytes,
                     int64_t src_stride, int64_t dst_stride, bool gather, int num_threads) {
  const int64_t bad = first_bad_index(index, A, B, /*unique=*/!gather);
  if (bad >= 0) return bad;
  copy_rows(static_cast<const char*>(src), static_cast<char*>(dst), index, A, row_bytes, src_stride, dst_stride,
            gather, num_threads);
  return -1;
}

}  // namespace

int64_t gather_rows(const void* src, void* dst, const int64_t* index, int64_t A, int64_t B, int64_t row_bytes,
                    int64_t src_stride, int64_t dst_stride, int num_threads) {
  return checked_copy(src, dst, index, A, B, row_bytes, src_stride, dst_stride, true, num_threads);
}

int64_t scatter_rows(const void* block, void* dst, const int64_t* index, int64_t A, int64_t B, int64_t row_bytes,
                     int64_t block_stride, int64_t dst_stride, int num_threads) {
  return checked_copy(block, dst, index, A, B, row_bytes, block_stride, dst_stride, false, num_threads);
}

}  // namespace treedec
