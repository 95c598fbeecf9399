// Vim's pair of depthwise convolutions with their SiLU, on CPU, in one pass over time-major memory.
//
// Semantics are those of kernels/causal_conv.py's causal_conv1d_pair_ref (the official mixer's two
// nn.Conv1d(E, E, K, groups=E, padding=K-1), the backward one applied to the flipped sequence). Shape legend:
// b batch, E channels, L length, K taps.
//
//   x_f[e, t] = silu(bias_f[e] + sum_k w_f[e, k] * x[e, t - (K-1) + k])    causal: reads x[t-K+1 .. t]
//   x_b[e, t] = silu(bias_b[e] + sum_k w_b[e, k] * x[e, t + (K-1) - k])    anti-causal: reads x[t .. t+K-1]
//   (x outside 0 .. L-1 is 0.) x_b is flip(silu(conv1d_b(flip(x)))) computed without the flips.
//
// Design: x is read time-major, one row (b, t) of E channels at a time, W channels per vector; each output row
// reads the 2K-1 input rows around it (L1-resident) and writes one row of each output, so the pass streams x
// once and each output once. Rows run through at::parallel_for. The outputs are time-major ((b, L, E)
// contiguous, returned as (b, E, L) transposes), the layout x_proj reads without a copy and the compiled scan
// reads fastest.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "vec_math.h"

namespace vimbench_conv {
namespace {

using namespace vimbench_vec;

// One direction's filter as float32: taps (K, E) so that tap k of W consecutive channels is one vector load,
// and the bias (E,) (zeros when absent).
struct Filter {
  at::Tensor taps, bias;
};

Filter make_filter(const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t E) {
  TORCH_CHECK((w.dim() == 2 || (w.dim() == 3 && w.size(1) == 1)) && w.size(0) == E,
              "conv weight must be (E=", E, ", K) or (E, 1, K); got ", w.sizes());
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E, "conv bias must be (E=", E, ",); got ", bias->sizes());
  const at::Tensor w2 = w.reshape({E, w.size(-1)}).to(at::kFloat);
  return {w2.t().contiguous(), bias ? bias->to(at::kFloat).contiguous() : at::zeros({E}, w2.options())};
}

inline float silu_scalar(float v) { return v / (1.f + std::exp(-v)); }

// Both outputs of row t of batch bi. xr: x[bi] as (L, E) rows with row stride sl; out_*: row t of the outputs.
template <typename T>
void conv_row(const T* xr, int64_t sl, int64_t L, int64_t E, int64_t K, int64_t t, const float* wf,
              const float* bf, const float* wb, const float* bb, T* out_f, T* out_b) {
  int64_t e = 0;
  for (; e + W <= E; e += W) {
    Vec acc_f = Vec::loadu(bf + e), acc_b = Vec::loadu(bb + e);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t tf = t - (K - 1) + k, tb = t + (K - 1) - k;
      if (tf >= 0) acc_f = at::vec::fmadd(Vec::loadu(wf + k * E + e), load_vec<T>(xr + tf * sl + e), acc_f);
      if (tb < L) acc_b = at::vec::fmadd(Vec::loadu(wb + k * E + e), load_vec<T>(xr + tb * sl + e), acc_b);
    }
    store_vec<T>(silu(acc_f), out_f + e);
    store_vec<T>(silu(acc_b), out_b + e);
  }
  for (; e < E; ++e) {  // the last E mod W channels
    float acc_f = bf[e], acc_b = bb[e];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t tf = t - (K - 1) + k, tb = t + (K - 1) - k;
      if (tf >= 0) acc_f += wf[k * E + e] * static_cast<float>(xr[tf * sl + e]);
      if (tb < L) acc_b += wb[k * E + e] * static_cast<float>(xr[tb * sl + e]);
    }
    out_f[e] = static_cast<T>(silu_scalar(acc_f));
    out_b[e] = static_cast<T>(silu_scalar(acc_b));
  }
}

// x: (b, E, L), any strides, float32 / bfloat16 / float16; w_f, w_b: (E, K) or (E, 1, K); biases (E,) or None.
// Returns (x_f, x_b), each (b, E, L) in x's dtype with time-major memory.
std::tuple<at::Tensor, at::Tensor> causal_conv1d_pair_fwd(const at::Tensor& x_in, const at::Tensor& w_f,
                                                          const std::optional<at::Tensor>& b_f,
                                                          const at::Tensor& w_b,
                                                          const std::optional<at::Tensor>& b_b) {
  TORCH_CHECK(x_in.device().is_cpu(), "the compiled causal conv needs CPU tensors, got ", x_in.device());
  TORCH_CHECK(x_in.dim() == 3, "x must be (batch, E, L); got ", x_in.sizes());
  const at::ScalarType st = x_in.scalar_type();
  TORCH_CHECK(is_kernel_dtype(st), "the compiled causal conv takes float32, bfloat16 or float16; got ", st);
  const int64_t b = x_in.size(0), E = x_in.size(1), L = x_in.size(2);
  TORCH_CHECK(w_b.sizes() == w_f.sizes(), "both directions' conv weights must have one shape; got ", w_f.sizes(),
              " and ", w_b.sizes());
  const Filter f = make_filter(w_f, b_f, E), r = make_filter(w_b, b_b, E);
  const int64_t K = f.taps.size(0);
  // time-major rows: stride 1 along E (a copy only if x is not laid out so)
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.transpose(1, 2).contiguous().transpose(1, 2);
  at::Tensor out_f = at::empty({b, L, E}, x.options()), out_b = at::empty({b, L, E}, x.options());
  if (b * L * E == 0) return {out_f.transpose(1, 2), out_b.transpose(1, 2)};
  const float *wf = f.taps.const_data_ptr<float>(), *bf = f.bias.const_data_ptr<float>();
  const float *wb = r.taps.const_data_ptr<float>(), *bb = r.bias.const_data_ptr<float>();
  const int64_t sb = x.stride(0), sl = x.stride(2);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T *of = out_f.mutable_data_ptr<T>(), *ob = out_b.mutable_data_ptr<T>();
    at::parallel_for(0, b * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / L, t = row % L;
        conv_row<T>(xp + bi * sb, sl, L, E, K, t, wf, bf, wb, bb, of + row * E, ob + row * E);
      }
    });
  };
  dispatch_kernel_dtype(st, run);
  return {out_f.transpose(1, 2), out_b.transpose(1, 2)};
}

}  // namespace
}  // namespace vimbench_conv

TORCH_LIBRARY_FRAGMENT(vimbench_cpu, m) {
  m.def("causal_conv1d_pair_fwd(Tensor x, Tensor w_f, Tensor? b_f, Tensor w_b, Tensor? b_b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vimbench_cpu, CPU, m) {
  m.impl("causal_conv1d_pair_fwd", &vimbench_conv::causal_conv1d_pair_fwd);
}
