// One decoder layer in one call, for few-row float32 inference (decode, verification, drafting).
// It covers the Llama and Gemma 3 layers and the MTP drafter's query-only layers: pre-norm
// attention and MLP, optional q/k norms, post-norms and layer scalar, SiLU or tanh-GELU gates. It runs the same row primitives and matrix products as the per-op path
// of `model.Block`, in the same order, so its outputs are bit-identical to that path; what it saves
// is the twenty-odd Python and PyTorch calls per layer that cost about a third of a small model's
// decode step.
#pragma once

#include <torch/extension.h>

#include <memory>
#include <optional>
#include <vector>

#include "attention.h"
#include "gemm.h"
#include "intgemm.h"

namespace aheadlm {

// A linear layer's weights in one kernel format, fixed at construction: block-scaled int8 (block
// 16 or 32, optional offsets), the same with 4-bit values packed two to a byte (`bits` 4, values
// minus `zero`), or bfloat16 (block 0). With `integer`, int8 and 4-bit weights are kept only in
// IntLinear's regrouped form and multiplied with integer dot products (intgemm.h); rows are then not
// readable in place (`run_rows`, `row`), and `unpack` gives the weights back.
struct Linear {
  torch::Tensor w, scale, offset;
  int64_t block = 0, N = 0, K = 0, bits = 8, zero = 0;
  std::shared_ptr<const IntLinear> ints;

  Linear(torch::Tensor w_, torch::Tensor scale_, torch::Tensor offset_, int64_t block_, int64_t bits_ = 8,
         int64_t zero_ = 0, bool integer = false)
      : w(w_.contiguous()), scale(scale_.contiguous()), offset(offset_.contiguous()), block(block_), bits(bits_),
        zero(zero_) {
    TORCH_CHECK(w.dim() == 2, "Linear: 2-D weights");
    N = w.size(0);
    K = bits == 4 ? 2 * w.size(1) : w.size(1);
    if (integer) {
      TORCH_CHECK(int_products_compiled(), "Linear: this build has no integer products (AVX-512 VNNI)");
      ints = std::make_shared<const IntLinear>(w, scale, offset, block, bits, zero);
      w = scale = offset = torch::Tensor();
      return;
    }
    if (bits == 4) {
      TORCH_CHECK(w.scalar_type() == torch::kUInt8 && block == 32 && K % 32 == 0 && (zero == 0 || zero == 8),
                  "Linear: 4-bit weights are uint8 pairs in blocks of 32, zero 0 or 8");
      TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == N * (K / block), "Linear: scales");
    } else if (block) {
      TORCH_CHECK(bits == 8 && w.scalar_type() == torch::kInt8 && (block == 16 || block == 32) && K % block == 0,
                  "Linear: int8 weights with block 16 or 32");
      TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == N * (K / block), "Linear: scales");
    } else {
      TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && K % 32 == 0, "Linear: bfloat16 weights, K % 32 == 0");
    }
  }

  // y[M, N] = x[M, K] @ W^T.
  void run(const float* x, int64_t M, float* y) const {
    if (ints) return ints->run(x, M, y);
    with_format([&](const auto& f) { gemm(f, x, M, K, N, y); });
  }

  // (q, scale, offset) of an integer-form Linear, rows as they were given.
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> unpack() const {
    TORCH_CHECK(ints, "Linear: unpack is for integer-form weights");
    return ints->unpack();
  }

  // y[M, n] = x[M, K] @ W[ids]^T for n row ids, read in place.
  void run_rows(const float* x, int64_t M, const int64_t* ids, int64_t n, float* y) const {
    TORCH_CHECK(!ints, "Linear: integer-form weights have no rows to read in place");
    TORCH_CHECK(std::all_of(ids, ids + n, [this](int64_t i) { return i >= 0 && i < N; }), "Linear: row id out of range");
    with_format([&](const auto& f) { gemm(Indexed<std::decay_t<decltype(f)>>{f, ids}, x, M, K, n, y); });
  }

  // x [M, K] float32 -> x @ W^T [M, N], or [M, n] against rows `ids` only (int64, any order).
  torch::Tensor apply(torch::Tensor x, const std::optional<torch::Tensor>& ids) const {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K, "Linear: x must be [M, K] float32");
    x = x.contiguous();
    const int64_t M = x.size(0);
    if (!ids) {
      auto y = torch::empty({M, N}, x.options());
      run(x.data_ptr<float>(), M, y.data_ptr<float>());
      return y;
    }
    TORCH_CHECK(ids->scalar_type() == torch::kInt64 && ids->dim() == 1 && ids->is_contiguous(), "Linear: ids layout");
    auto y = torch::empty({M, ids->numel()}, x.options());
    run_rows(x.data_ptr<float>(), M, ids->data_ptr<int64_t>(), ids->numel(), y.data_ptr<float>());
    return y;
  }

  // Row n as float32 (K values), rounded as the dequantizer rounds it: q * scale (+ offset).
  void row(int64_t n, float* out) const {
    TORCH_CHECK(!ints, "Linear: integer-form weights have no rows to read in place");
    with_format([&](const auto& f) { widen_row(f, n, K, out); });
  }

 private:
  // Calls fn with this weight's format (a Q8Rows or BF16Rows).
  template <typename Fn>
  void with_format(Fn&& fn) const {
    if (!block) return fn(BF16Rows{reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), K});
    const float* s = scale.data_ptr<float>();
    const float* o = offset.numel() ? offset.data_ptr<float>() : nullptr;
    const int64_t nb = K / block;
    if (bits == 4) {
      const uint8_t* q4 = w.data_ptr<uint8_t>();
      if (o) return zero ? fn(Q4Rows<true, 8>{q4, s, o, K, nb}) : fn(Q4Rows<true, 0>{q4, s, o, K, nb});
      return zero ? fn(Q4Rows<false, 8>{q4, s, o, K, nb}) : fn(Q4Rows<false, 0>{q4, s, o, K, nb});
    }
    const int8_t* q = w.data_ptr<int8_t>();
    if (block == 32) {
      if (o) return fn(Q8Rows<32, true>{q, s, o, K, nb});
      return fn(Q8Rows<32, false>{q, s, o, K, nb});
    }
    if (o) return fn(Q8Rows<16, true>{q, s, o, K, nb});
    fn(Q8Rows<16, false>{q, s, o, K, nb});
  }
};

