// LM head fused with a streaming top-k on the CPU (see treedec_cpu.h for the contract), and
// linear_rows, a linear layer for a few rows built from the same register tiles.
//
// The weight [V, H] is streamed once per call: each thread owns a contiguous slice of V and walks
// it VR rows at a time; those VR rows stay in L1 while all N hidden rows (in L2) are multiplied
// against them in NR x VR register tiles that accumulate in float32 over the whole of H. The
// NR x VR logits of a tile go straight into per-row top-k lists (one per thread, merged at the
// end), so no [N, V] logits buffer ever exists. The instruction set is picked at run time
// (__builtin_cpu_supports); each variant is compiled for its own target with
// __attribute__((target)), so the library itself needs no -m flags.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "treedec_cpu.h"

// gcc 12's AVX-512 headers build some results from _mm*_undefined_*(), which trips these.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define TD_AVX2 __attribute__((target("avx2,fma")))
#define TD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define TD_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace treedec {

namespace {

// ---------------------------------------------------------------------------------------------
// Scalar helpers

inline float bf16_to_f32(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to the nearest bf16 (ties to even), as torch does when a bf16 matmul writes its output.
inline float round_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return f;  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Ranking order of torch.topk / argmax: NaN above everything, then larger values, then smaller ids.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// The k best (value, index) pairs seen so far for one row, best first.
struct TopK {
  float* values;
  int64_t* indices;
  int64_t k;
  int64_t count;
  float threshold;  // a value below it can never enter: -inf until the list is full

  void push(float value, int64_t index) {
    int64_t pos;
    if (count == k) {
      if (!ranks_before(value, index, values[k - 1], indices[k - 1])) return;
      pos = k - 1;
    } else {
      pos = count++;
    }
    while (pos > 0 && ranks_before(value, index, values[pos - 1], indices[pos - 1])) {
      values[pos] = values[pos - 1];
      indices[pos] = indices[pos - 1];
      --pos;
    }
    values[pos] = value;
    indices[pos] = index;
    if (count == k) threshold = std::isnan(values[k - 1]) ? std::numeric_limits<float>::infinity() : values[k - 1];
  }

  // Most logits fall below the k-th best: one compare rejects them (NaN fails it and is pushed).
  inline void offer(float value, int64_t index) {
    if (value < threshold) return;
    push(value, index);
  }
};

// One tile: out[n * VR + v] = dot(hidden row n, weight row v) over H, for n < nr, v < vr (VR is
// the tile width the function was built for). `prefetch` (may be null) points at weight rows to
// pull into cache meanwhile.
template <class HT, class WT>
using TileFn = void (*)(const HT* hidden, int64_t ldh, const WT* weight, int64_t ldw, int64_t H, int nr, int vr,
                        const WT* prefetch, float* out);

// ---------------------------------------------------------------------------------------------
// Scalar fallback (hidden already float32; weight float32 or bf16)

inline float load_f32(const float* p) { return *p; }
inline float load_f32(const uint16_t* p) { return bf16_to_f32(*p); }

template <int VR, class WT>
void tile_scalar(const float* hidden, int64_t ldh, const WT* weight, int64_t ldw, int64_t H, int nr, int vr,
                 const WT* /*prefetch*/, float* out) {
  for (int n = 0; n < nr; ++n) {
    for (int v = 0; v < vr; ++v) {
      const float* h = hidden + n * ldh;
      const WT* w = weight + v * ldw;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= H; c += 8)
        for (int u = 0; u < 8; ++u) acc[u] += h[c + u] * load_f32(w + c + u);
      for (; c < H; ++c) acc[0] += h[c] * load_f32(w + c);
      out[n * VR + v] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 lanes; NR <= 2, VR = 4 keeps 8 accumulators + 5 operands in 16 ymm registers.

TD_AVX2 inline float hsum256(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TD_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TD_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <int NR, int VR, class WT>
TD_AVX2 void micro_avx2(const float* hidden, int64_t ldh, const WT* weight, int64_t ldw, int64_t H, float* out,
                        int out_ld) {
  __m256 acc[NR][VR];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < VR; ++v) acc[n][v] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= H; c += 8) {
    __m256 w[VR];
    for (int v = 0; v < VR; ++v) w[v] = load8(weight + v * ldw + c);
    for (int n = 0; n < NR; ++n) {
      const __m256 h = _mm256_loadu_ps(hidden + n * ldh + c);
      for (int v = 0; v < VR; ++v) acc[n][v] = _mm256_fmadd_ps(h, w[v], acc[n][v]);
    }
  }
  for (int n = 0; n < NR; ++n) {
    for (int v = 0; v < VR; ++v) {
      float s = hsum256(acc[n][v]);
      for (int64_t t = c; t < H; ++t) s += hidden[n * ldh + t] * load_f32(weight + v * ldw + t);
      out[n * out_ld + v] = s;
    }
  }
}

template <int VR, class WT>
TD_AVX2 void tile_avx2(const float* hidden, int64_t ldh, const WT* weight, int64_t ldw, int64_t H, int nr, int vr,
                       const WT* /*prefetch*/, float* out) {
  if (vr == VR) {
    if (nr == 2) return micro_avx2<2, VR>(hidden, ldh, weight, ldw, H, out, VR);
    return micro_avx2<1, VR>(hidden, ldh, weight, ldw, H, out, VR);
  }
  for (int v = 0; v < vr; ++v) {
    if (nr == 2)
      micro_avx2<2, 1>(hidden, ldh, weight + v * ldw, ldw, H, out + v, VR);
    else
      micro_avx2<1, 1>(hidden, ldh, weight + v * ldw, ldw, H, out + v, VR);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 lanes. Tiles of NR x VR accumulators (NR * VR <= 24) over 32 zmm registers.

TD_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TD_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
TD_AVX512 inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
TD_AVX512 inline __m512 load16_masked(const uint16_t* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The sums of 4 vectors -> the 4 lanes of one (a transposing reduction: 13 instructions for 4
// sums instead of 4 independent reduce_add chains).
TD_AVX512 inline __m128 hsum4x512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 a2 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  const __m256 c2 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  const __m256 d2 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  const __m256 ab = _mm256_hadd_ps(a2, b2);      // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c2, d2);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);    // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Lane sums of the accumulators, 4 at a time (a missing 4th, 3rd.. vector is zero). Every lane
// is reduced in the same order whatever its neighbours, so a weight row gets bit-identical
// logits wherever it falls in a tile (equal rows tie exactly and the smaller id wins).
template <int NR, int VR>
TD_AVX512 inline void store_sums(__m512 (&acc)[NR][VR], float* out, int out_ld) {
  const __m512 zero = _mm512_setzero_ps();
  for (int n = 0; n < NR; ++n) {
    for (int v = 0; v < VR; v += 4) {
      const __m128 sums = hsum4x512(acc[n][v], v + 1 < VR ? acc[n][v + 1] : zero, v + 2 < VR ? acc[n][v + 2] : zero,
                                    v + 3 < VR ? acc[n][v + 3] : zero);
      if (v + 4 <= VR) {
        _mm_storeu_ps(out + n * out_ld + v, sums);
      } else {
        alignas(16) float lanes[4];
        _mm_store_ps(lanes, sums);
        for (int u = 0; v + u < VR; ++u) out[n * out_ld + v + u] = lanes[u];
      }
    }
  }
}

// `prefetch`, when set, is the same column range of rows further down the weight: one cache line
// per row and step, so the next tiles are in flight while this one computes.
template <int NR, int VR, class WT>
TD_AVX512 void micro_avx512(const float* hidden, int64_t ldh, const WT* weight, int64_t ldw, int64_t H,
                            const WT* prefetch, float* out, int out_ld) {
  constexpr int64_t kStep = 16;
  __m512 acc[NR][VR];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < VR; ++v) acc[n][v] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + kStep <= H; c += kStep) {
    if (prefetch != nullptr && (c * sizeof(WT)) % 64 == 0)
      for (int v = 0; v < VR; ++v) _mm_prefetch(reinterpret_cast<const char*>(prefetch + v * ldw + c), _MM_HINT_T0);
    __m512 w[VR];
    for (int v = 0; v < VR; ++v) w[v] = load16(weight + v * ldw + c);
    for (int n = 0; n < NR; ++n) {
      const __m512 h = _mm512_loadu_ps(hidden + n * ldh + c);
      for (int v = 0; v < VR; ++v) acc[n][v] = _mm512_fmadd_ps(h, w[v], acc[n][v]);
    }
  }
  if (c < H) {
    const __mmask16 m = static_cast<__mmask16>((1u << (H - c)) - 1u);
    __m512 w[VR];
    for (int v = 0; v < VR; ++v) w[v] = load16_masked(weight + v * ldw + c, m);
    for (int n = 0; n < NR; ++n) {
      const __m512 h = _mm512_maskz_loadu_ps(m, hidden + n * ldh + c);
      for (int v = 0; v < VR; ++v) acc[n][v] = _mm512_fmadd_ps(h, w[v], acc[n][v]);
    }
  }
  store_sums<NR, VR>(acc, out, out_ld);
}

// ---------------------------------------------------------------------------------------------
// AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs into 16 float32 lanes per instruction.

template <int NR, int VR>
TD_AVX512BF16 void micro_bf16dp(const uint16_t* hidden, int64_t ldh, const uint16_t* weight, int64_t ldw, int64_t H,
                                const uint16_t* prefetch, float* out, int out_ld) {
  __m512 acc[NR][VR];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < VR; ++v) acc[n][v] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= H; c += 32) {
    if (prefetch != nullptr)
      for (int v = 0; v < VR; ++v) _mm_prefetch(reinterpret_cast<const char*>(prefetch + v * ldw + c), _MM_HINT_T0);
    __m512bh w[VR];
    for (int v = 0; v < VR; ++v) w[v] = (__m512bh)_mm512_loadu_si512(weight + v * ldw + c);
    for (int n = 0; n < NR; ++n) {
      const __m512bh h = (__m512bh)_mm512_loadu_si512(hidden + n * ldh + c);
      for (int v = 0; v < VR; ++v) acc[n][v] = _mm512_dpbf16_ps(acc[n][v], h, w[v]);
    }
  }
  if (c < H) {
    const __mmask32 m = static_cast<__mmask32>((1u << (H - c)) - 1u);
    __m512bh w[VR];
    for (int v = 0; v < VR; ++v) w[v] = (__m512bh)_mm512_maskz_loadu_epi16(m, weight + v * ldw + c);
    for (int n = 0; n < NR; ++n) {
      const __m512bh h = (__m512bh)_mm512_maskz_loadu_epi16(m, hidden + n * ldh + c);
      for (int v = 0; v < VR; ++v) acc[n][v] = _mm512_dpbf16_ps(acc[n][v], h, w[v]);
    }
  }
  store_sums<NR, VR>(acc, out, out_ld);
}

// Tile dispatchers: a full tile (vr == VR) runs the NR x VR kernel for nr rows; a ragged V edge
// runs one weight row at a time.
template <int VR, class WT>
TD_AVX512 void tile_avx512(const float* hidden, int64_t ldh, const WT* weight, int64_t ldw, int64_t H, int nr,
                           int vr, const WT* prefetch, float* out) {
  if (vr == VR) {
    switch (nr) {
      case 6: if constexpr (VR * 6 <= 24) return micro_avx512<6, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 5: if constexpr (VR * 5 <= 24) return micro_avx512<5, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 4: if constexpr (VR * 4 <= 24) return micro_avx512<4, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 3: if constexpr (VR * 3 <= 24) return micro_avx512<3, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 2: return micro_avx512<2, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
      default: return micro_avx512<1, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
    }
  }
  for (int n = 0; n < nr; ++n)
    for (int v = 0; v < vr; ++v)
      micro_avx512<1, 1>(hidden + n * ldh, ldh, weight + v * ldw, ldw, H, static_cast<const WT*>(nullptr), out + n * VR + v, VR);
}

template <int VR>
TD_AVX512BF16 void tile_bf16dp(const uint16_t* hidden, int64_t ldh, const uint16_t* weight, int64_t ldw, int64_t H,
                               int nr, int vr, const uint16_t* prefetch, float* out) {
  if (vr == VR) {
    switch (nr) {
      case 6: if constexpr (VR * 6 <= 24) return micro_bf16dp<6, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 5: if constexpr (VR * 5 <= 24) return micro_bf16dp<5, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 4: if constexpr (VR * 4 <= 24) return micro_bf16dp<4, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 3: if constexpr (VR * 3 <= 24) return micro_bf16dp<3, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
              [[fallthrough]];
      case 2: return micro_bf16dp<2, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
      default: return micro_bf16dp<1, VR>(hidden, ldh, weight, ldw, H, prefetch, out, VR);
    }
  }
  for (int n = 0; n < nr; ++n)
    for (int v = 0; v < vr; ++v)
      micro_bf16dp<1, 1>(hidden + n * ldh, ldh, weight + v * ldw, ldw, H, static_cast<const uint16_t*>(nullptr), out + n * VR + v, VR);
}

// ---------------------------------------------------------------------------------------------
// Driver

constexpr int kMaxNR = 6, kMaxVR = 8;

// How one ISA x dtype runs: its tile function and tile shape (rows of hidden x rows of weight).
template <class HT, class WT>
struct Plan {
  TileFn<HT, WT> tile;
  int nr_max;
  int vr;
};

// Round 4 floats to bf16 (nearest, ties to even; NaN kept) with SSE2 only.
inline __m128 round4_to_bf16(__m128 x) {
  const __m128i bits = _mm_castps_si128(x);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
  __m128i rounded = _mm_add_epi32(bits, _mm_add_epi32(_mm_set1_epi32(0x7fff), lsb));
  rounded = _mm_and_si128(rounded, _mm_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m128 is_nan = _mm_cmpunord_ps(x, x);
  return _mm_or_ps(_mm_and_ps(is_nan, x), _mm_andnot_ps(is_nan, _mm_castsi128_ps(rounded)));
}

// Feed one row of tile logits (count of them, ids from v0) to a top-k list: 4 at a time, one
// compare rejects all four unless one of them could enter (or is NaN).
inline void offer_row(TopK& list, float* logits, int count, int64_t v0, bool round_bf16) {
  int v = 0;
  for (; v + 4 <= count; v += 4) {
    __m128 x = _mm_loadu_ps(logits + v);
    if (round_bf16) {
      x = round4_to_bf16(x);
      _mm_storeu_ps(logits + v, x);
    }
    if (_mm_movemask_ps(_mm_cmpnlt_ps(x, _mm_set1_ps(list.threshold))) == 0) continue;
    for (int u = 0; u < 4; ++u) list.offer(logits[v + u], v0 + v + u);
  }
  for (; v < count; ++v) list.offer(round_bf16 ? round_to_bf16(logits[v]) : logits[v], v0 + v);
}

// Weight rows to prefetch ahead so that about `distance` bytes are in flight (whole tiles).
template <class WT>
int64_t prefetch_rows_for(int VR, int64_t H, int64_t distance) {
  const int64_t tile_bytes = std::max<int64_t>(1, VR * H * static_cast<int64_t>(sizeof(WT)));
  return VR * std::max<int64_t>(1, (distance + tile_bytes - 1) / tile_bytes);
}

// Weight rows [v_lo, v_hi) against all N input rows: each VR-row weight tile meets the rows in
// register tiles (it stays in L1 meanwhile), and take(n0, nr, v0, vr, sums) consumes (and may
// overwrite) each tile's nr x vr sums (row stride VR). `rows` (V or O) bounds the prefetch.
template <class HT, class WT, class Take>
inline void for_each_tile(const HT* x, int64_t ldx, const WT* weight, int64_t ldw, int64_t N, int64_t H, int64_t rows,
                          int64_t v_lo, int64_t v_hi, const Plan<HT, WT>& plan, int64_t prefetch_rows, Take&& take) {
  const int VR = plan.vr;
  // Input rows in balanced groups of at most nr_max (N = 8 as 4 + 4, not 6 + 2): a short group
  // has too few independent accumulators to hide the multiply-add latency.
  const int64_t groups = (N + plan.nr_max - 1) / plan.nr_max;
  const int64_t rows_per_group = N / groups, rows_extra = N % groups;
  alignas(64) float sums[kMaxNR * kMaxVR];
  for (int64_t v0 = v_lo; v0 < v_hi; v0 += VR) {
    const int vr = static_cast<int>(std::min<int64_t>(VR, v_hi - v0));
    const WT* prefetch = v0 + prefetch_rows + VR <= rows ? weight + (v0 + prefetch_rows) * ldw : nullptr;
    for (int64_t g = 0, n0 = 0; g < groups; ++g) {
      const int nr = static_cast<int>(rows_per_group + (g < rows_extra ? 1 : 0));
      plan.tile(x + n0 * ldx, ldx, weight + v0 * ldw, ldw, H, nr, vr, g == 0 ? prefetch : nullptr, sums);
      take(n0, nr, v0, vr, sums);
      n0 += nr;
    }
  }
}

template <class HT, class WT>
void run(const HT* hidden, int64_t ldh, const WT* weight, int64_t ldw, float* values, int64_t* indices, int64_t N,
         int64_t V, int64_t H, int64_t k, Plan<HT, WT> plan, bool round_bf16, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  // Each thread needs a few chunks of V to be worth waking.
  const int64_t max_useful = std::max<int64_t>(1, V / 2048);
  if (num_threads > max_useful) num_threads = static_cast<int>(max_useful);
  std::vector<float> part_values(static_cast<size_t>(num_threads * N * k));
  std::vector<int64_t> part_indices(static_cast<size_t>(num_threads * N * k));
  std::vector<int64_t> part_counts(static_cast<size_t>(num_threads * N), 0);
  const int VR = plan.vr;
  // Prefetch about this many bytes of weight ahead of the tile being multiplied.
  const char* distance_env = std::getenv("TREEDEC_LMHEAD_PREFETCH");  // tuning experiments
  const int64_t prefetch_rows = prefetch_rows_for<WT>(VR, H, distance_env ? std::atoll(distance_env) : 16384);
  // Threads take chunks of V dynamically: on a shared or SMT machine one slow thread must not
  // leave the other idle at the end, as a static split would.
  const int64_t chunk = 512;
  const int64_t num_chunks = (V + chunk - 1) / chunk;
#pragma omp parallel num_threads(num_threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    std::vector<TopK> lists(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t slot = (static_cast<int64_t>(tid) * N + n) * k;
      lists[n] = TopK{part_values.data() + slot, part_indices.data() + slot, k, 0,
                      -std::numeric_limits<float>::infinity()};
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < num_chunks; ++c) {
      for_each_tile(hidden, ldh, weight, ldw, N, H, V, c * chunk, std::min<int64_t>(V, (c + 1) * chunk), plan,
                    prefetch_rows, [&](int64_t n0, int nr, int64_t v0, int vr, float* sums) {
                      for (int n = 0; n < nr; ++n) offer_row(lists[n0 + n], sums + n * VR, vr, v0, round_bf16);
                    });
    }
    for (int64_t n = 0; n < N; ++n) part_counts[static_cast<size_t>(tid * N + n)] = lists[n].count;
  }

  // Merge the per-thread lists of each row.
  for (int64_t n = 0; n < N; ++n) {
    TopK merged{values + n * k, indices + n * k, k, 0, -std::numeric_limits<float>::infinity()};
    for (int t = 0; t < num_threads; ++t) {
      const int64_t slot = (static_cast<int64_t>(t) * N + n) * k;
      for (int64_t i = 0; i < part_counts[static_cast<size_t>(t * N + n)]; ++i)
        merged.push(part_values[slot + i], part_indices[slot + i]);
    }
    for (int64_t i = merged.count; i < k; ++i) {  // only if k > V, which callers rule out
      values[n * k + i] = -std::numeric_limits<float>::infinity();
      indices[n * k + i] = 0;
    }
  }
}

std::vector<float> hidden_to_f32(const void* hidden, int64_t N, int64_t H, int64_t ldh, Dtype dtype) {
  std::vector<float> out(static_cast<size_t>(N * H));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < H; ++c) {
      out[n * H + c] = dtype == Dtype::kFloat32 ? static_cast<const float*>(hidden)[n * ldh + c]
                                                : bf16_to_f32(static_cast<const uint16_t*>(hidden)[n * ldh + c]);
    }
  }
  return out;
}

