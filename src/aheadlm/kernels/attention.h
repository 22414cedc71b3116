// Attention of a few query rows over a KV cache (decode, verification, drafting, prefill chunks),
// each row computed exactly as it would be alone, so results never depend on the batch.
//
// Query rows that share a KV head (a GQA group times the new tokens) are taken in tiles: each key
// and value row is read once per tile, softmax weights come from a vectorised exp, and each row's
// output accumulates in registers. A row's arithmetic (its dot products, the order of its sums)
// is fixed by the slot order alone, never by the tile it is in, so tiling is free to follow the
// thread count. Against one row at a time, a layer's attention got 1.2-3.7x faster on Gemma 3
// and SmolLM2 shapes (docs/benchmarks.md, "Long contexts").
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gemm.h"

namespace aheadlm {

// exp(x) for x <= 0 (softmax weights): Cephes' single-precision polynomial, about 1 ulp; below
// -87 it is 0.
inline vec vexp_nonpositive(vec x) {
#if defined(__AVX512F__)
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  const vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
#else
  const vec tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  const vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
#endif
  auto c = [](float f) { return vbroadcast(&f); };
  vec r = vfmadd(n, c(-0.693359375f), x);
  r = vfmadd(n, c(2.12194440e-4f), r);
  vec p = c(1.9875691500e-4f);
  p = vfmadd(p, r, c(1.3981999507e-3f));
  p = vfmadd(p, r, c(8.3334519073e-3f));
  p = vfmadd(p, r, c(4.1665795894e-2f));
  p = vfmadd(p, r, c(1.6666665459e-1f));
  p = vfmadd(p, r, c(5.0000001201e-1f));
  p = vadd(vfmadd(p, vmul(r, r), r), c(1.f));
#if defined(__AVX512F__)
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
#else
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
#endif
}

#if defined(__AVX512F__)
using vmask = __mmask16;
inline bool mask_any(vmask m) { return m != 0; }
inline vec select_or(vmask m, vec v, float other) { return _mm512_mask_blend_ps(m, _mm512_set1_ps(other), v); }
// Slots (positions kp, int32, -1 empty) that a query at position pos sees.
inline vmask visible(const int32_t* kp, int64_t pos, int64_t window, bool strict) {
  const __m512i k = _mm512_loadu_si512(kp), p = _mm512_set1_epi32(static_cast<int32_t>(pos));
  vmask m = _mm512_cmp_epi32_mask(k, _mm512_setzero_si512(), _MM_CMPINT_NLT);
  m &= strict ? _mm512_cmp_epi32_mask(k, p, _MM_CMPINT_LT) : _mm512_cmp_epi32_mask(k, p, _MM_CMPINT_LE);
  if (window > 0)
    m &= _mm512_cmp_epi32_mask(_mm512_sub_epi32(p, k), _mm512_set1_epi32(static_cast<int32_t>(window)), _MM_CMPINT_LT);
  return m;
}
// Lane sums of 16 vectors by a fixed tree, in two steps so that only four products are live at a
// time: `quad_sums` folds four vectors (keys 4j..4j+3) into one, `lane_sums` the four results into
// lane i = the sum of vector i's lanes. Every lane position always takes the same path.
inline vec quad_sums(const vec* v) {
  vec t[2];
  for (int h = 0; h < 2; ++h) t[h] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * h], v[2 * h + 1]), _mm512_unpackhi_ps(v[2 * h], v[2 * h + 1]));
  return _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
}
inline vec lane_sums(const vec* u) {
  vec x[2];
  for (int h = 0; h < 2; ++h)
    x[h] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
inline float vmax(vec v) { return _mm512_reduce_max_ps(v); }  // exact in any order
inline vec vmaxv(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec fmadd_unless_zero(vec e, vec v, vec acc) {  // acc + e * v, or acc where e is 0
  return _mm512_mask3_fmadd_ps(e, v, acc, _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_UQ));
}
#else
using vmask = __m256;
inline bool mask_any(vmask m) { return _mm256_movemask_ps(m) != 0; }
inline vec select_or(vmask m, vec v, float other) { return _mm256_blendv_ps(_mm256_set1_ps(other), v, m); }
inline vmask visible(const int32_t* kp, int64_t pos, int64_t window, bool strict) {
  const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp));
  const __m256i p = _mm256_set1_epi32(static_cast<int32_t>(pos)), minus1 = _mm256_set1_epi32(-1);
  __m256i m = _mm256_cmpgt_epi32(k, minus1);
  m = _mm256_and_si256(m, strict ? _mm256_cmpgt_epi32(p, k) : _mm256_cmpgt_epi32(_mm256_add_epi32(p, _mm256_set1_epi32(1)), k));
  if (window > 0)
    m = _mm256_and_si256(m, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(window)), _mm256_sub_epi32(p, k)));
  return _mm256_castsi256_ps(m);
}
inline vec quad_sums(const vec* v) { return _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3])); }
inline vec lane_sums(const vec* u) {
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}
inline float vmax(vec v) {
  float t[8];
  _mm256_storeu_ps(t, v);
  return *std::max_element(t, t + 8);
}
inline vec vmaxv(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec fmadd_unless_zero(vec e, vec v, vec acc) {
  return _mm256_blendv_ps(acc, _mm256_fmadd_ps(e, v, acc), _mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_NEQ_UQ));
}
#endif

