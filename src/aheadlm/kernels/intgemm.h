// Few-row matrix products with integer dot products, for CPUs with AVX-512 VNNI (int8 and 4-bit weights).
//
// The float32 products of gemm.h widen every weight and spend a multiply-add per weight and row, so
// on small CPUs a verification of 5 rows costs about twice a one-row decode step. Here the weights
// are regrouped 16 output rows to a vector, one row per 32-bit lane, each row of x is rounded to
// 16-bit integers per block of 32 columns (x ~ d * xq, |xq| <= 32767), and `vpdpwssd` multiplies
// and adds pairs of int16 into exact int32 block sums, scaled once per weight block:
//   y[m, n] = sum_b  s[n, b] * d[m, b] * (sum_{k in b} q[n, k] * xq[m, k])  (+ o[n, b] * d[m, b] * sum xq)
// in float32, blocks in order. A few rows then cost about what one costs. Each row of x is rounded
// and summed alone, so a row's result does not depend on the other rows (batch-invariant, as exact
// verification needs). Rounding x costs at most 1/65534 of each block's largest value, far below the
// int8 weights' own rounding. The int32 sums cannot overflow: 32 products of at most 128 * 32767.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace aheadlm {

inline bool int_products_compiled() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

// Rows of x rounded per block of 32: xq [M, K] int16, d [M, K / 32]. A block holding inf or NaN
// gets scale NaN, so its row's outputs are NaN, as float32 products would be.
inline void round_rows(const float* x, int64_t M, int64_t K, int16_t* xq, float* d) {
  at::parallel_for(0, M * (K / 32), 2048, [&](int64_t i0, int64_t i1) {  // blocks are independent
    for (int64_t i = i0; i < i1; ++i) {
      const float* xb = x + i * 32;
      float amax = 0.f;
      bool finite = true;
      for (int j = 0; j < 32; ++j) {
        finite = finite && std::isfinite(xb[j]);
        amax = std::max(amax, std::fabs(xb[j]));
      }
      d[i] = finite ? amax / 32767.f : NAN;
      const float inv = finite && amax > 0.f ? 32767.f / amax : 0.f;
      for (int j = 0; j < 32; ++j)
        xq[i * 32 + j] = static_cast<int16_t>(std::nearbyint(std::clamp(xb[j] * inv, -32767.f, 32767.f)));
    }
  });
}