// Tile shapes: few hidden rows stream the weight (memory bound), so they take wide tiles for
// more independent loads in flight; many rows are compute bound and take tall ones, which load
// fewer operands per multiply-add.
template <class WT>
Plan<float, WT> plan_f32(Isa isa, int64_t N) {
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16) {
    if (const char* tile = std::getenv("TREEDEC_LMHEAD_TILE")) {  // experiments: "NRxVR"
      const int nr = std::atoi(tile), vr = std::atoi(std::strchr(tile, 'x') ? std::strchr(tile, 'x') + 1 : "4");
      if (vr == 8) return {tile_avx512<8, WT>, std::min(nr, 2), 8};
      if (vr == 6) return {tile_avx512<6, WT>, std::min(nr, 4), 6};
      return {tile_avx512<4, WT>, std::min(nr, 6), 4};
    }
    if (N <= 2) return {tile_avx512<8, WT>, 2, 8};
    return {tile_avx512<4, WT>, 6, 4};
  }
  if (isa == Isa::kAvx2) return {tile_avx2<4, WT>, 2, 4};
  return {tile_scalar<4, WT>, 4, 4};
}

Plan<uint16_t, uint16_t> plan_bf16dp(int64_t N) {
  if (const char* tile = std::getenv("TREEDEC_LMHEAD_TILE")) {  // experiments: "NRxVR"
    const int nr = std::atoi(tile), vr = std::atoi(std::strchr(tile, 'x') ? std::strchr(tile, 'x') + 1 : "4");
    if (vr == 8) return {tile_bf16dp<8>, std::min(nr, 2), 8};
    if (vr == 6) return {tile_bf16dp<6>, std::min(nr, 4), 6};
    return {tile_bf16dp<4>, std::min(nr, 6), 4};
  }
  if (N <= 2) return {tile_bf16dp<8>, 2, 8};
  return {tile_bf16dp<4>, 6, 4};
}

