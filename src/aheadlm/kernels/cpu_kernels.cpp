// CPU kernels for decoding and verification, as a PyTorch extension: small-batch matrix products
// with compact weights (gemm.h), attention, RMSNorm and RoPE over a few rows (rows.h), and a whole
// decoder layer (block.h), MTP draft step (draft.h) or copy head's aim (copy.h) in one call. Every
// op computes each row independently of the others (batch-invariant), so verifying draft tokens
// gives bit-identical results to decoding them one by one.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "attention.h"
#include "block.h"
#include "copy.h"
#include "draft.h"
#include "gemm.h"
#include "rows.h"

using namespace aheadlm;

namespace {

// q [B, Hq, T, D]; k, v [B, Hkv, S, D] (D contiguous); kpos [B, S] slot positions (-1 empty);
// qpos [B, T]. Visibility as in `attend_tile`; rows that see no key are zero.
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kpos, torch::Tensor qpos,
                        double scale, int64_t window, bool strict) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 &&
                  (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16) &&
                  v.scalar_type() == k.scalar_type(),
              "attention: float32 queries over float32 or bfloat16 keys and values");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && kpos.stride(1) == 1, "attention: layout");
  q = q.contiguous();
  qpos = qpos.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  auto out = torch::empty_like(q);
  const int64_t Hkv = k.size(1);
  AttnProblem p{q.data_ptr<float>(), B, Hq, T, D, Hq / Hkv, k.data_ptr(), v.data_ptr(),
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                kpos.data_ptr<int64_t>(), kpos.stride(0), qpos.data_ptr<int64_t>(), k.size(2), window, strict,
                static_cast<float>(scale), out.data_ptr<float>(), Hq * T * D, T * D, D,
                k.scalar_type() == torch::kBFloat16};
  attend(p);
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
  w = w.contiguous();  // kept alive: wp points into it
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * H, wp, yp + r * H, H, static_cast<float>(eps));
  });
  return y;
}

// Rotary embedding (`rope_row`) of x [B, H, T, D] (any strides, D contiguous) with cos, sin
// [B, 1, T, D]: one call instead of about six small ops per tensor.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && cos.scalar_type() == torch::kFloat32 &&
                  sin.scalar_type() == torch::kFloat32, "rope: float32 only");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x layout");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
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
      rope_row(xp + b * s0 + h * s1 + t * s2, cp + (b * T + t) * D, sp + (b * T + t) * D, yp + i * D, D);
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm (float32)");
  m.def("rope", &rope, "rotary embedding, rotate-half form (float32, bit-identical to the tensor ops)");
  m.def("attention", &attention, "batch-invariant attention of a few query rows over a KV cache");
  m.def("copy_aim", &copy_aim, "a copy head's fresh pointer for one query row: (positions, weights)");
  py::class_<Linear>(m, "Linear")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, bool>(), py::arg("w"),
           py::arg("scale"), py::arg("offset"), py::arg("block"), py::arg("bits") = 8, py::arg("zero") = 0,
           py::arg("integer") = false)
      .def("__call__", &Linear::apply, "x @ W^T, or against rows ids only", py::arg("x"), py::arg("ids") = py::none())
      .def("unpack", &Linear::unpack, "an integer-form Linear's (q, scale, offset) in rows");
  m.def("int_products_compiled", &int_products_compiled, "whether Linear(integer=True) works in this build");
  py::class_<Block>(m, "Block")
      .def(py::init<torch::Tensor, Linear, int64_t, int64_t, int64_t, bool, std::optional<torch::Tensor>,
                    std::optional<torch::Tensor>, double, Linear, std::optional<torch::Tensor>, torch::Tensor, Linear,
                    bool, Linear, std::optional<torch::Tensor>, std::optional<torch::Tensor>, double>(),
           py::arg("attn_norm"), py::arg("qkv"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("query_only"), py::arg("q_norm"), py::arg("k_norm"), py::arg("query_scale"), py::arg("o"),
           py::arg("post_attn_norm"), py::arg("mlp_norm"), py::arg("gate_up"), py::arg("gelu"), py::arg("down"),
           py::arg("post_mlp_norm"), py::arg("layer_scalar"), py::arg("eps"))
      .def("forward", &Block::forward, "one decoder layer: returns its output and writes the new keys and values");
  py::class_<LayerRound>(m, "LayerRound")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,
                    int64_t, bool>(),
           py::arg("cos"), py::arg("sin"), py::arg("k"), py::arg("v"), py::arg("kpos"), py::arg("qpos"), py::arg("window"),
           py::arg("end"), py::arg("strict"));
  py::class_<Drafter>(m, "Drafter")
      .def(py::init<Linear, double, Linear, std::vector<Block>, torch::Tensor, double, Linear, Linear, torch::Tensor,
                    int64_t, Linear, double>(),
           py::arg("embed"), py::arg("embed_scale"), py::arg("pre"), py::arg("layers"), py::arg("norm"), py::arg("eps"),
           py::arg("post"), py::arg("centroids"), py::arg("ordering"), py::arg("top_k"), py::arg("head"),
           py::arg("softcap"))
      .def("step", &Drafter::step, "one draft step: (next hidden, candidate ids, their scores)");
}