inline const float* opt_ptr(const std::optional<torch::Tensor>& t) {
  return t ? t->data_ptr<float>() : nullptr;
}

class Block {
 public:
  // Norm weights are the final multipliers (Gemma's 1 + w already folded in); qkv holds the query,
  // key and value projections concatenated (the query projection alone when `query_only`: such a
  // layer reads another layer's keys and values and writes none), gate_up the gate and up ones.
  Block(torch::Tensor attn_norm, Linear qkv, int64_t heads, int64_t kv_heads, int64_t head_dim, bool query_only,
        std::optional<torch::Tensor> q_norm, std::optional<torch::Tensor> k_norm, double query_scale, Linear o,
        std::optional<torch::Tensor> post_attn_norm, torch::Tensor mlp_norm, Linear gate_up, bool gelu, Linear down,
        std::optional<torch::Tensor> post_mlp_norm, std::optional<torch::Tensor> layer_scalar, double eps)
      : attn_norm_(attn_norm.contiguous()),
        qkv_(std::move(qkv)),
        heads_(heads),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        query_only_(query_only),
        q_norm_(q_norm),
        k_norm_(k_norm),
        scale_(static_cast<float>(query_scale)),
        o_(std::move(o)),
        post_attn_norm_(post_attn_norm),
        mlp_norm_(mlp_norm.contiguous()),
        gate_up_(std::move(gate_up)),
        gelu_(gelu),
        down_(std::move(down)),
        post_mlp_norm_(post_mlp_norm),
        layer_scalar_(layer_scalar),
        eps_(static_cast<float>(eps)) {
    hidden_ = attn_norm_.numel();
    TORCH_CHECK(qkv_.K == hidden_ && qkv_.N == (heads + (query_only ? 0 : 2 * kv_heads)) * head_dim,
                "Block: qkv shape");
    TORCH_CHECK(!(query_only && k_norm), "Block: a query-only layer has no key norm");
    TORCH_CHECK(o_.K == heads * head_dim && o_.N == hidden_, "Block: o shape");
    TORCH_CHECK(gate_up_.K == hidden_ && gate_up_.N % 2 == 0 && down_.K == gate_up_.N / 2 && down_.N == hidden_,
                "Block: MLP shapes");
    TORCH_CHECK(head_dim % 2 == 0 && (query_only || (kv_heads > 0 && heads % kv_heads == 0)), "Block: heads");
    for (auto* t : {&q_norm_, &k_norm_, &post_attn_norm_, &post_mlp_norm_, &layer_scalar_})
      if (*t) **t = (*t)->contiguous().to(torch::kFloat32);
  }