// ---------------------------------------------------------------------------------------------
// A linear layer for a few rows (a verify step's T tree nodes): y[N, O] = x[N, H] @ weight[O, H]^T
// (+ bias), with the same register tiles. Each thread streams its own contiguous slice of the
// weight once, so a few rows cost about what one row costs: the weight read. (torch's fp32
// matmul here reads it at roughly half that rate for 2 to 16 rows; see bench/kernels.py.)

template <class HT, class WT>
void run_linear(const HT* x, int64_t ldx, const WT* weight, int64_t ldw, const float* bias, float* y_f32,
                uint16_t* y_bf16, int64_t N, int64_t O, int64_t H, Plan<HT, WT> plan, int num_threads) {
  const int VR = plan.vr;
  const int64_t chunk = 16 * VR;  // weight rows per work item; a thread takes contiguous ones
  const int64_t num_chunks = (O + chunk - 1) / chunk;
  if (num_threads > num_chunks) num_threads = static_cast<int>(num_chunks);
  if (num_threads < 1) num_threads = 1;
  const int64_t prefetch_rows = prefetch_rows_for<WT>(VR, H, 16384);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t c = 0; c < num_chunks; ++c) {
    for_each_tile(x, ldx, weight, ldw, N, H, O, c * chunk, std::min<int64_t>(O, (c + 1) * chunk), plan, prefetch_rows,
                  [&](int64_t n0, int nr, int64_t v0, int vr, float* sums) {
                    for (int n = 0; n < nr; ++n) {
                      for (int v = 0; v < vr; ++v) {
                        const float value = sums[n * VR + v] + (bias != nullptr ? bias[v0 + v] : 0.0f);
                        const int64_t at = (n0 + n) * O + v0 + v;
                        if (y_bf16 != nullptr) {
                          uint32_t bits;
                          const float rounded = round_to_bf16(value);
                          std::memcpy(&bits, &rounded, sizeof(bits));
                          y_bf16[at] = static_cast<uint16_t>(bits >> 16);
                        } else {
                          y_f32[at] = value;
                        }
                      }
                    }
                  });
  }
}

}  // namespace

