// Vectorised float32 math shared by vimbench's compiled CPU kernels (the selective scan, the causal conv and the
// add + RMSNorm): the dtypes they take and the dispatch over them, the vector type, loads/stores that convert
// bf16/fp16 to and from float32 (whole vectors, and the partial ones of a row's tail), and the inline exp,
// softplus, silu, sigmoid and silu's derivative the kernels apply per element. Compiled with
// -DCPU_CAPABILITY_<AVX512|AVX2|SVE256|DEFAULT> (see compiled_cpu.py), which sets the vector width W.
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

// The first n <= W elements at p as a float32 vector, lanes n.. zero (a row's last E mod W channels).
template <typename T>
inline Vec load_part(const T* p, int64_t n) {
  if (n == W) return load_vec<T>(p);
  float tmp[W] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}

// Stores the first n <= W lanes of v to p.
template <typename T>
inline void store_part(const Vec& v, T* p, int64_t n) {
  if (n == W) return store_vec<T>(v, p);
  float tmp[W];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
}

// ------------------------------------------------------------------------------------------------------
// exp2 and the exp built on it, written once on at::vec's portable operations (fmadd, round, bit
// reinterpretation, integer add and shift), so the same code serves AVX-512, AVX2, Arm NEON and the scalar
// DEFAULT build. exp(x) = 2^t, t = x * log2(e) (A is pre-scaled by log2(e), so the scan's t = delta * A' costs
// one multiply); t = n + f with n = round(t), |f| <= 1/2; 2^f by a degree-5 polynomial (minimax of the relative
// error on [-1/2, 1/2]; max relative error 2.4e-7 in float32 arithmetic, ~2 ulp); 2^n applied by adding n to
// the exponent field of 2^f's bits (an integer add, not a multiply). That add is exact while the result is a
// normal float, which |t| <= 125 guarantees; a vector with any lane beyond (overflow, underflow, denormals,
// +-inf, NaN) takes exp2_edges, which scales in two exact steps and a single rounding, as vscalefps does.
// On AVX-512 alone, vscalefps applies 2^n (whole range, no check) in exp2 and exp_accurate: measurably faster
// there (the forward scan at the 1248 shape was ~7% slower with the portable scaling in its staging). On AVX2
// alone, exp2_fast (the scan's state exp) reduces to |f| <= 1/16 with an 8-entry table (vpermd) and a cubic.
// ------------------------------------------------------------------------------------------------------

using IVec = at::vec::Vectorized<int32_t>;
static_assert(IVec::size() == W, "int32 and float32 vectors must have the same lane count");

// Bit reinterpretation float32 <-> int32 (free on x86; elsewhere at::vec's generic cast, a register move).
VIMBENCH_INLINE IVec float_bits(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(v);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(v);
#else
  return at::vec::cast<int32_t>(v);
#endif
}
VIMBENCH_INLINE Vec bits_float(const IVec& v) { return at::vec::cast<float>(v); }

constexpr float kExpScale = 1.4426950408889634f;   // log2(e): A is multiplied by this once per block
constexpr float kFastRange = 125.f;                // |t| <= this: 2^round(t) * 2^f is a normal float

// 2^f for |f| <= 1/2 (slightly more in exp_accurate).
VIMBENCH_INLINE Vec exp2_poly(const Vec& f) {
  Vec p = at::vec::fmadd(Vec(0.001327647129073739f), f, Vec(0.009675541892647743f));
  p = at::vec::fmadd(p, f, Vec(0.05550713092088699f));
  p = at::vec::fmadd(p, f, Vec(0.24022120237350464f));
  p = at::vec::fmadd(p, f, Vec(0.6931469440460205f));
  return at::vec::fmadd(p, f, Vec(1.0000001192092896f));
}

// Whether every lane of t has |t| <= kFastRange (false for NaN).
VIMBENCH_INLINE bool all_fast(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(t.abs(), Vec(kFastRange), _CMP_NLE_UQ) == 0;
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_movemask_ps(_mm256_cmp_ps(t.abs(), Vec(kFastRange), _CMP_NLE_UQ)) == 0;
#else
  return (t.abs() <= Vec(kFastRange)).zero_mask() == 0;
#endif
}

// v << 23 (the exponent field's position): an immediate shift on x86, at::vec's variable shift elsewhere.
VIMBENCH_INLINE IVec shl23(const IVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_slli_epi32(v, 23);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_slli_epi32(v, 23);
#else
  return v << IVec(23);
#endif
}

// p * 2^n for p = 2^f (|f| <= 1/2 + 1e-6) and integer-valued n in [-160, 160], scaled over the whole range:
// inf past the top, denormals and 0 below; NaN where t_nan is NaN. p * 2^n1 with n1 = clamp(n, -125, 127) is
// exact (a normal float), then one multiply by 2^(n - n1) rounds once. Out of line: rarely taken.
VIMBENCH_INLINE Vec exp2_edges(const Vec& p, const Vec& n, const Vec& t_nan) {
  const Vec n1 = at::vec::clamp(n, Vec(-125.f), Vec(127.f));
  const IVec k1 = at::vec::convert_to_int_of_same_size(n1);
  const IVec k2 = at::vec::convert_to_int_of_same_size(n - n1) + IVec(127);
  const Vec r = bits_float(float_bits(p) + shl23(k1)) * bits_float(shl23(k2));
  return Vec::blendv(r, t_nan, t_nan != t_nan);
}

