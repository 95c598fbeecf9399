// Vim's residual add and RMSNorm on CPU, fused into one pass (mamba_ssm's fused add-norm, rms_norm_fn with
// prenorm and a float32 residual, which the official Vim uses on GPU).
//
// Semantics are those of kernels/rms_norm.py's add_rms_norm_ref. Shape legend: rows = every index but the
// last, D the normalised (last) dimension.
//
//   residual_out = residual + float(x)              (float(x) when residual is absent), float32
//   out          = residual_out / sqrt(mean_D(residual_out^2) + eps) * weight,   in weight's dtype
//
// Design: one row of D values at a time through at::parallel_for; the row's sum of squares in W-wide float32
// vectors (two accumulators), then one pass that scales, multiplies by the weight and stores both outputs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "vec_math.h"

namespace vimbench_norm {
namespace {

using namespace vimbench_vec;

// One row: r = res + x (res may be null), out = r * inv_rms * w.
template <typename T, typename TW>
void norm_row(const T* x, const float* res, const TW* w, int64_t D, float eps, float* r, TW* out) {
  Vec acc0(0.f), acc1(0.f);
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    Vec v = load_vec<T>(x + d);
    if (res) v = v + Vec::loadu(res + d);
    v.store(r + d);
    if ((d / W) & 1) acc1 = at::vec::fmadd(v, v, acc1); else acc0 = at::vec::fmadd(v, v, acc0);
  }
  float ss = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
  for (; d < D; ++d) {
    const float v = static_cast<float>(x[d]) + (res ? res[d] : 0.f);
    r[d] = v;
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  d = 0;
  for (; d + W <= D; d += W) store_vec<TW>(Vec::loadu(r + d) * Vec(inv) * load_vec<TW>(w + d), out + d);
  for (; d < D; ++d) out[d] = static_cast<TW>(r[d] * inv * static_cast<float>(w[d]));
}

// x: (..., D) float32 / bfloat16 / float16; residual: None or x's shape, float32; weight: (D,) float32 /
// bfloat16 / float16. Returns (out in weight's dtype, residual_out float32), both x's shape, contiguous.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& res_in,
                                                    const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.device().is_cpu(), "the compiled add + RMSNorm needs CPU tensors, got ", x_in.device());
  TORCH_CHECK(x_in.dim() >= 1 && is_kernel_dtype(x_in.scalar_type()),
              "x must be a float32, bfloat16 or float16 tensor (..., D); got ", x_in.scalar_type(), " ", x_in.sizes());
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(w_in.dim() == 1 && w_in.size(0) == D && is_kernel_dtype(w_in.scalar_type()),
              "weight must be (D=", D, ",) float32, bfloat16 or float16; got ", w_in.scalar_type(), " ", w_in.sizes());
  if (res_in)
    TORCH_CHECK(res_in->sizes() == x_in.sizes() && res_in->scalar_type() == at::kFloat,
                "residual must be float32 with x's shape ", x_in.sizes(), "; got ", res_in->scalar_type(), " ",
                res_in->sizes());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const std::optional<at::Tensor> res = res_in ? std::optional<at::Tensor>(res_in->contiguous()) : std::nullopt;
  at::Tensor r = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(w.scalar_type()));
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const float* rp = res ? res->const_data_ptr<float>() : nullptr;
  dispatch_kernel_dtype(x.scalar_type(), [&](auto x_tag) {
    dispatch_kernel_dtype(w.scalar_type(), [&](auto w_tag) {
      using T = decltype(x_tag);
      using TW = decltype(w_tag);
      const T* xp = x.const_data_ptr<T>();
      const TW* wp = w.const_data_ptr<TW>();
      float* ro = r.mutable_data_ptr<float>();
      TW* op = out.mutable_data_ptr<TW>();
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          norm_row<T, TW>(xp + i * D, rp ? rp + i * D : nullptr, wp, D, static_cast<float>(eps), ro + i * D,
                          op + i * D);
      });
    });
  });
  return {out, r};
}

}  // namespace
}  // namespace vimbench_norm

TORCH_LIBRARY_FRAGMENT(vimbench_cpu, m) {
  m.def("add_rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vimbench_cpu, CPU, m) {
  m.impl("add_rms_norm_fwd", &vimbench_norm::add_rms_norm_fwd);
}