Isa best_isa(Dtype dtype) {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (dtype == Dtype::kBFloat16 && avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
  if (avx512) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void lm_head_topk(const void* hidden, const void* weight, float* values, int64_t* indices, int64_t N, int64_t V,
                  int64_t H, int64_t ldh, int64_t ldw, int64_t k, Dtype dtype, Isa isa, int num_threads) {
  if (N <= 0 || k <= 0) return;
  const bool bf16 = dtype == Dtype::kBFloat16;
  if (isa == Isa::kAvx512Bf16 && bf16) {
    run<uint16_t, uint16_t>(static_cast<const uint16_t*>(hidden), ldh, static_cast<const uint16_t*>(weight), ldw,
                            values, indices, N, V, H, k, plan_bf16dp(N), true, num_threads);
    return;
  }
  // Every other path multiplies float32 hidden rows (converted once, here) by the weight as stored.
  const std::vector<float> h32 = hidden_to_f32(hidden, N, H, ldh, dtype);
  if (bf16) {
    run<float, uint16_t>(h32.data(), H, static_cast<const uint16_t*>(weight), ldw, values, indices, N, V, H, k,
                         plan_f32<uint16_t>(isa, N), true, num_threads);
  } else {
    run<float, float>(h32.data(), H, static_cast<const float*>(weight), ldw, values, indices, N, V, H, k,
                      plan_f32<float>(isa, N), false, num_threads);
  }
}

void linear_rows(const void* x, const void* weight, const float* bias, void* y, int64_t N, int64_t O, int64_t H,
                 int64_t ldx, int64_t ldw, Dtype dtype, Isa isa, int num_threads) {
  if (N <= 0 || O <= 0) return;
  const bool bf16 = dtype == Dtype::kBFloat16;
  float* y_f32 = bf16 ? nullptr : static_cast<float*>(y);
  uint16_t* y_bf16 = bf16 ? static_cast<uint16_t*>(y) : nullptr;
  if (isa == Isa::kAvx512Bf16 && bf16) {
    run_linear<uint16_t, uint16_t>(static_cast<const uint16_t*>(x), ldx, static_cast<const uint16_t*>(weight), ldw,
                                   bias, y_f32, y_bf16, N, O, H, plan_bf16dp(N), num_threads);
    return;
  }
  const std::vector<float> x32 = hidden_to_f32(x, N, H, ldx, dtype);
  if (bf16) {
    run_linear<float, uint16_t>(x32.data(), H, static_cast<const uint16_t*>(weight), ldw, bias, y_f32, y_bf16, N, O,
                                H, plan_f32<uint16_t>(isa, N), num_threads);
  } else {
    run_linear<float, float>(x32.data(), H, static_cast<const float*>(weight), ldw, bias, y_f32, y_bf16, N, O, H,
                             plan_f32<float>(isa, N), num_threads);
  }
}

}  // namespace treedec
