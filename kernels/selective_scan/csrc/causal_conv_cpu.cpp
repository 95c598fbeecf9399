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
//
// Backward (causal_conv1d_pair_bwd): with g_f = dx_f * silu'(pre_f) and g_b = dx_b * silu'(pre_b), the
// pre-activations recomputed from x,
//
//   dx[e, s]      = sum_k w_f[e, k] * g_f[e, s + (K-1) - k] + sum_k w_b[e, k] * g_b[e, s - (K-1) + k]
//   dw_f[e, k]    = sum_(batch, t) g_f[e, t] * x[e, t - (K-1) + k],    db_f[e] = sum_(batch, t) g_f[e, t]
//   dw_b[e, k]    = sum_(batch, t) g_b[e, t] * x[e, t + (K-1) - k],    db_b[e] = sum_(batch, t) g_b[e, t]
//
// The rows of each batch element are cut into blocks of a length that depends only on the shape; a block walks
// its rows in order, keeping the K rows of g_f and of g_b its current row needs in two ring buffers (g_f runs
// K-1 rows ahead), and sums its share of dw and db into its own slot of a partials buffer; the slots are then
// added in block order. So the result is the same whatever the number of threads, with no atomics and no
// (b, L, E) intermediate.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace vimbench_conv {
namespace {

using namespace vimbench_vec;

// E rounded up to a whole number of vectors: the row length of the kernels' float32 buffers.
inline int64_t padded(int64_t E) { return (E + W - 1) / W * W; }

// One direction's filter as float32, zero-padded to Ep = padded(E) channels: taps (K, Ep) so that tap k of W
// consecutive channels is one vector load, and the bias (Ep,) (zeros when absent).
struct Filter {
  at::Tensor taps, bias;
};

Filter make_filter(const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t E) {
  TORCH_CHECK((w.dim() == 2 || (w.dim() == 3 && w.size(1) == 1)) && w.size(0) == E,
              "conv weight must be (E=", E, ", K) or (E, 1, K); got ", w.sizes());
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E, "conv bias must be (E=", E, ",); got ", bias->sizes());
  const int64_t K = w.size(-1), Ep = padded(E);
  at::Tensor taps = at::zeros({K, Ep}, w.options().dtype(at::kFloat)), b = at::zeros({Ep}, taps.options());
  taps.narrow(1, 0, E).copy_(w.reshape({E, K}).t());
  if (bias) b.narrow(0, 0, E).copy_(*bias);
  return {taps, b};
}

// t (b, E, L) with stride 1 along E, so that its rows (b, t) are E consecutive elements: t itself if it is laid
// out so, else a time-major copy.
at::Tensor time_major_rows(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.transpose(1, 2).contiguous().transpose(1, 2);
}

inline float silu_scalar(float v) { return v / (1.f + std::exp(-v)); }

// Both outputs of row t of batch bi. xr: x[bi] as (L, E) rows with row stride sl; out_*: row t of the outputs.
// wf, wb: the filters' taps (K, Ep), Ep = padded(E).
template <typename T>
void conv_row(const T* xr, int64_t sl, int64_t L, int64_t E, int64_t K, int64_t t, const float* wf,
              const float* bf, const float* wb, const float* bb, T* out_f, T* out_b) {
  const int64_t Ep = padded(E);
  int64_t e = 0;
  for (; e + W <= E; e += W) {
    Vec acc_f = Vec::loadu(bf + e), acc_b = Vec::loadu(bb + e);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t tf = t - (K - 1) + k, tb = t + (K - 1) - k;
      if (tf >= 0) acc_f = at::vec::fmadd(Vec::loadu(wf + k * Ep + e), load_vec<T>(xr + tf * sl + e), acc_f);
      if (tb < L) acc_b = at::vec::fmadd(Vec::loadu(wb + k * Ep + e), load_vec<T>(xr + tb * sl + e), acc_b);
    }
    store_vec<T>(silu(acc_f), out_f + e);
    store_vec<T>(silu(acc_b), out_b + e);
  }
  for (; e < E; ++e) {  // the last E mod W channels
    float acc_f = bf[e], acc_b = bb[e];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t tf = t - (K - 1) + k, tb = t + (K - 1) - k;
      if (tf >= 0) acc_f += wf[k * Ep + e] * static_cast<float>(xr[tf * sl + e]);
      if (tb < L) acc_b += wb[k * Ep + e] * static_cast<float>(xr[tb * sl + e]);
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
  const at::Tensor x = time_major_rows(x_in);
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

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// One direction of the pair inside one block of the backward. Tap k of the direction reads
// x[t + dir * (K-1-k)]: dir = -1 for the causal conv, +1 for the anti-causal one.
template <typename T>
struct Direction {
  const float* taps;  // (K, Ep)
  const float* bias;  // (Ep,)
  const T* dy;        // the gradient of this direction's output for the block's batch element: rows (L, E)
  int64_t sdy;        // dy's row stride
  int64_t dir;
  float* ring;        // (K, Ep): g = dy * silu'(pre) of row r in slot r % K
  float* dw;          // the block's partial sums: dw (K, Ep) followed by db (Ep,)
};

// g of row r (0 <= r < L) into the ring. xr: x's rows (L, E) with row stride sl; xs: scratch for K pointers.
template <typename T>
void g_row(const Direction<T>& d, const T* xr, int64_t sl, int64_t L, int64_t E, int64_t K, int64_t r,
           const T** xs) {
  const int64_t Ep = padded(E);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t tt = r + d.dir * (K - 1 - k);
    xs[k] = tt >= 0 && tt < L ? xr + tt * sl : nullptr;
  }
  const T* dy = d.dy + r * d.sdy;
  float* g = d.ring + (r % K) * Ep;
  for (int64_t e = 0; e < Ep; e += W) {
    const int64_t n = std::min<int64_t>(W, E - e);
    Vec pre = Vec::loadu(d.bias + e);
    for (int64_t k = 0; k < K; ++k)
      if (xs[k]) pre = at::vec::fmadd(Vec::loadu(d.taps + k * Ep + e), load_part(xs[k] + e, n), pre);
    (load_part(dy + e, n) * silu_grad(pre)).store(g + e);
  }
}

