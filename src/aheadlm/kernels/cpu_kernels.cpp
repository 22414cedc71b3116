// CPU kernels for decoding and verification (AVX2 + FMA; 512-bit matrix products when built with
// AVX-512F): small-batch matrix products and attention, both computing each row independently of
// the others (batch-invariant).
//
// y[M, N] = x[M, K] @ W[N, K]^T with float32 activations and compact weights:
//   q8   : int8 values with one float32 scale (and optional offset) per block of BS weights along K,
//          w = q * scale (+ offset), rounded exactly as the GGUF dequantizer rounds it, so the
//          weights are bit-identical to the dequantized float32 ones at about a third of the bytes;
//   bf16 : bfloat16 weights widened to float32 (exact).
// On small CPUs widening the weights, not memory, bounds a decode step, so each widened weight
// vector is reused from registers by up to 8 rows of x: verifying a few draft tokens costs about as
// much as decoding one. Larger M (prefill) widens a pair of weight rows once into an L1 buffer.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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
inline float vsum(vec v) {
  // A fixed pairwise order (not _mm512_reduce_add_ps, whose order is the compiler's choice).
  __m256 lo = _mm512_castps512_ps256(v);
  __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum(_mm256_add_ps(lo, hi));
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
inline float vsum(vec v) { return hsum(v); }
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
        for (int r = 0; r < nr; ++r)
          for (int64_t b = 0; b < K / W::kBlock; ++b) {
            const auto s = w.scale(n + r, b);
            for (int j = 0; j < W::kBlock; j += kWidth) {
              const int64_t k = b * W::kBlock + j;
              vstore(buf.data() + r * K + k, w.load(n + r, k, s));
            }
          }
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

}  // namespace

// Attention for a few query rows against a cache: each (batch, head, query) row is computed on
// its own, visiting keys in slot order, so its result does not depend on the other rows.
inline float dot(const float* a, const float* b, int64_t D) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
  }
  float r = hsum(_mm256_add_ps(s0, s1));
  for (; d < D; ++d) r += a[d] * b[d];
  return r;
}

// q [B, Hq, T, D]; k, v [B, Hkv, S, D] (D contiguous); kpos [B, S] slot positions (-1 empty);
// qpos [B, T]. A key is visible when 0 <= kpos <= qpos (kpos < qpos if `strict`) and, with a
// window, qpos - kpos < window. Rows that see no key are zero.
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kpos, torch::Tensor qpos,
                        double scale, int64_t window, bool strict) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32, "attention: float32 only");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && kpos.stride(1) == 1, "attention: layout");
  q = q.contiguous();
  qpos = qpos.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), group = Hq / Hkv;
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* kpp = kpos.data_ptr<int64_t>();
  const int64_t* qpp = qpos.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2), kps0 = kpos.stride(0);
  const float sc = static_cast<float>(scale);
  // Small problems stay on one thread: waking a second one costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(S * D, 1));
  at::parallel_for(0, B * Hq * T, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> score(S);
    std::vector<char> seen(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hq * T), h = (i / T) % Hq, t = i % T, kh = h / group;
      const float* qr = qp + i * D;
      const int64_t pos = qpp[b * T + t];
      const float* kb = kp + b * ks0 + kh * ks1;
      const float* vb = vp + b * vs0 + kh * vs1;
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t p = kpp[b * kps0 + s];
        seen[s] = p >= 0 && (strict ? p < pos : p <= pos) && (window <= 0 || pos - p < window);
        if (!seen[s]) continue;
        score[s] = dot(qr, kb + s * ks2, D) * sc;
        mx = std::max(mx, score[s]);
      }
      if (mx == -INFINITY) continue;
      float* o = op + i * D;
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (!seen[s]) continue;
        const float e = std::exp(score[s] - mx);
        total += e;
        const float* vr = vb + s * vs2;
        const __m256 ev = _mm256_set1_ps(e);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
          _mm256_storeu_ps(o + d, _mm256_fmadd_ps(ev, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(o + d)));
        for (; d < D; ++d) o[d] += e * vr[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
  return out;
}

// RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * w, one row at a time.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "rms_norm: float32 only");
  x = x.contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / std::max<int64_t>(H, 1);
  TORCH_CHECK(w.numel() == H, "rms_norm: weight size");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.contiguous().data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * H;
      float* yr = yp + r * H;
      const float inv = 1.f / std::sqrt(dot(xr, xr, H) / static_cast<float>(H) + static_cast<float>(eps));
      const __m256 iv = _mm256_set1_ps(inv);
      int64_t d = 0;
      for (; d + 8 <= H; d += 8)
        _mm256_storeu_ps(yr + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + d), iv), _mm256_loadu_ps(wp + d)));
      for (; d < H; ++d) yr[d] = xr[d] * inv * wp[d];
    }
  });
  return y;
}