// The first n (< kWidth) floats at p; the rest of the vector is zero.
inline vec vload_n(const float* p, int64_t n) {
#if defined(__AVX512F__)
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
#else
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, m);
#endif
}
inline void vstore_n(float* p, vec v, int64_t n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
#else
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_maskstore_ps(p, m, v);
#endif
}
// kWidth floats at p, or the first n of them when n < kWidth (loaded and stored).
inline vec vload_upto(const float* p, int64_t n) { return n >= kWidth ? vload(p) : vload_n(p, n); }
inline void vstore_upto(float* p, vec v, int64_t n) {
  if (n >= kWidth)
    vstore(p, v);
  else
    vstore_n(p, v, n);
}

// K/V rows as floats, from float or bfloat16 storage (a bfloat16 widens exactly: its bits are
// the float's upper half).
inline vec load_kv(const float* p) { return vload(p); }
inline vec load_kv_n(const float* p, int64_t n) { return vload_n(p, n); }
inline vec load_kv(const bf16_t* p) {
#if defined(__AVX512F__)
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
#else
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
#endif
}
inline vec load_kv_n(const bf16_t* p, int64_t n) {
  bf16_t t[kWidth] = {};
  std::copy(p, p + n, t);
  return load_kv(t);
}
template <class KV>
inline vec load_kv_upto(const KV* p, int64_t n) {
  return n >= kWidth ? load_kv(p) : load_kv_n(p, n);
}

// Scores of query row q against the kWidth keys at k[i] (D values each): one multiply-add chain
// per key over D (eight keys at a time, enough chains to keep the multiply-add units busy), then
// the lane sums.
template <class KV>
inline vec block_scores(const float* q, const KV* const* k, int64_t D) {
  vec u[kWidth / 4];
  for (int j = 0; j < kWidth / 8; ++j) {
    vec acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = vzero();
    const KV* const* kj = k + 8 * j;
    int64_t d = 0;
    for (; d + kWidth <= D; d += kWidth) {
      const vec qd = vload(q + d);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = vfmadd(qd, load_kv(kj[i] + d), acc[i]);
    }
    if (d < D) {
      const vec qd = vload_n(q + d, D - d);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = vfmadd(qd, load_kv_n(kj[i] + d, D - d), acc[i]);
    }
    u[2 * j] = quad_sums(acc);
    u[2 * j + 1] = quad_sums(acc + 4);
  }
  return lane_sums(u);
}

