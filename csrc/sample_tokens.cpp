// Inverse-CDF sampling on the CPU (see treedec_cpu.h; the rule is treedec.reference.sample_tokens).
//
// Bit-exact with the reference: torch.cumsum over float64 on the CPU is a sequential loop, and
// so is the running sum here, so the total and every prefix round identically. Without
// reassociation that loop is bound by the add latency, so each row is summed once, storing its
// prefixes, and the first prefix above the threshold is found by binary search (prefixes of
// non-negative weights never decrease) instead of a second pass.
#include <algorithm>
#include <vector>

#include "treedec_cpu.h"

namespace treedec {

namespace {

// Below this many probabilities per call, an OpenMP region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 16;

}  // namespace

void sample_tokens(const float* probs, const float* uniforms, int64_t* tokens, int64_t N, int64_t V,
                   int num_threads) {
#pragma omp parallel num_threads(num_threads) if (N > 1 && N * V > kParallelElements)
  {
    std::vector<double> prefix(static_cast<size_t>(V));  // running sums of one row (per thread)
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* row = probs + n * V;
      double running = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        running += static_cast<double>(row[v]);
        prefix[v] = running;
      }
      const double threshold = static_cast<double>(uniforms[n]) * running;
      // upper_bound: the first prefix > threshold. NaN input (rejected by treedec.ops) still
      // yields an index in [0, V].
      const int64_t first = std::upper_bound(prefix.begin(), prefix.end(), threshold) - prefix.begin();
      if (first < V) {
        tokens[n] = first;
        continue;
      }
      // Rounding ran past the end: the last positive weight (V - 1 if none, as the reference).
      int64_t last = V - 1;
      while (last >= 0 && !(row[last] > 0.0f)) --last;
      tokens[n] = last >= 0 ? last : V - 1;
    }
  }
}

}  // namespace treedec