// Rotary embedding, rotate-half form: y = x * cos + rotate_half(x) * sin for x [B, H, T, D] (any
// strides, D contiguous) and cos, sin [B, 1, T, D] contiguous. Both products and the sum are rounded
// separately, as the three tensor ops it replaces round them, so the result is bit-identical; one
// call instead of about six small ops per tensor saves the per-op overhead of a decode step.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && cos.scalar_type() == torch::kFloat32 &&
                  sin.scalar_type() == torch::kFloat32, "rope: float32 only");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x layout");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.sizes() == sin.sizes() && cos.size(0) == B && cos.size(2) == T && cos.size(3) == D,
              "rope: shapes");
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto y = torch::empty({B, H, T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  at::parallel_for(0, B * H * T, std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, t = i % T;
      const float* xr = xp + b * s0 + h * s1 + t * s2;
      const float* c = cp + (b * T + t) * D;
      const float* s = sp + (b * T + t) * D;
      float* yr = yp + i * D;
      int64_t d = 0;
      for (; d + 8 <= half; d += 8) {
        const __m256 lo = _mm256_loadu_ps(xr + d), hi = _mm256_loadu_ps(xr + half + d);
        _mm256_storeu_ps(yr + d, _mm256_sub_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + d)),
                                               _mm256_mul_ps(hi, _mm256_loadu_ps(s + d))));
        _mm256_storeu_ps(yr + half + d, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + d)),
                                                      _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + d))));
      }
      for (; d < half; ++d) {  // built with -ffp-contract=off: each product is rounded, as above
        yr[d] = xr[d] * c[d] - xr[half + d] * s[d];
        yr[half + d] = xr[half + d] * c[half + d] + xr[d] * s[half + d];
      }
    }
  });
  return y;
}

// Runs `gemm` on all rows of a weight format, or only on rows `ids` (int64, any order) when given.
template <typename W>
torch::Tensor run_linear(const W& w, torch::Tensor x, int64_t N, const std::optional<torch::Tensor>& rows) {
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  if (rows) {
    const torch::Tensor& ids = *rows;
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1 && ids.is_contiguous(), "linear: ids layout");
    const int64_t* ip = ids.data_ptr<int64_t>();
    const int64_t n = ids.numel();
    TORCH_CHECK(std::all_of(ip, ip + n, [N](int64_t i) { return i >= 0 && i < N; }), "linear: row id out of range");
    auto y = torch::empty({M, n}, x.options());
    gemm(Indexed<W>{w, ip}, x.data_ptr<float>(), M, K, n, y.data_ptr<float>());
    return y;
  }
  auto y = torch::empty({M, N}, x.options());
  gemm(w, x.data_ptr<float>(), M, K, N, y.data_ptr<float>());
  return y;
}

// x [M, K] float32; q [N, K] int8; scale/offset [N, K / block] float32 (offset may be empty);
// ids: the rows to use (None: all).
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor offset, int64_t block,
                        std::optional<torch::Tensor> ids) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && q.scalar_type() == torch::kInt8, "q8_linear: dtypes");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "q8_linear: shapes");
  TORCH_CHECK(block == 16 || block == 32, "q8_linear: block must be 16 or 32");
  TORCH_CHECK(x.size(1) % block == 0, "q8_linear: K must be a multiple of the block");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && offset.is_contiguous(), "q8_linear: layout");
  const int64_t K = x.size(1), N = q.size(0), nb = K / block;
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op = offset.numel() ? offset.data_ptr<float>() : nullptr;
  if (block == 32) {
    if (op) return run_linear(Q8Rows<32, true>{qp, sp, op, K, nb}, x, N, ids);
    return run_linear(Q8Rows<32, false>{qp, sp, op, K, nb}, x, N, ids);
  }
  if (op) return run_linear(Q8Rows<16, true>{qp, sp, op, K, nb}, x, N, ids);
  return run_linear(Q8Rows<16, false>{qp, sp, op, K, nb}, x, N, ids);
}

// x [M, K] float32; w [N, K] bfloat16; ids as above.
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> ids) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kBFloat16, "bf16_linear: dtypes");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "bf16_linear: shapes");
  TORCH_CHECK(x.size(1) % 32 == 0 && w.is_contiguous(), "bf16_linear: K must be a multiple of 32");
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  return run_linear(BF16Rows{wp, x.size(1)}, x, w.size(0), ids);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_linear", &q8_linear, "x @ dequant(q)[ids]^T with block-scaled int8 weights", py::arg("x"), py::arg("q"),
        py::arg("scale"), py::arg("offset"), py::arg("block"), py::arg("ids") = py::none());
  m.def("bf16_linear", &bf16_linear, "x @ w[ids]^T with bfloat16 weights, float32 math", py::arg("x"), py::arg("w"),
        py::arg("ids") = py::none());
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm (float32)");
  m.def("rope", &rope, "rotary embedding, rotate-half form (float32, bit-identical to the tensor ops)");
  m.def("attention", &attention, "batch-invariant attention of a few query rows over a KV cache");
}
