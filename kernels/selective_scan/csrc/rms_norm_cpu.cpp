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
//
// Backward (add_rms_norm_bwd), from residual_out r (saved by the forward's autograd; rstd recomputed from it),
// the gradient dout of out and dres_out of residual_out (the residual stream's, absent or zero at the last norm):
//
//   rstd = 1 / sqrt(mean_D(r^2) + eps),   g = dout * weight
//   dr   = rstd * g - r * rstd^3 * mean_D(g * r) + dres_out          = dx = dresidual (in their dtypes)
//   dweight = sum over rows of dout * r * rstd
//
// Two passes per row (the two sums, then dr and the row's share of dweight). Rows are cut into blocks of a
// length that depends only on the shape; each block sums its dweight share into its own slot of a partials
// buffer and the slots are added in block order: deterministic whatever the number of threads, no atomics.

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

// Backward of one row. r, dres: float32 (dres may be null); w: the weight as float32, padded to Dp = D rounded up
// to W; dw: the block's (Dp,) partial sums of dweight. Writes dx (T) and, if non-null, dresidual (float32).
template <typename T, typename TW>
void norm_row_bwd(const float* r, const TW* dout, const float* dres, const float* w, int64_t D, float eps, T* dx,
                  float* dresidual, float* dw) {
  Vec ss(0.f), sgr(0.f);
  for (int64_t d = 0; d < D; d += W) {
    const int64_t n = std::min<int64_t>(W, D - d);
    const Vec rv = load_part(r + d, n);
    ss = at::vec::fmadd(rv, rv, ss);
    sgr = at::vec::fmadd(load_part(dout + d, n) * Vec::loadu(w + d), rv, sgr);
  }
  auto sum = [](const Vec& v) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v); };
  const float rstd = 1.f / std::sqrt(sum(ss) / static_cast<float>(D) + eps);
  const Vec c(rstd * rstd * rstd * sum(sgr) / static_cast<float>(D)), rs(rstd);
  for (int64_t d = 0; d < D; d += W) {
    const int64_t n = std::min<int64_t>(W, D - d);
    const Vec rv = load_part(r + d, n), go = load_part(dout + d, n);
    Vec dr = go * Vec::loadu(w + d) * rs - rv * c;
    if (dres) dr = dr + load_part(dres + d, n);
    store_part(dr, dx + d, n);
    if (dresidual) store_part(dr, dresidual + d, n);
    at::vec::fmadd(go, rv * rs, Vec::loadu(dw + d)).store(dw + d);
  }
}

// dout: (..., D) in weight's dtype; dres_out: None or (..., D) float32; residual_out: (..., D) float32, the
// forward's; weight: (D,); x_dtype: the forward's x dtype; has_residual: whether the forward had a residual.
// Returns (dx in x_dtype, dresidual float32 (empty when !has_residual), dweight in weight's dtype), contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_bwd(const at::Tensor& dout_in,
                                                                const std::optional<at::Tensor>& dres_in,
                                                                const at::Tensor& r_in, const at::Tensor& w_in,
                                                                double eps, at::ScalarType x_dtype, bool has_residual) {
  TORCH_CHECK(r_in.device().is_cpu(), "the compiled add + RMSNorm needs CPU tensors, got ", r_in.device());
  TORCH_CHECK(r_in.dim() >= 1 && r_in.scalar_type() == at::kFloat, "residual_out must be float32 (..., D); got ",
              r_in.scalar_type(), " ", r_in.sizes());
  const int64_t D = r_in.size(-1);
  TORCH_CHECK(w_in.dim() == 1 && w_in.size(0) == D && is_kernel_dtype(w_in.scalar_type()),
              "weight must be (D=", D, ",) float32, bfloat16 or float16; got ", w_in.scalar_type(), " ", w_in.sizes());
  TORCH_CHECK(is_kernel_dtype(x_dtype), "x's dtype must be float32, bfloat16 or float16; got ", x_dtype);
  TORCH_CHECK(dout_in.sizes() == r_in.sizes() && dout_in.scalar_type() == w_in.scalar_type(),
              "dout must have residual_out's shape ", r_in.sizes(), " and weight's dtype ", w_in.scalar_type(),
              "; got ", dout_in.sizes(), " ", dout_in.scalar_type());
  if (dres_in)
    TORCH_CHECK(dres_in->sizes() == r_in.sizes() && dres_in->scalar_type() == at::kFloat,
                "dresidual_out must be float32 with residual_out's shape ", r_in.sizes(), "; got ",
                dres_in->scalar_type(), " ", dres_in->sizes());
  const at::Tensor r = r_in.contiguous(), dout = dout_in.contiguous();
  const std::optional<at::Tensor> dres = dres_in ? std::optional<at::Tensor>(dres_in->contiguous()) : std::nullopt;
  const int64_t Dp = (D + W - 1) / W * W, rows = D == 0 ? 0 : r.numel() / D;
  at::Tensor w = at::zeros({Dp}, r.options());
  w.narrow(0, 0, D).copy_(w_in);
  at::Tensor dx = at::empty(r.sizes(), r.options().dtype(x_dtype));
  at::Tensor dresidual = has_residual ? at::empty(r.sizes(), r.options()) : at::empty({0}, r.options());
  // blocks of `len` rows, at most ~256 of them; partials (blocks, Dp)
  const int64_t len = std::max<int64_t>(16, (rows + 255) / 256), blocks = (rows + len - 1) / len;
  at::Tensor partials = at::zeros({blocks, Dp}, r.options());
  dispatch_kernel_dtype(x_dtype, [&](auto x_tag) {
    dispatch_kernel_dtype(w_in.scalar_type(), [&](auto w_tag) {
      using T = decltype(x_tag);
      using TW = decltype(w_tag);
      const float *rp = r.const_data_ptr<float>(), *dp = dres ? dres->const_data_ptr<float>() : nullptr;
      const float* wp = w.const_data_ptr<float>();
      const TW* gp = dout.const_data_ptr<TW>();
      T* dxp = dx.mutable_data_ptr<T>();
      float* drp = has_residual ? dresidual.mutable_data_ptr<float>() : nullptr;
      float* part = partials.mutable_data_ptr<float>();
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk)
          for (int64_t i = blk * len; i < std::min(rows, (blk + 1) * len); ++i)
            norm_row_bwd<T, TW>(rp + i * D, gp + i * D, dp ? dp + i * D : nullptr, wp, D, static_cast<float>(eps),
                                dxp + i * D, drp ? drp + i * D : nullptr, part + blk * Dp);
      });
    });
  });
  // the blocks' partial sums added in block order
  at::Tensor dw = at::zeros({Dp}, r.options());
  float* out = dw.mutable_data_ptr<float>();
  const float* part = partials.const_data_ptr<float>();
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t d = 0; d < Dp; d += W) (Vec::loadu(out + d) + Vec::loadu(part + blk * Dp + d)).store(out + d);
  return {dx, dresidual, dw.narrow(0, 0, D).to(w_in.scalar_type())};
}

}  // namespace
}  // namespace vimbench_norm

TORCH_LIBRARY_FRAGMENT(vimbench_cpu, m) {
  m.def("add_rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("add_rms_norm_bwd(Tensor dout, Tensor? dresidual_out, Tensor residual_out, Tensor weight, float eps, "
        "ScalarType x_dtype, bool has_residual) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vimbench_cpu, CPU, m) {
  m.impl("add_rms_norm_fwd", &vimbench_norm::add_rms_norm_fwd);
  m.impl("add_rms_norm_bwd", &vimbench_norm::add_rms_norm_bwd);
}
