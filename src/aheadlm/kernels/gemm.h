// Small-batch matrix products for decoding and verification (AVX2 + FMA; 512-bit vectors when built
// with AVX-512F), each output row computed independently of the others (batch-invariant).
//
// y[M, N] = x[M, K] @ W[N, K]^T with float32 activations and compact weights:
//   q8   : int8 values with one float32 scale (and optional offset) per block of BS weights along K,
//          w = q * scale (+ offset), rounded exactly as the GGUF dequantizer rounds it, so the
//          weights are bit-identical to the dequantized float32 ones at about a third of the bytes;
//   bf16 : bfloat16 weights widened to float32 (exact).
// Each widened weight vector is reused from registers by up to 6 rows of x; larger M (prefill)
// widens a pair of weight rows once into an L1 buffer. Every row still costs a multiply-add per
// weight, so verifying 4 drafts costs about two decode steps; where the CPU has AVX-512 VNNI,
// intgemm.h's integer products replace these for int8 and 4-bit weights (about 1.3 decode steps).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rows.h"

namespace aheadlm {

// The matrix products use the widest vectors the build allows: 16 floats with AVX-512 (about twice
// the multiply-add throughput where the core has 512-bit units), else 8 with AVX2. Everything else
// stays AVX2. One build uses one width for every M, so batch invariance holds within a build.
#if defined(__AVX512F__)
using vec = __m512;
constexpr int kWidth = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec widen_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec widen_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// kWidth 4-bit values: the low (hi = false) or high nibbles of kWidth bytes, minus `zero`.
inline vec widen_u4(const uint8_t* p, bool hi, int zero) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v = hi ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(15));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(zero)));
}
inline float vsum(vec v) {
  // A fixed pairwise order (not _mm512_reduce_add_ps, whose order is the compiler's choice).
  __m256 lo = _mm512_castps512_ps256(v);
  __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum8(_mm256_add_ps(lo, hi));
}
#else
using vec = __m256;
constexpr int kWidth = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec widen_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec widen_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec widen_u4(const uint8_t* p, bool hi, int zero) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v = hi ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(zero)));
}
inline float vsum(vec v) { return hsum8(v); }
#endif

// Weight formats. `scale(n, b)` fetches what block b of row n needs (its scale and offset for q8),
// `load(n, k, s)` widens kWidth weights at column k (inside that block) to float32.
template <int BS, bool OFF>
struct Q8Rows {
  static constexpr int kBlock = BS;
  struct Scale {
    vec s, o;
  };
  const int8_t* q;
  const float* sc;
  const float* off;
  int64_t K, nb;
  inline Scale scale(int64_t n, int64_t b) const {
    return {vbroadcast(sc + n * nb + b), OFF ? vbroadcast(off + n * nb + b) : vzero()};
  }
  inline vec load(int64_t n, int64_t k, const Scale& s) const {
    vec w = vmul(widen_i8(q + n * K + k), s.s);
    if (OFF) w = vadd(w, s.o);
    return w;
  }
};

// 4-bit values (GGUF's Q4_0, Q4_1 and Q4_K blocks) packed two to a byte, 16 bytes per block of 32:
// byte j holds value j in its low nibble and value j + 16 in its high one. w = (nibble - ZERO) *
// scale (+ offset): the same integers and roundings as the int8 form of the same blocks, so the
// products are bit-identical to it at about half the bytes.
template <bool OFF, int ZERO>
struct Q4Rows {
  static constexpr int kBlock = 32;
  using Scale = typename Q8Rows<32, OFF>::Scale;
  const uint8_t* q;
  const float* sc;
  const float* off;
  int64_t K, nb;
  inline Scale scale(int64_t n, int64_t b) const {
    return {vbroadcast(sc + n * nb + b), OFF ? vbroadcast(off + n * nb + b) : vzero()};
  }
  inline vec load(int64_t n, int64_t k, const Scale& s) const {
    const int64_t j = k % 32;
    vec w = vmul(widen_u4(q + n * (K / 2) + (k / 32) * 16 + j % 16, j >= 16, ZERO), s.s);
    if (OFF) w = vadd(w, s.o);
    return w;
  }
};

struct BF16Rows {
  static constexpr int kBlock = 32;
  struct Scale {};
  const uint16_t* w;
  int64_t K;
  inline Scale scale(int64_t, int64_t) const { return {}; }
  inline vec load(int64_t n, int64_t k, const Scale&) const { return widen_bf16(w + n * K + k); }
};

struct F32Rows {
  static constexpr int kBlock = 16;
  struct Scale {};
  const float* w;
  int64_t K;
  inline Scale scale(int64_t, int64_t) const { return {}; }
  inline vec load(int64_t n, int64_t k, const Scale&) const { return vload(w + n * K + k); }
};

// Rows `ids[n]` of another format, read in place (a clustered draft head scores a few thousand
// rows of the 262k-row embedding table without copying them out first).
template <typename W>
struct Indexed {
  static constexpr int kBlock = W::kBlock;
  using Scale = typename W::Scale;
  W w;
  const int64_t* ids;
  inline Scale scale(int64_t n, int64_t b) const { return w.scale(ids[n], b); }
  inline vec load(int64_t n, int64_t k, const Scale& s) const { return w.load(ids[n], k, s); }
};