// p * 2^n for the n held in r = n + 1.5 * 2^23 (r's low mantissa bits are n in two's complement, so r's bits
// shifted left by 23 are n in the exponent field): exact while the result is a normal float.
VIMBENCH_INLINE Vec scale_fast(const Vec& p, const Vec& r) {
  return bits_float(float_bits(p) + shl23(float_bits(r)));
}

constexpr float kRoundShift = 12582912.f;          // 1.5 * 2^23: (t + it) - it = round(t) for |t| < 2^22

// 2^t for |t| <= kFastRange (the caller checks, e.g. with all_fast on a bound of t), ~2 ulp.
#if defined(CPU_CAPABILITY_AVX2)
// AVX2: 2^t = 2^(m/8) * 2^f with m = round(8t), |f| <= 1/16. 2^(m/8) is 2^(k/8), k = m mod 8, from an 8-entry
// table (vpermd picks entry k by the low 3 bits of r's bits) with m div 8 added to its exponent field: the table
// holds bits(2^(k/8)) - (k << 20), so one integer add of r's bits shifted left by 20 (m << 20 = ((m div 8) << 23)
// + (k << 20)) gives the bits of 2^(m/8). 2^f = 1 + f * q(f), q quadratic (relative error 3e-8 on |f| <= 1/16),
// rounded once by the final FMA: ~1.2 ulp in all. 4 multiplies or FMAs, not exp2_poly's 5 and the reduction's
// FMA: on AMD Zen 4 (2 FMA pipes) the scan's exp runs 7.0 G/s against 5-6 G/s with exp2_poly, 1 thread.
constexpr float kRoundShift8 = 1572864.f;          // 1.5 * 2^20: (t + it) - it = round(8t) / 8 for |t| < 2^19
VIMBENCH_INLINE Vec exp2_fast(const Vec& t_in) {
  // t_in is usually a product (delta * A'): kept apart from the reduction's subtractions, which the compiler
  // would fuse with it into two FMAs, moving work from the add pipes to the FMA pipes that bound the scan
  __m256 t = t_in;
  __asm__("" : "+x"(t));
  const Vec r = Vec(t) + Vec(kRoundShift8);           // r's low 12 mantissa bits: m in two's complement
  const Vec f = Vec(t) - (r - Vec(kRoundShift8));
  const Vec q = at::vec::fmadd(at::vec::fmadd(Vec(0.05549622f), f, Vec(0.24025764f)), f, Vec(0.69314724f));
  const __m256i table = _mm256_setr_epi32(0x3f800000, 0x3f7b95c2, 0x3f7837f0, 0x3f75fed7, 0x3f7504f3,
                                          0x3f75672a, 0x3f7744fd, 0x3f7ac0c7);
  const __m256i rb = _mm256_castps_si256(r);
  const Vec p = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_permutevar8x32_epi32(table, rb),
                                                     _mm256_slli_epi32(rb, 20)));   // 2^(m/8)
  return at::vec::fmadd(p, q * f, p);
}
#else
VIMBENCH_INLINE Vec exp2_fast(const Vec& t) {
  const Vec r = t + Vec(kRoundShift);
  return scale_fast(exp2_poly(t - (r - Vec(kRoundShift))), r);
}
#endif

// 2^t for any float32 t, ~2 ulp (denormal results: within one unit of the smallest denormal).
VIMBENCH_INLINE Vec exp2(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  // vreduceps gives f = t - round(t) in one instruction and vscalefps scales by 2^n over the whole range
  // (inf / 0 / denormals, NaN propagated) without a range check: 8 instructions instead of 10 and a test,
  // 5-10% more exp per second on the exp floor's microbenchmark
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_poly(Vec(f)), n);
#else
  if (__builtin_expect(all_fast(t), 1)) return exp2_fast(t);
  const Vec tc = at::vec::clamp(t, Vec(-160.f), Vec(160.f));     // 2^t is 0 or inf beyond
  const Vec n = tc.round();
  const Vec edges = exp2_edges(exp2_poly(tc - n), n, t);
  // the lanes within range as exp2_fast computes them (AVX2's differs from exp2_poly's by an ulp or so), so that
  // a lane's result never depends on its neighbours (the forward's and backward's recomputed states agree)
  const Vec fast = exp2_fast(at::vec::clamp(t, Vec(-kFastRange), Vec(kFastRange)));
  return Vec::blendv(edges, fast, t.abs() <= Vec(kFastRange));
#endif
}

