// Vectorised float32 math shared by vimbench's compiled CPU kernels (the selective scan, the causal conv and the
// add + RMSNorm): the dtypes they take and the dispatch over them, the vector type, loads/stores that convert
// bf16/fp16 to and from float32, and the inline exp, softplus and silu the kernels apply per element. Compiled
// with -DCPU_CAPABILITY_<AVX512|AVX2|DEFAULT> (see compiled_cpu.py), which sets the vector width W.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace vimbench_vec {

// The dtypes the kernels read and write (their arithmetic is float32 whatever these are).
inline bool is_kernel_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

// Calls f(T{}) with T the C++ type of st: float, c10::BFloat16 or c10::Half (st must be a kernel dtype).
template <typename F>
void dispatch_kernel_dtype(c10::ScalarType st, F&& f) {
  switch (st) {
    case c10::ScalarType::Float: f(float{}); return;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); return;
    case c10::ScalarType::Half: f(c10::Half{}); return;
    default: TORCH_CHECK(false, "unsupported dtype ", st);
  }
}

// Forced inlining for the per-element math below: called once per vector inside the kernels' loops, where a
// call would reload every polynomial constant from memory and pass vectors through the stack.
#define VIMBENCH_INLINE inline __attribute__((always_inline))

using Vec = at::vec::Vectorized<float>;
constexpr int W = Vec::size();             // float32 SIMD lanes (16 with AVX-512, 8 with AVX2)


// One float32 vector of W channels from W consecutive elements (any input dtype).
template <typename T>
inline Vec load_vec(const T* p);
template <>
inline Vec load_vec<float>(const float* p) { return Vec::loadu(p); }
template <>
inline Vec load_vec<c10::BFloat16>(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_to_float(p, v);
  return v;
}
template <>
inline Vec load_vec<c10::Half>(const c10::Half* p) {
  Vec v;
  at::vec::load_to_float(p, v);
  return v;
}

// Stores W float32 lanes to W consecutive elements of type T.
template <typename T>
inline void store_vec(const Vec& v, T* p);
template <>
inline void store_vec<float>(const Vec& v, float* p) { v.store(p); }
template <>
inline void store_vec<c10::BFloat16>(const Vec& v, c10::BFloat16* p) {
  at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, W);
}
template <>
inline void store_vec<c10::Half>(const Vec& v, c10::Half* p) {
  at::vec::convert_from_float<c10::Half>(v, v).store(p, W);
}

// ------------------------------------------------------------------------------------------------------
// exp of the state decay, the kernel's hot spot (E * L * N of them per direction).
// With AVX-512: exp(x) = 2^t, t = x * log2(e) (A is pre-scaled by log2(e), so t = delta * A' costs one
// multiply); t = n + f with n = round(t), |f| <= 1/2; 2^f by a degree-5 polynomial (minimax of the relative
// error on [-1/2, 1/2], fitted for this kernel; max relative error 2.4e-7 in float32 arithmetic, i.e. ~2 ulp);
// 2^n applied by vscalefps, which also yields inf / 0 / denormals at the ends. 10 instructions per vector,
// about half of at::vec's exp_u20. Elsewhere: exp_u20 on the unscaled argument.
// ------------------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
constexpr float kExpScale = 1.4426950408889634f;   // log2(e): A is multiplied by this once per block