constexpr int kRegRows = kWidth == 16 ? 5 : 2;  // rows whose value accumulators fit the registers
constexpr int kV = 4;                              // value vectors accumulated per row at a time
constexpr int kChunk = kV * kWidth;                // and the columns they cover
constexpr int kTile = 32;                          // most query rows that share one pass over K and V
constexpr int64_t kSlab = 256;                     // slots whose values stay in cache for a tile

// out[r] += sum_{s in [s0, s1)} w[r * Sp + s] * v[s] for N rows over columns [d0, d0 + nd) (out[r]
// = the sum when `first`), the accumulators in registers (FULL: nd == kChunk). Slots are added in
// order and a zero weight adds nothing, so a row's sums depend on neither the slabs nor the rows.
template <int N, bool FULL, class KV>
inline void weighted_chunk(const float* w, int64_t s0, int64_t s1, int64_t Sp, float* const* out, const KV* vb,
                           int64_t vs, int64_t d0, int64_t nd, bool first) {
  const int nv = FULL ? kV : static_cast<int>((nd + kWidth - 1) / kWidth);
  auto n_at = [&](int j) { return FULL ? kWidth : nd - j * kWidth; };
  vec acc[N][kV];
#pragma GCC unroll 8
  for (int r = 0; r < N; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kV; ++j) acc[r][j] = first || j >= nv ? vzero() : vload_upto(out[r] + d0 + j * kWidth, n_at(j));
  for (int64_t s = s0; s < s1; ++s) {
    const KV* vr = vb + s * vs + d0;
    vec v[kV];
#pragma GCC unroll 4
    for (int j = 0; j < kV; ++j)
      v[j] = FULL ? load_kv(vr + j * kWidth) : j < nv ? load_kv_upto(vr + j * kWidth, n_at(j)) : vzero();
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) {
      const vec ev = vbroadcast(w + r * Sp + s);
#pragma GCC unroll 4
      for (int j = 0; j < kV; ++j) acc[r][j] = fmadd_unless_zero(ev, v[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < N; ++r)
    for (int j = 0; j < nv; ++j) vstore_upto(out[r] + d0 + j * kWidth, acc[r][j], n_at(j));
}

template <int N, class KV>
inline void weighted_values(const float* w, int64_t s0, int64_t s1, int64_t Sp, float* const* out, const KV* vb,
                            int64_t vs, int64_t D, bool first) {
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    if (D - d0 >= kChunk)
      weighted_chunk<N, true>(w, s0, s1, Sp, out, vb, vs, d0, kChunk, first);
    else
      weighted_chunk<N, false>(w, s0, s1, Sp, out, vb, vs, d0, D - d0, first);
  }
}

template <class KV>
inline void weighted_values_n(int n, const float* w, int64_t s0, int64_t s1, int64_t Sp, float* const* out,
                              const KV* vb, int64_t vs, int64_t D, bool first) {
  switch (n) {
    case 1: return weighted_values<1>(w, s0, s1, Sp, out, vb, vs, D, first);
    case 2: return weighted_values<2>(w, s0, s1, Sp, out, vb, vs, D, first);
#if defined(__AVX512F__)
    case 3: return weighted_values<3>(w, s0, s1, Sp, out, vb, vs, D, first);
    case 4: return weighted_values<4>(w, s0, s1, Sp, out, vb, vs, D, first);
    default: return weighted_values<5>(w, s0, s1, Sp, out, vb, vs, D, first);
#else
    default: return weighted_values<2>(w, s0, s1, Sp, out, vb, vs, D, first);
#endif
  }
}

// Query rows q[r] (n <= kTile) at positions pos[r] over slots [0, S) of one KV head (keys kb,
// values vb, row strides ks, vs; kp the position held by each slot as int32, -1 empty, padded with
// -1 to Sp, a multiple of kWidth). A key is visible to a row when 0 <= kp <= pos (kp < pos if
// `strict`) and, with a window, pos - kp < window. out[r] gets the softmax-weighted values, or
// zeros when no key is visible. w holds n * Sp floats; zeros, D zeros (the keys past S).
template <class KV>
inline void attend_tile(int n, const float* const* q, const int64_t* pos, float* const* out, const KV* kb,
                        int64_t ks, const KV* vb, int64_t vs, const int32_t* kp, int64_t S, int64_t Sp, int64_t D,
                        int64_t window, bool strict, float sc, float* w, const KV* zeros, float* kw) {
  // Scores, -inf where hidden: each block of keys is read once for the tile, and not at all when
  // no row of the tile sees it. bfloat16 keys are widened once per block into kw (kWidth * D
  // floats) when many rows share them (verification, prefill), rather than once per row; widening
  // is exact, so the scores are the same bits either way.
  constexpr bool narrow = !std::is_same_v<KV, float>;
  constexpr int widen_above = 4;  // a decode step's rows (one KV head's query heads) convert as they read
  const vec scale = vbroadcast(&sc);
  int64_t lo = Sp, hi = 0;  // the blocks of slots some row of the tile sees; the rest weigh 0
  for (int64_t s0 = 0; s0 < Sp; s0 += kWidth) {
    vmask m[kTile];
    bool seen = false;
    for (int r = 0; r < n; ++r) seen |= mask_any(m[r] = visible(kp + s0, pos[r], window, strict));
    if (seen) lo = std::min(lo, s0), hi = s0 + kWidth;
    const KV* k[kWidth];
    for (int i = 0; i < kWidth; ++i) k[i] = s0 + i < S ? kb + (s0 + i) * ks : zeros;
    if (narrow && n > widen_above && seen) {
      const float* kf[kWidth];
      for (int i = 0; i < kWidth; ++i) {
        float* row = kw + i * D;
        for (int64_t d = 0; d < D; d += kWidth) vstore_upto(row + d, load_kv_upto(k[i] + d, D - d), D - d);
        kf[i] = row;
      }
      for (int r = 0; r < n; ++r) vstore(w + r * Sp + s0, select_or(m[r], vmul(block_scores(q[r], kf, D), scale), -INFINITY));
      continue;
    }
    for (int r = 0; r < n; ++r) {
      const vec v = seen ? vmul(block_scores(q[r], k, D), scale) : vzero();
      vstore(w + r * Sp + s0, select_or(m[r], v, -INFINITY));
    }
  }
  if (lo >= hi) {  // no row sees a key
    for (int r = 0; r < n; ++r) std::fill(out[r], out[r] + D, 0.f);
    return;
  }
  // Softmax weights in place over the seen blocks [lo, hi): exp(score - max), 0 where hidden. The
  // sum runs in kWidth lanes by slot, so slots a row does not see add exact zeros.
  float inv[kTile];
  const float minus_one = -1.f;
  for (int r = 0; r < n; ++r) {
    float* wr = w + r * Sp;
    vec mv = vload(wr + lo);
    for (int64_t s = lo + kWidth; s < hi; s += kWidth) mv = vmaxv(mv, vload(wr + s));
    const float mx = vmax(mv);
    inv[r] = 0.f;
    if (mx == -INFINITY) {  // this row sees nothing: all weights 0, and so its output
      std::fill(wr + lo, wr + hi, 0.f);
      continue;
    }
    const vec neg = vmul(vbroadcast(&mx), vbroadcast(&minus_one));
    vec tot = vzero();
    for (int64_t s = lo; s < hi; s += kWidth) {
      const vec e = vexp_nonpositive(vadd(vload(wr + s), neg));
      vstore(wr + s, e);
      tot = vadd(tot, e);
    }
    inv[r] = 1.f / vsum(tot);
  }
  // Weighted values, a slab of slots at a time for every group of rows, then the normalisation.
  hi = std::min(hi, S);
  for (int64_t s0 = lo; s0 < hi; s0 += kSlab)
    for (int r0 = 0; r0 < n; r0 += kRegRows)
      weighted_values_n(std::min(kRegRows, n - r0), w + r0 * Sp, s0, std::min(hi, s0 + kSlab), Sp, out + r0, vb, vs,
                        D, s0 == lo);
  for (int r = 0; r < n; ++r) {
    const vec iv = vbroadcast(&inv[r]);
    for (int64_t d = 0; d < D; d += kWidth) vstore_upto(out[r] + d, vmul(vload_upto(out[r] + d, D - d), iv), D - d);
  }
}

// Every query row of q (row i: batch b(i), head h(i), position qpos) over its KV head's slots
// [0, S): q row (b, h, t) at q + ((b * H + h) * T + t) * D, its output at out + b * ob + h * oh + t * ot.
// Heads h and h' share KV head h / group. Keys/values of batch row b, KV head j start at
// kb + b * ks0 + j * ks1 (row stride ks2, in elements; the same for v), slot positions at
// kpos + b * kps0. K and V hold floats, or bfloat16 values with `kv_bf16`.
struct AttnProblem {
  const float* q;
  int64_t B, H, T, D, group;
  const void *k, *v;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  const int64_t* kpos;
  int64_t kps0;
  const int64_t* qpos;  // [B, T]
  int64_t S, window;
  bool strict;
  float scale;
  float* out;
  int64_t ob, oh, ot;
  bool kv_bf16 = false;
};

template <class KV>
inline void attend_kv(const AttnProblem& p) {
  // Rows sharing a KV head go through its keys and values together, up to kTile at a time, in
  // a tile per thread at least (the multiply-adds, not the reads, bound the time).
  const int64_t Hkv = p.H / p.group, per_head = p.group * p.T, heads = p.B * Hkv;
  const int64_t want = (at::get_num_threads() + heads - 1) / heads;
  const int64_t tiles0 = std::clamp<int64_t>(want, (per_head + kTile - 1) / kTile, per_head);
  const int64_t tile = (per_head + tiles0 - 1) / tiles0, tiles = (per_head + tile - 1) / tile;
  const int64_t Sp = (p.S + kWidth - 1) / kWidth * kWidth;
  // Small problems stay on one thread: waking a second one costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(p.S * p.D * tile, 1));
  at::parallel_for(0, heads * tiles, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(tile * Sp);
    std::vector<int32_t> kp(Sp);
    const std::vector<KV> zeros(p.D);  // all-zero bits: 0.0 in either type
    std::vector<float> kw(std::is_same_v<KV, float> ? 0 : kWidth * p.D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hkv * tiles), j = (i / tiles) % Hkv, r0 = (i % tiles) * tile;
      const int n = static_cast<int>(std::min(tile, per_head - r0));
      const float* q[kTile];
      float* out[kTile];
      int64_t pos[kTile];
      for (int r = 0; r < n; ++r) {
        const int64_t h = j * p.group + (r0 + r) / p.T, t = (r0 + r) % p.T;
        q[r] = p.q + ((b * p.H + h) * p.T + t) * p.D;
        out[r] = p.out + b * p.ob + h * p.oh + t * p.ot;
        pos[r] = p.qpos[b * p.T + t];
      }
      const int64_t* kpos = p.kpos + b * p.kps0;
      for (int64_t s = 0; s < Sp; ++s) kp[s] = s < p.S ? static_cast<int32_t>(kpos[s]) : -1;
      const KV* kb = static_cast<const KV*>(p.k) + b * p.ks0 + j * p.ks1;
      const KV* vb = static_cast<const KV*>(p.v) + b * p.vs0 + j * p.vs1;
      attend_tile(n, q, pos, out, kb, p.ks2, vb, p.vs2, kp.data(), p.S, Sp, p.D, p.window, p.strict, p.scale, w.data(),
                  zeros.data(), kw.data());
    }
  });
}

inline void attend(const AttnProblem& p) {
  if (p.kv_bf16)
    attend_kv<bf16_t>(p);
  else
    attend_kv<float>(p);
}

}  // namespace aheadlm