class IntLinear {
 public:
  // q [N, K] int8 (or, with bits 4, GGUF-style nibble pairs [N, K / 2] uint8 holding value + zero:
  // byte j of a block of 32 holds value j in its low nibble and value j + 16 in its high one), scale
  // (and optional offset) [N, K / block] float32, block 16 or 32 (32 for 4-bit values).
  IntLinear(const torch::Tensor& q_, const torch::Tensor& scale_, const torch::Tensor& offset_, int64_t block,
            int64_t bits = 8, int64_t zero_ = 0)
      : BS(block), nib(bits == 4), zero(zero_) {
    TORCH_CHECK(q_.dim() == 2 && (BS == 16 || BS == 32) && (bits == 8 || bits == 4), "IntLinear: weights");
    TORCH_CHECK(nib ? q_.scalar_type() == torch::kUInt8 && BS == 32 && (zero == 0 || zero == 8)
                    : q_.scalar_type() == torch::kInt8 && zero == 0,
                "IntLinear: int8 values, or 4-bit pairs in blocks of 32 with zero 0 or 8");
    N = q_.size(0);
    K = nib ? 2 * q_.size(1) : q_.size(1);
    TORCH_CHECK(K % 32 == 0, "IntLinear: K % 32 == 0");
    nb = K / 32;
    nwb = K / BS;
    const auto q = q_.contiguous();
    const auto scale = scale_.contiguous();
    const auto offset = offset_.contiguous();
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == N * nwb, "IntLinear: scales");
    has_offset = offset.numel() > 0;
    TORCH_CHECK(!has_offset || (offset.scalar_type() == torch::kFloat32 && offset.numel() == N * nwb), "IntLinear: offsets");
    groups = (N + 15) / 16;
    // int8: group g, block b of 32 columns, pair p (columns 32b + 2p and + 1), lane i (row 16g + i):
    // 2 bytes, 512 bytes a block. 4-bit: 256 bytes a block, byte 2i + h of chunk c holding column
    // 32b + 4c + h of row 16g + i in its low nibble and column 32b + 4c + 2 + h in its high one.
    // Scales (offsets): group g, weight block c, lane i.
    w = torch::zeros({groups * nb * (nib ? 256 : 512)}, nib ? torch::kUInt8 : torch::kInt8);
    s = torch::zeros({groups * nwb * 16}, torch::kFloat32);
    o = has_offset ? torch::zeros({groups * nwb * 16}, torch::kFloat32) : torch::Tensor();
    const auto* qp = static_cast<const uint8_t*>(q.data_ptr());
    auto* wp = static_cast<uint8_t*>(w.data_ptr());
    const float* sp = scale.data_ptr<float>();
    const float* op = has_offset ? offset.data_ptr<float>() : nullptr;
    float* so = s.data_ptr<float>();
    float* oo = has_offset ? o.data_ptr<float>() : nullptr;
    at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {  // groups write disjoint bytes
      for (int64_t n = 16 * g0; n < std::min(N, 16 * g1); ++n) {
        const int64_t g = n / 16, i = n % 16;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t j = k % 32;
          if (!nib) {
            wp[at(g, i, k)] = qp[n * K + k];
          } else {
            const uint8_t byte = qp[n * (K / 2) + (k / 32) * 16 + j % 16];
            const uint8_t v = j < 16 ? byte & 15 : byte >> 4;
            wp[at(g, i, k)] |= (j / 2) % 2 ? v << 4 : v;
          }
        }
        for (int64_t c = 0; c < nwb; ++c) {
          so[(g * nwb + c) * 16 + i] = sp[n * nwb + c];
          if (op) oo[(g * nwb + c) * 16 + i] = op[n * nwb + c];
        }
      }
    });
  }

  // The weights back in the layout they were given: (q, scale [N, K / block], offset or empty).
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> unpack() const {
    auto q = nib ? torch::zeros({N, K / 2}, torch::kUInt8) : torch::empty({N, K}, torch::kInt8);
    auto scale = torch::empty({N, nwb}, torch::kFloat32);
    auto offset = has_offset ? torch::empty({N, nwb}, torch::kFloat32) : torch::empty({0}, torch::kFloat32);
    auto* qp = static_cast<uint8_t*>(q.data_ptr());
    const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
    float* sp = scale.data_ptr<float>();
    float* op = has_offset ? offset.data_ptr<float>() : nullptr;
    const float* si = s.data_ptr<float>();
    const float* oi = has_offset ? o.data_ptr<float>() : nullptr;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t g = n / 16, i = n % 16;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = k % 32;
        const uint8_t byte = wp[at(g, i, k)];
        if (!nib) {
          qp[n * K + k] = byte;
        } else {
          const uint8_t v = (j / 2) % 2 ? byte >> 4 : byte & 15;
          qp[n * (K / 2) + (k / 32) * 16 + j % 16] |= j < 16 ? v : v << 4;
        }
      }
      for (int64_t c = 0; c < nwb; ++c) {
        sp[n * nwb + c] = si[(g * nwb + c) * 16 + i];
        if (op) op[n * nwb + c] = oi[(g * nwb + c) * 16 + i];
      }
    }
    return {q, scale, offset};
  }

  // y[M, N] = x[M, K] @ W^T.
  void run(const float* x, int64_t M, float* y) const {
    std::vector<int16_t> xq(M * K);
    std::vector<float> d(M * nb), sx(has_offset ? M * nwb : 0);
    round_rows(x, M, K, xq.data(), d.data());
    for (int64_t m = 0; m < M && has_offset; ++m)
      for (int64_t c = 0; c < nwb; ++c) {
        int32_t t = 0;
        for (int64_t k = c * BS; k < (c + 1) * BS; ++k) t += xq[m * K + k];
        sx[m * nwb + c] = d[m * nb + c * BS / 32] * static_cast<float>(t);
      }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    // Rows in slabs whose rounded x stays in L2; per slab each weight group is read once and swept
    // by every chunk of up to 8 rows while it sits in L1.
    const int64_t slab = std::max<int64_t>(8, (256 * 1024) / (2 * K) / 8 * 8);
    for (int64_t m0 = 0; m0 < M; m0 += slab) {
      const int64_t m1 = std::min(M, m0 + slab);
      at::parallel_for(0, groups, std::max<int64_t>(1, 1024 / K), [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g)
          for (int64_t m = m0; m < m1; m += 8) {
            const Rows r{xq.data() + m * K, d.data() + m * nb, has_offset ? sx.data() + m * nwb : nullptr, y + m * N};
            dispatch(g, r, std::min<int64_t>(8, m1 - m));
          }
      });
    }
#else
    TORCH_CHECK(false, "IntLinear: this build has no AVX-512 VNNI");