// Row s of dx, and row s's share of both directions' dw and db (the rings hold the g rows it needs). gs, xs:
// scratch for 2K pointers each.
template <typename T>
void grad_row(const Direction<T>* dirs, const T* xr, int64_t sl, int64_t L, int64_t E, int64_t K, int64_t s,
              T* dx, const float** gs, const T** xs) {
  const int64_t Ep = padded(E);
  for (int di = 0; di < 2; ++di)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t back = s - dirs[di].dir * (K - 1 - k), fwd = s + dirs[di].dir * (K - 1 - k);
      gs[di * K + k] = back >= 0 && back < L ? dirs[di].ring + (back % K) * Ep : nullptr;  // read x[s] with tap k
      xs[di * K + k] = fwd >= 0 && fwd < L ? xr + fwd * sl : nullptr;                       // row s's tap k read it
    }
  const float* g_s[2] = {dirs[0].ring + (s % K) * Ep, dirs[1].ring + (s % K) * Ep};
  for (int64_t e = 0; e < Ep; e += W) {
    const int64_t n = std::min<int64_t>(W, E - e);
    Vec acc(0.f);
    for (int di = 0; di < 2; ++di) {
      const Direction<T>& d = dirs[di];
      const Vec g = Vec::loadu(g_s[di] + e);
      for (int64_t k = 0; k < K; ++k) {
        const float* gk = gs[di * K + k];
        const T* xk = xs[di * K + k];
        if (gk) acc = at::vec::fmadd(Vec::loadu(d.taps + k * Ep + e), Vec::loadu(gk + e), acc);
        if (xk) {
          float* dw = d.dw + k * Ep + e;
          at::vec::fmadd(g, load_part(xk + e, n), Vec::loadu(dw)).store(dw);
        }
      }
      float* db = d.dw + K * Ep + e;
      (Vec::loadu(db) + g).store(db);
    }
    store_part(acc, dx + e, n);
  }
}

