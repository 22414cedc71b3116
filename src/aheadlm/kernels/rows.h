// Per-row primitives shared by the tensor ops and the fused decoder layer. Each reads and writes
// one row, so a row's result never depends on how many rows are computed with it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace aheadlm {

// bfloat16 K/V storage (the upper half of a float), which halves what attention reads at long
// contexts. Rounding is to nearest even with NaN kept quiet, as torch converts, so K/V written
// here equal those the per-op path stores.
using bf16_t = uint16_t;
inline bf16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<bf16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bf16(bf16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store_kv(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void store_kv(const float* src, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
  }
  float r = hsum8(_mm256_add_ps(s0, s1));
  for (; d < D; ++d) r += a[d] * b[d];
  return r;
}

// y = x / sqrt(mean(x^2) + eps) * w over one row of H (y may be x).
inline void rms_row(const float* xr, const float* wp, float* yr, int64_t H, float eps) {
  const float inv = 1.f / std::sqrt(dot(xr, xr, H) / static_cast<float>(H) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  int64_t d = 0;
  for (; d + 8 <= H; d += 8)
    _mm256_storeu_ps(yr + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + d), iv), _mm256_loadu_ps(wp + d)));
  for (; d < H; ++d) yr[d] = xr[d] * inv * wp[d];
}

// Rotary embedding of one row, rotate-half form: y = x * cos + rotate_half(x) * sin. Both products
// and the sum are rounded separately, as the tensor ops `x * cos + rotate_half(x) * sin` round them
// (the build uses -ffp-contract=off), so the result is bit-identical to them.
inline void rope_row(const float* xr, const float* c, const float* s, float* yr, int64_t D) {
  const int64_t half = D / 2;
  int64_t d = 0;
  for (; d + 8 <= half; d += 8) {
    const __m256 lo = _mm256_loadu_ps(xr + d), hi = _mm256_loadu_ps(xr + half + d);
    _mm256_storeu_ps(yr + d,
                     _mm256_sub_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + d)), _mm256_mul_ps(hi, _mm256_loadu_ps(s + d))));
    _mm256_storeu_ps(yr + half + d, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + d)),
                                                  _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + d))));
  }
  for (; d < half; ++d) {
    yr[d] = xr[d] * c[d] - xr[half + d] * s[d];
    yr[half + d] = xr[half + d] * c[half + d] + xr[d] * s[half + d];
  }
}

}  // namespace aheadlm