#endif
  }

  int64_t N = 0, K = 0;

 private:
  int64_t BS;
  bool nib;
  int64_t zero, nb = 0, nwb = 0, groups = 0;
  bool has_offset = false;
  torch::Tensor w, s, o;

  // Where column k of lane i of group g lives in the regrouped form.
  int64_t at(int64_t g, int64_t i, int64_t k) const {
    const int64_t b = k / 32, j = k % 32;
    if (!nib) return (g * nb + b) * 512 + j / 2 * 32 + 2 * i + j % 2;
    return (g * nb + b) * 256 + j / 4 * 32 + 2 * i + j % 2;  // the high nibble when (j / 2) % 2
  }

  struct Rows {
    const int16_t* xq;
    const float* d;
    const float* sx;
    float* y;
  };

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  void dispatch(int64_t g, const Rows& r, int64_t mr) const {
    if (nib) return has_offset ? rows<32, true, true>(g, r, mr) : rows<32, false, true>(g, r, mr);
    if (BS == 32) return has_offset ? rows<32, true, false>(g, r, mr) : rows<32, false, false>(g, r, mr);
    return has_offset ? rows<16, true, false>(g, r, mr) : rows<16, false, false>(g, r, mr);
  }

  template <int B, bool OFF, bool NIB>
  void rows(int64_t g, const Rows& r, int64_t mr) const {
    switch (mr) {
      case 1: return group<1, B, OFF, NIB>(g, r);
      case 2: return group<2, B, OFF, NIB>(g, r);
      case 3: return group<3, B, OFF, NIB>(g, r);
      case 4: return group<4, B, OFF, NIB>(g, r);
      case 5: return group<5, B, OFF, NIB>(g, r);
      case 6: return group<6, B, OFF, NIB>(g, r);
      case 7: return group<7, B, OFF, NIB>(g, r);
      default: return group<8, B, OFF, NIB>(g, r);
    }
  }

  // dot[m] += w * (pair p of x row m), for MR rows.
  template <int MR>
  static inline void madd(__m512i* dot, __m512i wv, const Rows& r, int64_t K, int64_t col) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, r.xq + m * K + col, 4);
      dot[m] = _mm512_dpwssd_epi32(dot[m], wv, _mm512_set1_epi32(pair));
    }
  }

  // Output rows 16g..16g+15 for MR rows of x.
  template <int MR, int B, bool OFF, bool NIB>
  void group(int64_t g, const Rows& r) const {
    constexpr int64_t kBytes = NIB ? 256 : 512;  // per block of 32 columns
    const char* wg = static_cast<const char*>(w.data_ptr()) + g * nb * kBytes;
    const float* sg = s.data_ptr<float>() + g * nwb * 16;
    const float* og = OFF ? o.data_ptr<float>() + g * nwb * 16 : nullptr;
    const __m512i low = _mm512_set1_epi16(15), z = _mm512_set1_epi16(static_cast<int16_t>(zero));
    __m512 acc[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const char* wb = wg + b * kBytes;
      // The weights a few blocks on (into the next group at the end), a line at a time.
#pragma GCC unroll 8
      for (int l = 0; l < kBytes / 64; ++l) _mm_prefetch(wb + 4 * kBytes + 64 * l, _MM_HINT_T0);
#pragma GCC unroll 2
      for (int h = 0; h < 32 / B; ++h) {
        __m512i dot[MR];
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) dot[m] = _mm512_setzero_si512();
        if (NIB) {
#pragma GCC unroll 8
          for (int c = 0; c < 8; ++c) {  // pairs 2c and 2c + 1 from one 32-byte chunk
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 32)));
            madd<MR>(dot, _mm512_sub_epi16(_mm512_and_si512(v, low), z), r, K, b * 32 + 4 * c);
            madd<MR>(dot, _mm512_sub_epi16(_mm512_srli_epi16(v, 4), z), r, K, b * 32 + 4 * c + 2);
          }
        } else {
#pragma GCC unroll 16
          for (int p = h * B / 2; p < (h + 1) * B / 2; ++p)
            madd<MR>(dot, _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + p * 32))), r, K,
                     b * 32 + 2 * p);
        }
        const int64_t c = b * (32 / B) + h;
        const __m512 sv = _mm512_loadu_ps(sg + c * 16);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), _mm512_mul_ps(sv, _mm512_set1_ps(r.d[m * nb + b])), acc[m]);
        if (OFF) {
          const __m512 ov = _mm512_loadu_ps(og + c * 16);
#pragma GCC unroll 8
          for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(ov, _mm512_set1_ps(r.sx[m * nwb + c]), acc[m]);
        }
      }
    }
    const int64_t n0 = 16 * g;
    const __mmask16 mask = N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(r.y + m * N + n0, mask, acc[m]);
  }
#endif
};

}  // namespace aheadlm
