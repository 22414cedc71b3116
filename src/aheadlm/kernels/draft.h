// One MTP draft step in one call: the target's embedding of the last token, the pre-projection,
// the drafter's compiled layers, the final norm and post-projection, then the clustered head (the
// centroids' top clusters and the target's head rows of their tokens). Same kernels and order as
// `MTPDrafter.step` plus `MTPDrafter.scores`, so bit-identical to them; it saves their ~40 small
// Python and PyTorch calls, about a quarter of a draft step.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "block.h"

namespace aheadlm {

// What one drafter layer reads in a round: RoPE at the query position and the target's K/V.
struct LayerRound {
  torch::Tensor cos, sin, k, v, kpos, qpos;
  int64_t window = 0, end = 0;
  bool strict = true;
};

class Drafter {
 public:
  // embed: the target's embedding table (its rows are the inputs, scaled by embed_scale); head: the
  // target's output head (the tied table or lm_head), scored on the candidates only; ordering: the
  // token ids grouped by cluster, [centroids * cluster size].
  Drafter(Linear embed, double embed_scale, Linear pre, std::vector<Block> layers, torch::Tensor norm, double eps,
          Linear post, Linear centroids, torch::Tensor ordering, int64_t top_k, Linear head, double softcap)
      : embed_(std::move(embed)),
        embed_scale_(static_cast<float>(embed_scale)),
        pre_(std::move(pre)),
        layers_(std::move(layers)),
        norm_(norm.contiguous()),
        eps_(static_cast<float>(eps)),
        post_(std::move(post)),
        centroids_(std::move(centroids)),
        ordering_(ordering.contiguous().to(torch::kInt64)),
        top_k_(top_k),
        head_(std::move(head)),
        softcap_(softcap) {
    const int64_t ht = embed_.K, h = norm_.numel();
    TORCH_CHECK(pre_.K == 2 * ht && pre_.N == h && post_.K == h && post_.N == ht, "Drafter: projection shapes");
    TORCH_CHECK(centroids_.K == ht && head_.K == ht && ordering_.numel() % centroids_.N == 0 &&
                    top_k > 0 && top_k <= centroids_.N,
                "Drafter: head shapes");
  }

  // token, hidden [target hidden] -> (next hidden [target hidden], candidate ids [n], their scores [n]).
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> step(int64_t token, torch::Tensor hidden,
                                                               const std::vector<LayerRound>& round) const {
    const int64_t ht = embed_.K, h = norm_.numel();
    TORCH_CHECK(token >= 0 && token < embed_.N, "Drafter: token out of range");
    TORCH_CHECK(hidden.scalar_type() == torch::kFloat32 && hidden.numel() == ht, "Drafter: hidden");
    TORCH_CHECK(round.size() == layers_.size(), "Drafter: one round entry per layer");
    auto opts = hidden.options();
    std::vector<float> in(2 * ht);
    embed_.row(token, in.data());
    if (embed_scale_ != 1.f)
      for (int64_t d = 0; d < ht; ++d) in[d] *= embed_scale_;
    hidden = hidden.contiguous();  // kept alive: hp points into it
    const float* hp = hidden.data_ptr<float>();
    std::copy(hp, hp + ht, in.begin() + ht);
    auto x = torch::empty({1, 1, h}, opts);
    pre_.run(in.data(), 1, x.data_ptr<float>());
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerRound& r = round[i];
      x = layers_[i].forward(x, r.cos, r.sin, r.k, r.v, std::nullopt, r.kpos, r.qpos, r.window, r.end, r.strict);
    }
    std::vector<float> normed(h);
    rms_row(x.data_ptr<float>(), norm_.data_ptr<float>(), normed.data(), h, eps_);
    auto next = torch::empty({ht}, opts);
    post_.run(normed.data(), 1, next.data_ptr<float>());

    // Clustered head: the tokens of the top clusters, scored against the target's head rows.
    auto cent = torch::empty({1, centroids_.N}, opts);
    centroids_.run(next.data_ptr<float>(), 1, cent.data_ptr<float>());
    auto top = std::get<1>(cent.topk(top_k_, -1));
    auto ids = ordering_.view({centroids_.N, -1}).index({top}).flatten(1)[0].contiguous();
    auto scores = torch::empty({ids.numel()}, opts);
    head_.run_rows(next.data_ptr<float>(), 1, ids.data_ptr<int64_t>(), ids.numel(), scores.data_ptr<float>());
    if (softcap_ != 0.0) scores = torch::tanh(scores / softcap_) * softcap_;
    return {next, ids, scores};
  }

 private:
  Linear embed_;
  float embed_scale_;
  Linear pre_;
  std::vector<Block> layers_;
  torch::Tensor norm_;
  float eps_;
  Linear post_, centroids_;
  torch::Tensor ordering_;
  int64_t top_k_;
  Linear head_;
  double softcap_;
};

}  // namespace aheadlm