// 2^(n + f) for an integer-valued n and |f| <= 1/2 (slightly more in exp_accurate): the polynomial and the
// vscalefps that both exps below share.
VIMBENCH_INLINE __m512 exp2_split(__m512 n, __m512 f) {
  __m512 p = _mm512_set1_ps(0.001327647129073739f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675541892647743f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550713092088699f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022120237350464f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469440460205f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

VIMBENCH_INLINE Vec exp_state(const Vec& t_in) {            // exp(x) for t_in = x * log2(e)
  // f = t - round(t) by vreduceps, which gives 0 for +-inf, so exp(+-inf) = scalef(1, +-inf) = inf / 0 and
  // NaN propagates, with no clamping
  const __m512 t = t_in;
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return exp2_split(n, f);
}
#else
constexpr float kExpScale = 1.f;
VIMBENCH_INLINE Vec exp_state(const Vec& x) { return x.exp_u20(); }
#endif

// ------------------------------------------------------------------------------------------------------
// Elementwise functions of the staging and epilogue passes (once per (e, t)), matching torch's float32
// softplus (threshold 20) and silu to a few ulp. Inline, so the passes make no function calls.
// ------------------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) to ~2 ulp for any x: like exp_state, but t = x * log2(e) is carried in two parts (t_hi + t_lo, the
// product's rounding error recovered with FMAs), so large |x| loses no accuracy.
VIMBENCH_INLINE Vec exp_accurate(const Vec& xv) {
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), xv));
  const __m512 L_hi = _mm512_set1_ps(1.44269502162933349609375f);      // float(log2(e))
  const __m512 L_lo = _mm512_set1_ps(1.925963033500011079e-8f);        // log2(e) - L_hi
  const __m512 t_hi = _mm512_mul_ps(x, L_hi);
  const __m512 t_lo = _mm512_fmadd_ps(x, L_lo, _mm512_fmsub_ps(x, L_hi, t_hi));
  const __m512 n = _mm512_roundscale_ps(t_hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_add_ps(_mm512_sub_ps(t_hi, n), t_lo);
  return exp2_split(n, f);
}

// a / b to ~1 ulp without vdivps: 14-bit reciprocal estimate refined by one Newton step.
VIMBENCH_INLINE __m512 fast_div(__m512 a, __m512 b) {
  const __m512 r0 = _mm512_rcp14_ps(b);
  const __m512 r = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(b, r0, _mm512_set1_ps(1.f)), r0);
  return _mm512_mul_ps(a, r);
}

// log1p(w) for w in [0, 1] as w * P(w), P the degree-9 polynomial fitted to log1p(w) / w on [0, 1] (least squares
// in the Chebyshev basis): max relative error 1.6e-7 in float32 arithmetic (~1.3 ulp), with 9 FMAs and a multiply.
VIMBENCH_INLINE Vec log1p_unit(const Vec& wv) {
  const __m512 w = wv;
  __m512 p = _mm512_set1_ps(-0.0032139763f);
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(0.019648882f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(-0.05643446f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(0.10533166f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(-0.1525141f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(0.19651476f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(-0.24947804f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(0.333291f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(-0.4999985f));
  p = _mm512_fmadd_ps(p, w, _mm512_set1_ps(1.f));
  return _mm512_mul_ps(p, w);
}

VIMBENCH_INLINE Vec softplus(const Vec& x) {    // x > 20 ? x : log1p(exp(x)) = max(x, 0) + log1p(exp(-|x|))
  const Vec sp = at::vec::maximum(x, Vec(0.f)) + log1p_unit(exp_accurate(x.abs().neg()));
  return Vec::blendv(sp, x, x > Vec(20.f));
}

VIMBENCH_INLINE Vec silu(const Vec& x) {        // x * sigmoid(x) = x / (1 + exp(-x)), as torch's kernel; exp(-x)
  return fast_div(x, Vec(1.f) + exp_accurate(at::vec::minimum(x.neg(), Vec(87.f))));   // finite for fast_div
}

VIMBENCH_INLINE Vec sigmoid(const Vec& x) {     // 1 / (1 + exp(-x)); exp(-x) kept finite (x >= -87) for fast_div
  return fast_div(Vec(1.f), Vec(1.f) + exp_accurate(at::vec::minimum(x.neg(), Vec(87.f))));
}
#else
VIMBENCH_INLINE Vec softplus(const Vec& x) {    // torch.nn.functional.softplus(x), beta 1, threshold 20
  return Vec::blendv(x.exp().log1p(), x, x > Vec(20.f));
}

VIMBENCH_INLINE Vec silu(const Vec& x) {        // x * sigmoid(x), as torch's silu kernel: x / (1 + exp(-x))
  return x / (Vec(1.f) + x.neg().exp());
}

VIMBENCH_INLINE Vec sigmoid(const Vec& x) {     // 1 / (1 + exp(-x))
  return Vec(1.f) / (Vec(1.f) + x.neg().exp());
}
#endif

}  // namespace vimbench_vec