// The scan's state exp, exp(x) for t = x * log2(e): exp_state for any t; exp_state_fast for |t| <= kFastRange,
// which the scan's loops check once per step for all state entries (|delta_t| * max_n |A'_n| <= kFastRange),
// where kStateExpChecked (exp2 has no range check on AVX-512).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kStateExpChecked = false;
VIMBENCH_INLINE Vec exp_state_fast(const Vec& t) { return exp2(t); }
#else
constexpr bool kStateExpChecked = true;
VIMBENCH_INLINE Vec exp_state_fast(const Vec& t) { return exp2_fast(t); }
#endif
VIMBENCH_INLINE Vec exp_state(const Vec& t) { return exp2(t); }

// exp(x) to ~2 ulp for any x, with an accurate reduction: n = round(x * log2(e)), r = x - n * ln(2) with ln(2)
// in two parts (C1 has 9 significant bits, so n * C1 is exact; Cody and Waite), f = r * log2(e), |f| <= 1/2.
// Exact with or without fused multiply-adds (the DEFAULT build has none).
VIMBENCH_INLINE Vec exp_accurate(const Vec& x_in) {
  const Vec x = at::vec::clamp(x_in, Vec(-104.f), Vec(89.f));    // exp(x) is 0 or inf beyond
  const Vec r = at::vec::fmadd(x, Vec(kExpScale), Vec(kRoundShift));
  const Vec n = r - Vec(kRoundShift);
  const Vec red = at::vec::fmadd(n, Vec(2.12194440e-4f), at::vec::fmadd(n, Vec(-0.693359375f), x));
  const Vec p = exp2_poly(red * Vec(kExpScale));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);                 // whole range, NaN propagated, no check (as in exp2)
#else
  if (__builtin_expect(all_fast(n), 1)) return scale_fast(p, r);
  return exp2_edges(p, n, x_in);
#endif
}

// ------------------------------------------------------------------------------------------------------
// Elementwise functions of the staging and epilogue passes (once per (e, t)), matching torch's float32
// softplus (threshold 20) and silu to a few ulp. Inline, so the passes make no function calls.
// ------------------------------------------------------------------------------------------------------

// a / b to ~1 ulp. AVX-512: a 14-bit reciprocal estimate refined by one Newton step (vdivps is slow there).
VIMBENCH_INLINE Vec fast_div(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r0 = _mm512_rcp14_ps(b);
  const __m512 r = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(b, r0, _mm512_set1_ps(1.f)), r0);
  return _mm512_mul_ps(a, r);
#else
  return a / b;
#endif
}

// log1p(w) for w in [0, 1] as w * P(w), P the degree-9 polynomial fitted to log1p(w) / w on [0, 1] (least squares
// in the Chebyshev basis): max relative error 1.6e-7 in float32 arithmetic (~1.3 ulp), with 9 FMAs and a multiply.
VIMBENCH_INLINE Vec log1p_unit(const Vec& w) {
  Vec p = at::vec::fmadd(Vec(-0.0032139763f), w, Vec(0.019648882f));
  p = at::vec::fmadd(p, w, Vec(-0.05643446f));
  p = at::vec::fmadd(p, w, Vec(0.10533166f));
  p = at::vec::fmadd(p, w, Vec(-0.1525141f));
  p = at::vec::fmadd(p, w, Vec(0.19651476f));
  p = at::vec::fmadd(p, w, Vec(-0.24947804f));
  p = at::vec::fmadd(p, w, Vec(0.333291f));
  p = at::vec::fmadd(p, w, Vec(-0.4999985f));
  p = at::vec::fmadd(p, w, Vec(1.f));
  return p * w;
}

VIMBENCH_INLINE Vec softplus(const Vec& x) {    // x > 20 ? x : log1p(exp(x)) = max(x, 0) + log1p(exp(-|x|))
  const Vec sp = at::vec::maximum(x, Vec(0.f)) + log1p_unit(exp_accurate(x.abs().neg()));
  return Vec::blendv(sp, x, x > Vec(20.f));
}

VIMBENCH_INLINE Vec silu(const Vec& x) {        // x * sigmoid(x) = x / (1 + exp(-x)), as torch's kernel; exp(-x)
  return fast_div(x, Vec(1.f) + exp_accurate(at::vec::minimum(x.neg(), Vec(87.f))));   // finite, as in sigmoid
}

VIMBENCH_INLINE Vec sigmoid(const Vec& x) {     // 1 / (1 + exp(-x)); exp(-x) kept finite (x >= -87) for fast_div
  return fast_div(Vec(1.f), Vec(1.f) + exp_accurate(at::vec::minimum(x.neg(), Vec(87.f))));
}

// d silu(x) / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))), for the backwards of the conv's and the gate's SiLU.
VIMBENCH_INLINE Vec silu_grad(const Vec& x) {
  const Vec s = sigmoid(x);
  return s * (Vec(1.f) + x * (Vec(1.f) - s));
}

}  // namespace vimbench_vec
