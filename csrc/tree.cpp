// Tree building and greedy verification on the CPU (see treedec_cpu.h for the contracts).
#include <algorithm>
#include <cstring>
#include <vector>

#include "treedec_cpu.h"

namespace treedec {

namespace {

// Below this many nodes in a batch, an OpenMP region costs more than it saves.
constexpr int64_t kParallelNodes = 1 << 14;

inline bool parent_ok(int32_t parent, int64_t i) { return parent >= 0 && parent < i; }

}  // namespace

int64_t build_tree(const int32_t* parents, int32_t* depth, int32_t* tree_mask, int64_t B, int64_t T,
                   int num_threads) {
  const int64_t W = (T + 31) / 32;
  int64_t first_bad = -1;
#pragma omp parallel for num_threads(num_threads) if (B * T * W > kParallelNodes) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* par = parents + b * T;
    int32_t* dep = depth + b * T;
    uint32_t* mask = reinterpret_cast<uint32_t*>(tree_mask) + b * T * W;
    int64_t bad = -1;
    for (int64_t i = 0; i < T; ++i) {
      uint32_t* row = mask + i * W;
      std::memset(row, 0, sizeof(uint32_t) * W);
      const int32_t p = par[i];
      if (i > 0 && parent_ok(p, i)) {
        std::memcpy(row, mask + p * W, sizeof(uint32_t) * (p / 32 + 1));  // the parent's bits are all < p + 1
        dep[i] = dep[p] + 1;
      } else {
        if ((i == 0 && p != -1) || i > 0) bad = bad < 0 ? b * T + i : bad;
        dep[i] = 0;
      }
      row[i / 32] |= 1u << (i % 32);
    }
    if (bad >= 0) {
#pragma omp critical(treedec_build_tree)
      if (first_bad < 0 || bad < first_bad) first_bad = bad;
    }
  }
  return first_bad;
}

int64_t verify_greedy(const int32_t* parents, const int64_t* tokens, const int64_t* target, int32_t* accept_len,
                      int32_t* accept_nodes, int64_t* bonus, int64_t B, int64_t T, int num_threads) {
  int64_t first_bad = -1;
#pragma omp parallel num_threads(num_threads) if (B * T > kParallelNodes)
  {
    std::vector<int32_t> dep(static_cast<size_t>(T));
    std::vector<uint8_t> accepted(static_cast<size_t>(T));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int32_t* par = parents + b * T;
      const int64_t* tok = tokens + b * T;
      const int64_t* tgt = target + b * T;
      int32_t* path = accept_nodes + b * T;
      int64_t bad = (par[0] != -1) ? b * T : -1;
      accepted[0] = 1;
      dep[0] = 0;
      int64_t deepest = 0;
      int32_t best_depth = 0;
      for (int64_t i = 1; i < T; ++i) {
        const int32_t p = par[i];
        if (!parent_ok(p, i)) {
          bad = bad < 0 ? b * T + i : bad;
          accepted[i] = 0;
          dep[i] = 0;
          continue;
        }
        dep[i] = dep[p] + 1;
        const int64_t token = tok[i];
        accepted[i] = accepted[p] && token >= 0 && token == tgt[p];
        if (accepted[i] && dep[i] > best_depth) {  // strict: equal depths keep the smaller index
          best_depth = dep[i];
          deepest = i;
        }
      }
      std::fill(path, path + T, -1);
      // Walk up from the deepest node; depth strictly decreases along valid parents, so at most
      // best_depth + 1 steps, and every index written is in [0, T).
      int64_t node = deepest;
      for (int64_t j = best_depth; j >= 0; --j) {
        path[j] = static_cast<int32_t>(node);
        node = node > 0 ? par[node] : 0;
      }
      accept_len[b] = best_depth;
      bonus[b] = tgt[deepest];
      if (bad >= 0) {
#pragma omp critical(treedec_verify_greedy)
        if (first_bad < 0 || bad < first_bad) first_bad = bad;
      }
    }
  }
  return first_bad;
}

}  // namespace treedec