// x: (b, E, L), any strides; w_f, w_b, b_f, b_b: as the forward; dx_f, dx_b: (b, E, L) in x's dtype, any strides.
// Returns (dx, dw_f, db_f, dw_b, db_b): dx (b, E, L) in x's dtype with time-major memory; the others in their
// parameter's shape and dtype (db_* empty when the bias is absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_pair_bwd(
    const at::Tensor& x_in, const at::Tensor& w_f, const std::optional<at::Tensor>& b_f, const at::Tensor& w_b,
    const std::optional<at::Tensor>& b_b, const at::Tensor& dx_f_in, const at::Tensor& dx_b_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "the compiled causal conv needs CPU tensors, got ", x_in.device());
  TORCH_CHECK(x_in.dim() == 3, "x must be (batch, E, L); got ", x_in.sizes());
  const at::ScalarType st = x_in.scalar_type();
  TORCH_CHECK(is_kernel_dtype(st), "the compiled causal conv takes float32, bfloat16 or float16; got ", st);
  TORCH_CHECK(dx_f_in.sizes() == x_in.sizes() && dx_b_in.sizes() == x_in.sizes() && dx_f_in.scalar_type() == st &&
              dx_b_in.scalar_type() == st, "the outputs' gradients must have x's shape ", x_in.sizes(),
              " and dtype ", st, "; got ", dx_f_in.sizes(), " ", dx_f_in.scalar_type(), " and ", dx_b_in.sizes(),
              " ", dx_b_in.scalar_type());
  TORCH_CHECK(w_b.sizes() == w_f.sizes(), "both directions' conv weights must have one shape; got ", w_f.sizes(),
              " and ", w_b.sizes());
  const int64_t b = x_in.size(0), E = x_in.size(1), L = x_in.size(2), Ep = padded(E);
  const Filter ff = make_filter(w_f, b_f, E), fb = make_filter(w_b, b_b, E);
  const int64_t K = ff.taps.size(0);
  const at::Tensor x = time_major_rows(x_in), dyf = time_major_rows(dx_f_in), dyb = time_major_rows(dx_b_in);
  at::Tensor dx = at::empty({b, L, E}, x.options());
  // blocks of `len` rows of one batch element, at most ~256 blocks in all; partials (blocks, 2, K + 1, Ep)
  const int64_t len = std::max<int64_t>(64, (b * L + 255) / 256), per_b = (L + len - 1) / len, blocks = b * per_b;
  at::Tensor partials = at::zeros({blocks, 2, K + 1, Ep}, x.options().dtype(at::kFloat));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T *xp = x.const_data_ptr<T>(), *pf = dyf.const_data_ptr<T>(), *pb = dyb.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    float* part = partials.mutable_data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> rings(2 * K * Ep);
      std::vector<const float*> gs(2 * K);
      std::vector<const T*> xs(2 * K);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t bi = blk / per_b, t0 = (blk % per_b) * len, t1 = std::min(L, t0 + len);
        const T* xr = xp + bi * x.stride(0);
        float* p = part + blk * 2 * (K + 1) * Ep;
        const Direction<T> dirs[2] = {
            {ff.taps.const_data_ptr<float>(), ff.bias.const_data_ptr<float>(), pf + bi * dyf.stride(0),
             dyf.stride(2), -1, rings.data(), p},
            {fb.taps.const_data_ptr<float>(), fb.bias.const_data_ptr<float>(), pb + bi * dyb.stride(0),
             dyb.stride(2), +1, rings.data() + K * Ep, p + (K + 1) * Ep}};
        // row s needs g rows s + lo .. s + lo + K - 1 of a direction: lo = 0 causal, -(K-1) anti-causal
        auto lo = [&](const Direction<T>& d) { return d.dir < 0 ? int64_t{0} : -(K - 1); };
        for (const auto& d : dirs)
          for (int64_t r = std::max<int64_t>(0, t0 + lo(d)); r < std::min(L, t0 + lo(d) + K - 1); ++r)
            g_row(d, xr, x.stride(2), L, E, K, r, xs.data());
        for (int64_t s = t0; s < t1; ++s) {
          for (const auto& d : dirs)
            if (s + lo(d) + K - 1 < L) g_row(d, xr, x.stride(2), L, E, K, s + lo(d) + K - 1, xs.data());
          grad_row(dirs, xr, x.stride(2), L, E, K, s, dxp + (bi * L + s) * E, gs.data(), xs.data());
        }
      }
    });
  };
  if (b * L * E > 0) dispatch_kernel_dtype(st, run);
  // the blocks' partial sums added in block order
  at::Tensor sums = at::zeros({2, K + 1, Ep}, partials.options());
  float* out = sums.mutable_data_ptr<float>();
  const float* part = partials.const_data_ptr<float>();
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t i = 0; i < 2 * (K + 1) * Ep; i += W)
      (Vec::loadu(out + i) + Vec::loadu(part + blk * 2 * (K + 1) * Ep + i)).store(out + i);
  auto weight_grad = [&](int di, const at::Tensor& w) {
    return sums[di].narrow(0, 0, K).narrow(1, 0, E).t().contiguous().view(w.sizes()).to(w.scalar_type());
  };
  auto bias_grad = [&](int di, const std::optional<at::Tensor>& bias) {
    return bias ? sums[di][K].narrow(0, 0, E).to(bias->scalar_type()) : at::empty({0}, w_f.options());
  };
  return {dx.transpose(1, 2), weight_grad(0, w_f), bias_grad(0, b_f), weight_grad(1, w_b), bias_grad(1, b_b)};
}

}  // namespace
}  // namespace vimbench_conv

TORCH_LIBRARY_FRAGMENT(vimbench_cpu, m) {
  m.def("causal_conv1d_pair_fwd(Tensor x, Tensor w_f, Tensor? b_f, Tensor w_b, Tensor? b_b) -> (Tensor, Tensor)");
  m.def("causal_conv1d_pair_bwd(Tensor x, Tensor w_f, Tensor? b_f, Tensor w_b, Tensor? b_b, Tensor dx_f, "
        "Tensor dx_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vimbench_cpu, CPU, m) {
  m.impl("causal_conv1d_pair_fwd", &vimbench_conv::causal_conv1d_pair_fwd);
  m.impl("causal_conv1d_pair_bwd", &vimbench_conv::causal_conv1d_pair_bwd);
}