  // x [B, T, H]; cos, sin [B, 1, T, head_dim]; kc, vc the cache [B, kv_heads, slots, head_dim]; slots
  // [B, T] where the new keys go (None for a query-only layer); kpos [B, >= end] the position held
  // by each slot (-1 empty, already updated for the new tokens); qpos [B, T]. Attends over slots
  // [0, end) as `attend_tile` does. Returns the layer's output [B, T, H]; writes the new keys and
  // values into kc, vc.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                        std::optional<torch::Tensor> slots, torch::Tensor kpos, torch::Tensor qpos, int64_t window,
                        int64_t end, bool strict) const {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 3 && x.size(2) == hidden_, "Block: x");
    TORCH_CHECK((kc.scalar_type() == torch::kFloat32 || kc.scalar_type() == torch::kBFloat16) &&
                    vc.scalar_type() == kc.scalar_type() && kc.stride(3) == 1 &&
                    vc.stride(3) == 1 && kc.size(3) == head_dim_ && end <= kc.size(2) &&
                    (query_only_ ? heads_ % kc.size(1) == 0 : kc.size(1) == kv_heads_),
                "Block: cache layout");
    TORCH_CHECK(kpos.stride(1) == 1 && kpos.size(1) >= end, "Block: kpos layout");
    x = x.contiguous();
    cos = cos.contiguous();
    sin = sin.contiguous();
    TORCH_CHECK(query_only_ || slots, "Block: slots for the new keys");
    torch::Tensor sl = query_only_ ? torch::Tensor() : slots->contiguous();
    qpos = qpos.contiguous();
    const int64_t B = x.size(0), T = x.size(1), M = B * T, H = hidden_, D = head_dim_;
    const int64_t nq = heads_ * D, nkv = query_only_ ? 0 : kv_heads_ * D, W = nq + 2 * nkv;
    TORCH_CHECK(cos.numel() == B * T * D && sin.numel() == B * T * D && qpos.numel() == M &&
                    (query_only_ || sl.numel() == M),
                "Block: rope and position shapes");
    const float* xp = x.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t* slp = query_only_ ? nullptr : sl.data_ptr<int64_t>();
    const int64_t* qpp = qpos.data_ptr<int64_t>();

    // Attention: norm, projections, q/k norms and RoPE, cache write.
    std::vector<float> h(M * H), qkv(M * W), q(M * nq), tmp(D), krow(D);
    for (int64_t m = 0; m < M; ++m) rms_row(xp + m * H, attn_norm_.data_ptr<float>(), h.data() + m * H, H, eps_);
    qkv_.run(h.data(), M, qkv.data());
    const bool bf16 = kc.scalar_type() == torch::kBFloat16;  // else float32 (checked in forward)
    void* kcp = kc.data_ptr();
    void* vcp = vc.data_ptr();
    const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2);
    const int64_t vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t m = b * T + t;
        const float* row = qkv.data() + m * W;
        for (int64_t hd = 0; hd < heads_; ++hd) {  // q laid out [B, heads, T, D]
          const float* src = row + hd * D;
          if (q_norm_) src = (rms_row(src, opt_ptr(q_norm_), tmp.data(), D, eps_), tmp.data());
          rope_row(src, cp + m * D, sp + m * D, q.data() + ((b * heads_ + hd) * T + t) * D, D);
        }
        if (query_only_) continue;
        const int64_t slot = slp[m];
        TORCH_CHECK(slot >= 0 && slot < kc.size(2), "Block: slot out of range");
        for (int64_t hd = 0; hd < kv_heads_; ++hd) {
          const float* src = row + nq + hd * D;
          if (k_norm_) src = (rms_row(src, opt_ptr(k_norm_), tmp.data(), D, eps_), tmp.data());
          rope_row(src, cp + m * D, sp + m * D, krow.data(), D);
          const float* vrow = row + nq + nkv + hd * D;
          const int64_t ko = b * ks0 + hd * ks1 + slot * ks2, vo = b * vs0 + hd * vs1 + slot * vs2;
          if (bf16) {
            store_kv(krow.data(), static_cast<bf16_t*>(kcp) + ko, D);
            store_kv(vrow, static_cast<bf16_t*>(vcp) + vo, D);
          } else {
            store_kv(krow.data(), static_cast<float*>(kcp) + ko, D);
            store_kv(vrow, static_cast<float*>(vcp) + vo, D);
          }
        }
      }

    // Attention over the cache, written as [B, T, heads * D] (the o projection's input).
    std::vector<float> a(M * nq);
    AttnProblem p{q.data(), B, heads_, T, D, heads_ / kc.size(1), kcp, vcp, ks0, ks1, ks2, vs0, vs1, vs2,
                  kpos.data_ptr<int64_t>(), kpos.stride(0), qpp, end, window, strict, scale_, a.data(), T * nq, D, nq,
                  bf16};
    attend(p);
    auto x1 = torch::empty({B, T, H}, x.options());
    float* x1p = x1.data_ptr<float>();
    o_.run(a.data(), M, x1p);
    residual(xp, x1p, M, post_attn_norm_);

    // MLP. The gate's activation and product run as the same tensor ops, on the same shapes, as the
    // per-op path (SiLU and GELU use PyTorch's vectorised exp and tanh, which a C++ loop would not
    // reproduce bit for bit).
    for (int64_t m = 0; m < M; ++m) rms_row(x1p + m * H, mlp_norm_.data_ptr<float>(), h.data() + m * H, H, eps_);
    auto gu = torch::empty({B, T, gate_up_.N}, x.options());
    gate_up_.run(h.data(), M, gu.data_ptr<float>());
    auto parts = gu.chunk(2, -1);
    auto act = gelu_ ? at::gelu(parts[0], "tanh") : at::silu(parts[0]);
    act = (act * parts[1]).contiguous();
    auto out = torch::empty({B, T, H}, x.options());
    float* op = out.data_ptr<float>();
    down_.run(act.data_ptr<float>(), M, op);
    residual(x1p, op, M, post_mlp_norm_);
    if (layer_scalar_) out.mul_(*layer_scalar_);
    return out;
  }

 private:
  // y = x + norm(y) (or x + y without a post-norm), row by row in place.
  void residual(const float* xp, float* yp, int64_t M, const std::optional<torch::Tensor>& norm) const {
    for (int64_t m = 0; m < M; ++m) {
      float* yr = yp + m * hidden_;
      if (norm) rms_row(yr, opt_ptr(norm), yr, hidden_, eps_);
      for (int64_t d = 0; d < hidden_; ++d) yr[d] = xp[m * hidden_ + d] + yr[d];
    }
  }

  torch::Tensor attn_norm_;
  Linear qkv_;
  int64_t heads_, kv_heads_, head_dim_, hidden_ = 0;
  bool query_only_;
  std::optional<torch::Tensor> q_norm_, k_norm_;
  float scale_;
  Linear o_;
  std::optional<torch::Tensor> post_attn_norm_;
  torch::Tensor mlp_norm_;
  Linear gate_up_;
  bool gelu_;
  Linear down_;
  std::optional<torch::Tensor> post_mlp_norm_, layer_scalar_;
  float eps_;
};

}  // namespace aheadlm