// Register tile: MR rows of x (row stride K) against NR weight rows starting at n. Every output
// sums its products in the same order whatever the tile shape (two partial sums over alternating
// vectors, then added), so a row's result does not depend on how many rows are computed with it:
// batched verification gives bit-identical logits to one-token decoding. K is walked in spans of
// SB columns, each one or more whole blocks holding an even number of vectors.
template <int MR, int NR, typename W>
inline void tile(const W& w, const float* x, int64_t K, int64_t n, float* y, int64_t ldy) {
  constexpr int BS = W::kBlock;
  constexpr int UB = 2;
  constexpr int SB = BS > UB * kWidth ? BS : UB * kWidth;
  static_assert(BS % kWidth == 0 && SB % BS == 0, "blocks hold whole vectors");
  vec acc[UB][MR][NR];
#pragma GCC unroll 4
  for (int u = 0; u < UB; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int r = 0; r < NR; ++r) acc[u][m][r] = vzero();
  const int64_t spans = K / SB;
  for (int64_t sb = 0; sb < spans; ++sb) {
    typename W::Scale s[NR];
#pragma GCC unroll 4
    for (int j = 0; j < SB; j += kWidth) {
      const int u = (j / kWidth) % UB;
      const int64_t k = sb * SB + j;
      if (j % BS == 0) {
#pragma GCC unroll 2
        for (int r = 0; r < NR; ++r) s[r] = w.scale(n + r, k / BS);
      }
      vec wv[NR];
#pragma GCC unroll 2
      for (int r = 0; r < NR; ++r) wv[r] = w.load(n + r, k, s[r]);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const vec xv = vload(x + m * K + k);
#pragma GCC unroll 2
        for (int r = 0; r < NR; ++r) acc[u][m][r] = vfmadd(wv[r], xv, acc[u][m][r]);
      }
    }
  }
  // A last block shorter than a span (K an odd number of 16-wide blocks): one vector per step.
  for (int64_t k = spans * SB; k < K; k += kWidth) {
    typename W::Scale s[NR];
    for (int r = 0; r < NR; ++r) s[r] = w.scale(n + r, k / BS);
    for (int r = 0; r < NR; ++r) {
      const vec wv = w.load(n + r, k, s[r]);
      for (int m = 0; m < MR; ++m) acc[0][m][r] = vfmadd(wv, vload(x + m * K + k), acc[0][m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      vec t = acc[0][m][r];
      for (int u = 1; u < UB; ++u) t = vadd(t, acc[u][m][r]);
      y[m * ldy + r] = vsum(t);
    }
}

// Row n of a weight format as K float32 values, widened exactly as the products widen it.
template <typename W>
void widen_row(const W& w, int64_t n, int64_t K, float* out) {
  for (int64_t b = 0; b < K / W::kBlock; ++b) {
    const auto s = w.scale(n, b);
    for (int j = 0; j < W::kBlock; j += kWidth) {
      const int64_t k = b * W::kBlock + j;
      vstore(out + k, w.load(n, k, s));
    }
  }
}

// M <= 6: every weight is widened once, one weight row per tile (one memory stream per thread).
template <typename W>
void gemm_small(const W& w, const float* x, int64_t M, int64_t K, int64_t N, float* y) {
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* yn = y + n;
      switch (M) {
        case 1: tile<1, 1>(w, x, K, n, yn, N); break;
        case 2: tile<2, 1>(w, x, K, n, yn, N); break;
        case 3: tile<3, 1>(w, x, K, n, yn, N); break;
        case 4: tile<4, 1>(w, x, K, n, yn, N); break;
        case 5: tile<5, 1>(w, x, K, n, yn, N); break;
        default: tile<6, 1>(w, x, K, n, yn, N); break;
      }
    }
  });
}

// M > 36 (prefill chunks): rows of x in blocks that stay in L2; per block, each pair of weight rows
// is widened once into an L1 buffer and swept by every row of the block.
template <typename W>
void gemm_large(const W& w, const float* x, int64_t M, int64_t K, int64_t N, float* y) {
  const int64_t grain = std::max<int64_t>(1, 4096 / K);
  const int64_t mb = std::max<int64_t>(8, std::min<int64_t>(128, (128 * 1024) / (4 * K)));
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    const int64_t mr = std::min(mb, M - m0);
    const float* xb = x + m0 * K;
    float* yb = y + m0 * N;
    at::parallel_for(0, (N + 1) / 2, grain, [&](int64_t p0, int64_t p1) {
      std::vector<float> buf(2 * K);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = 2 * p;
        const int nr = n + 1 < N ? 2 : 1;
        for (int r = 0; r < nr; ++r) widen_row(w, n + r, K, buf.data() + r * K);
        const F32Rows f{buf.data(), K};
        int64_t m = 0;
        for (; m + 4 <= mr; m += 4) {
          if (nr == 2) tile<4, 2>(f, xb + m * K, K, 0, yb + m * N + n, N);
          else tile<4, 1>(f, xb + m * K, K, 0, yb + m * N + n, N);
        }
        for (; m < mr; ++m) {
          if (nr == 2) tile<1, 2>(f, xb + m * K, K, 0, yb + m * N + n, N);
          else tile<1, 1>(f, xb + m * K, K, 0, yb + m * N + n, N);
        }
      }
    });
  }
}

// Up to 36 rows: even chunks of at most 6 rows, each reading the weights once (cheaper than the
// buffered path while widening dominates); beyond that the buffered path. Both sum in the same order.
template <typename W>
void gemm(const W& w, const float* x, int64_t M, int64_t K, int64_t N, float* y) {
  if (M > 36) return gemm_large(w, x, M, K, N, y);
  const int64_t chunks = (M + 5) / 6, rows = (M + chunks - 1) / chunks;
  for (int64_t m = 0; m < M; m += rows) {
    gemm_small(w, x + m * K, std::min(rows, M - m), K, N, y + m * N);
  }
}

}  // namespace aheadlm
