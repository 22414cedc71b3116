// A copy head's fresh pointer for one query row (`CopyHead.aim` with one row), in one call instead
// of about 40 small tensor ops: the scores of its two query heads (o = 0 proposes the token at a
// slot, o = 1 the token after it) against each source's keys, summed; the slots it may point at;
// the exact-match bonuses; one softmax over both heads' slots; and the `top` heaviest entries.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "rows.h"

namespace aheadlm {

// q [sources, 2, kv_heads, D] (after RoPE); keys: per source [1, kv_heads, S, D] (D contiguous);
// kpos [1, S] slot positions (-1 empty); qpos the query position; tokens [L] the known sequence;
// recent [m] the round's last input tokens; match [n <= m] the bonus per order (may be empty);
// scale multiplies the summed scores -> (positions [N], weights [N]) with N = min(top, 2 S).
inline std::tuple<torch::Tensor, torch::Tensor> copy_aim(torch::Tensor q, std::vector<torch::Tensor> keys,
                                                         torch::Tensor kpos, int64_t qpos, torch::Tensor tokens,
                                                         torch::Tensor recent, torch::Tensor match, double scale,
                                                         int64_t top) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 4 && q.size(1) == 2, "copy_aim: q");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == q.size(0), "copy_aim: one key tensor per source");
  q = q.contiguous();
  kpos = kpos.contiguous().to(torch::kInt64);
  tokens = tokens.contiguous().to(torch::kInt64);
  recent = recent.contiguous().to(torch::kInt64);
  match = match.contiguous().to(torch::kFloat32);
  const int64_t n = q.size(2), D = q.size(3), S = kpos.size(-1), L = tokens.numel(), M = match.numel();
  TORCH_CHECK(M <= recent.numel() && L > 0, "copy_aim: recent tokens, tokens");
  const float* qp = q.data_ptr<float>();
  const int64_t* kp = kpos.data_ptr<int64_t>();
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t* rp = recent.data_ptr<int64_t>();
  const float* mp = match.data_ptr<float>();
  const int64_t R = recent.numel();
  std::vector<float> score(2 * S, 0.f);
  for (size_t i = 0; i < keys.size(); ++i) {
    const torch::Tensor& k = keys[i];
    const bool bf16 = k.scalar_type() == torch::kBFloat16;
    TORCH_CHECK((bf16 || k.scalar_type() == torch::kFloat32) && k.dim() == 4 && k.size(1) == n && k.size(2) >= S &&
                    k.size(3) == D && k.stride(3) == 1,
                "copy_aim: keys");
    std::vector<float> wide(bf16 ? D : 0);  // a bfloat16 key row as floats, widened once for both outputs
    for (int64_t j = 0; j < n; ++j)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t at = j * k.stride(1) + s * k.stride(2);
        const float* kr = wide.data();
        if (bf16) {
          const bf16_t* h = static_cast<const bf16_t*>(k.data_ptr()) + at;
          for (int64_t d = 0; d < D; ++d) wide[d] = from_bf16(h[d]);
        } else {
          kr = static_cast<const float*>(k.data_ptr()) + at;
        }
        // each score still adds its heads j in order, so the sums are the same bits as before
        for (int64_t o = 0; o < 2; ++o) score[o * S + s] += dot(qp + ((i * 2 + o) * n + j) * D, kr, D);
      }
  }
  std::vector<char> ok(2 * S);
  float best = -INFINITY;
  for (int64_t o = 0; o < 2; ++o)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = o * S + s, src = kp[s] + o;
      ok[e] = kp[s] >= 0 && kp[s] < qpos && src <= qpos;
      if (!ok[e]) continue;
      float v = score[e] * static_cast<float>(scale);
      for (int64_t m = 0; m < M; ++m) {  // order m + 1: the m + 1 tokens before src equal the last inputs
        const int64_t pos = src - 1 - m;
        if (pos < 0 || pos >= L || tp[pos] != rp[R - 1 - m]) break;
        v += mp[m];
      }
      score[e] = v;
      best = std::max(best, v);
    }
  double total = 0.0;
  for (int64_t e = 0; e < 2 * S; ++e) {
    score[e] = ok[e] ? std::exp(score[e] - best) : 0.f;
    total += score[e];
  }
  const int64_t N = std::min<int64_t>(top, 2 * S);
  std::vector<int64_t> order(2 * S);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + N, order.end(),
                    [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  auto src = torch::empty({N}, torch::kInt64);
  auto w = torch::empty({N}, torch::kFloat32);
  int64_t* sp = src.data_ptr<int64_t>();
  float* wp = w.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t e = order[i];
    sp[i] = kp[e % S] + e / S;
    wp[i] = total > 0.0 ? static_cast<float>(score[e] / total) : 0.f;
  }
  return {src, w};
}

}  // namespace aheadlm
