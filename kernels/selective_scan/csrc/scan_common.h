// Shared by the compiled selective scan's forward (selective_scan_cpu.cpp) and backward
// (selective_scan_bwd_cpu.cpp): strided views of the (b, E, L) and (b, G, N, L) tensors, row loads and stores
// that convert any kernel dtype to and from float32, one direction's typed inputs, the (batch, block of W
// channels) tasks, argument checks and dtype handling. Shape legend as in selective_scan_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>

#include "vec_math.h"

namespace vimbench_scan {

using vimbench_vec::Vec;
using vimbench_vec::W;                     // channels per task (SIMD lanes of float32)
using namespace vimbench_vec;              // is_kernel_dtype, load_vec, store_vec, exp_state, softplus, silu
// ------------------------------------------------------------------------------------------------------
// Kernel shapes per capability: the one place they are chosen. A lane is one block of W channels (W float32
// SIMD lanes); its state entries are held in vector registers, max_nt at a time.
//   max_nt     state entries per chunk of the forward scan: 16 with 32 vector registers (AVX-512, NEON), 4
//              with 16 (AVX2: the state, its exps' temporaries and the polynomial's constants then fit in
//              registers; 8 is 1.2x slower in the scan's loop, 16 spills the state)
//   fwd_tile   time steps the forward stages per tile;  fwd_group  lanes staged together per tile: their
//              staged d, delta*u and y (3 x group x tile x W float32) are sized for a 512 KiB-2 MiB L2,
//              384 KiB on every capability (512 channels per group)
//   bwd_tile   the backward's checkpoint interval and recompute span, sized so that a tile's a, a*h, dB and
//              dC partial sums (4 x tile x chunk-or-N x W float32) stay near a 32-48 KiB L1
//   bwd_group  lanes per group of the backward (they share dB / dC partial sums per tile)
//   bwd_chunk  state entries the backward's reverse pass holds (g and dA: 2 x chunk vectors): 8 with 32
//              registers, 4 with 16 (AVX2: 8 spills; 4 took the 1-thread backward at the Vim-Ti 1248 shape from
//              ~2.9x to ~2.3x the forward on an AMD EPYC)
// AVX-512 is the tuned reference (Intel Xeon, 1248 shape); AVX2 halves W, so it stages twice the lanes per group
// (the same bytes and channels), in the forward and the backward; the backward's other columns keep AVX-512's
// values everywhere until they are measured elsewhere. DEFAULT is NEON on aarch64 (W 4, 32 registers) and
// at::vec's scalar emulation elsewhere (W 8).
// ------------------------------------------------------------------------------------------------------
struct KernelShape {
  int max_nt, fwd_tile, fwd_group, bwd_tile, bwd_group, bwd_chunk;
};
#if defined(CPU_CAPABILITY_AVX512)
constexpr KernelShape kShape{16, 64, 32, 16, 32, 8};
#elif defined(CPU_CAPABILITY_AVX2)
constexpr KernelShape kShape{4, 64, 64, 16, 64, 4};
#elif defined(__aarch64__)
constexpr KernelShape kShape{16, 64, 512 / W, 16, 32, 8};   // NEON (W 4) or SVE256 (W 8)
#else
constexpr KernelShape kShape{8, 64, 64, 16, 32, 8};
#endif
static_assert(3 * kShape.fwd_group * kShape.fwd_tile * W * 4 <= (384 << 10), "forward staging exceeds its L2 budget");
constexpr int kMaxNT = kShape.max_nt;

// The state dimension is processed in chunks of 4, 8 or 16 entries (max_nt at most), zero-padded: the width
// of the chunk that starts with ``rem`` entries left.
inline int chunk_width(int64_t rem, int max_nt) { return std::min(rem > 8 ? 16 : rem > 4 ? 8 : 4, max_nt); }

// ------------------------------------------------------------------------------------------------------
// Element access: raw pointer + strides (in elements) of a (b, E, L) or (b, G, N, L) tensor.
// ------------------------------------------------------------------------------------------------------

template <typename T>
struct View3 {               // (b, E, L) tensor such as u, delta, z, out
  T* data = nullptr;
  int64_t sb = 0, se = 0, sl = 0;
};

template <typename T>   // T = const S for inputs, S for outputs
inline View3<T> view3(const at::Tensor& t) {
  using S = std::remove_const_t<T>;
  T* p;
  if constexpr (std::is_const_v<T>) p = t.const_data_ptr<S>(); else p = t.mutable_data_ptr<S>();
  return {p, t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
struct ViewBC {              // B or C as (b, G, N, L); the ungrouped (b, N, L) form has G = 1, sg = 0
  const T* data = nullptr;
  int64_t sb = 0, sg = 0, sn = 0, sl = 0;
  int64_t G = 1;
};

template <typename T>
inline ViewBC<T> view_bc(const at::Tensor& t) {
  if (t.dim() == 3) return {t.data_ptr<T>(), t.stride(0), 0, t.stride(1), t.stride(2), 1};
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.size(1)};
}


// dst[s][i] = float(x[bi, e0 + i, t0 + s]) for s < nt, i < cnt; lanes i >= cnt are set to 0.
// Time-major inputs (stride along E == 1) take one vector load per step.
template <typename T>
inline void load_rows(const View3<const T>& x, int64_t bi, int64_t e0, int cnt, int64_t t0, int nt, float* dst) {
  const T* base = x.data + bi * x.sb + e0 * x.se + t0 * x.sl;
  if (x.se == 1 && cnt == W) {
    for (int s = 0; s < nt; ++s) load_vec<T>(base + s * x.sl).store(dst + s * W);
    return;
  }
  if (cnt < W) std::fill(dst, dst + nt * W, 0.f);
  for (int i = 0; i < cnt; ++i) {                    // channel-major: contiguous along t
    const T* p = base + i * x.se;
    for (int s = 0; s < nt; ++s) dst[s * W + i] = static_cast<float>(p[s * x.sl]);
  }
}

// x[bi, e0 + i, t0 + s] = T(src[s][i]) for s < nt, i < cnt.
template <typename T>
inline void store_rows(const View3<T>& x, int64_t bi, int64_t e0, int cnt, int64_t t0, int nt, const float* src) {
  T* base = x.data + bi * x.sb + e0 * x.se + t0 * x.sl;
  if (x.se == 1 && cnt == W) {
    for (int s = 0; s < nt; ++s) store_vec<T>(Vec::loadu(src + s * W), base + s * x.sl);
    return;
  }
  for (int i = 0; i < cnt; ++i) {
    T* p = base + i * x.se;
    for (int s = 0; s < nt; ++s) p[s * x.sl] = static_cast<T>(src[s * W + i]);
  }
}


// dst[s * ld + n] = float(M[bi, g, n, t0 + s]) for n < N; columns N .. ld-1 are left as they are (zero).
template <typename T>
inline void load_bc(const ViewBC<T>& M, int64_t bi, int64_t g, int64_t N, int64_t t0, int nt, int ld, float* dst) {
  const T* base = M.data + bi * M.sb + g * M.sg + t0 * M.sl;
  if (M.sn == 1) {                                    // time-major (x_proj output): contiguous along n
    for (int s = 0; s < nt; ++s) {
      const T* row = base + s * M.sl;
      float* d = dst + s * ld;
      int64_t n = 0;
      for (; n + W <= N; n += W) load_vec<T>(row + n).store(d + n);
      for (; n < N; ++n) d[n] = static_cast<float>(row[n]);
    }
  } else {
    for (int64_t n = 0; n < N; ++n)
      for (int s = 0; s < nt; ++s) dst[s * ld + n] = static_cast<float>(base[n * M.sn + s * M.sl]);
  }
}

// ------------------------------------------------------------------------------------------------------
// The states a forward keeps for its backward: the state entering every tile of kStateTile steps (the
// backward's tile), so that the backward recomputes a tile's states from there instead of scanning forward
// again. A (b, T, N, E) float32 tensor, T = ceil(L / kStateTile): states[bi, k, n, e] is h[e, n] before the
// steps [k * kStateTile, (k + 1) * kStateTile) in scan order (the reverse direction enters tile k from above).
// ------------------------------------------------------------------------------------------------------

constexpr int kStateTile = kShape.bwd_tile;  // 16 keeps a tile's recomputed a and a*h (and dB, dC partials) in L1

inline int64_t state_tiles(int64_t L) { return (L + kStateTile - 1) / kStateTile; }

struct States {
  float* data = nullptr;                   // null: the forward keeps none
  int64_t T = 0, N = 0, E = 0;
  float* at(int64_t bi, int64_t k, int64_t e0) const { return data + (bi * T + k) * N * E + e0; }
};

inline States states_of(const at::Tensor& s) {   // s: (b, T, N, E) float32 contiguous
  return {s.data_ptr<float>(), s.size(1), s.size(2), s.size(3)};
}

// Copies a lane's state h ((ld, W): h[n * W + i] for channel e0 + i) into states tile k.
inline void store_state(const States& st, int64_t bi, int64_t k, int64_t e0, int cnt, const float* h) {
  float* p = st.at(bi, k, e0);
  for (int64_t n = 0; n < st.N; ++n, p += st.E) {
    if (cnt == W) Vec::loadu(h + n * W).store(p); else std::copy(h + n * W, h + n * W + cnt, p);
  }
}

// Prefetches for writing the lines that store_state writes at tile k (if 0 <= k < T): the forward stores a
// lane's state every kStateTile steps into lines that are not in cache, and would wait for each to be read.
inline void prefetch_state(const States& st, int64_t bi, int64_t k, int64_t e0) {
  if (k < 0 || k >= st.T) return;
  const float* p = st.at(bi, k, e0);
  for (int64_t n = 0; n < st.N; ++n) __builtin_prefetch(p + n * st.E, 1, 2);
}

// The inverse: states tile k into h ((ld, W); lanes past cnt and rows past N are left as they are).
inline void load_state(const States& st, int64_t bi, int64_t k, int64_t e0, int cnt, float* h) {
  const float* p = st.at(bi, k, e0);
  for (int64_t n = 0; n < st.N; ++n, p += st.E) {
    if (cnt == W) Vec::loadu(p).store(h + n * W); else std::copy(p, p + cnt, h + n * W);
  }
}

// ------------------------------------------------------------------------------------------------------
// One direction's inputs, typed: T for u / delta (and z, out), TBC for B / C.
// ------------------------------------------------------------------------------------------------------

template <typename T, typename TBC>
struct Direction {
  View3<const T> u, delta;
  ViewBC<TBC> B, C;
  const float* A = nullptr;      // (E, N) float32 contiguous
  const float* D = nullptr;      // (E,) float32 or null
  const float* bias = nullptr;   // (E,) float32 or null
  bool reverse = false;
  int64_t Eg = 0;                // channels per group of B / C
};

// Tasks: (batch, block of <= W channels inside a segment of Sg channels that no group boundary crosses).
struct Blocks {
  int64_t Sg, per_seg, nseg;
  int64_t count(int64_t b) const { return b * nseg * per_seg; }
  void at(int64_t task, int64_t& bi, int64_t& e0, int& cnt) const {
    const int64_t k = task % per_seg, rest = task / per_seg;
    const int64_t seg = rest % nseg;
    bi = rest / nseg;
    e0 = seg * Sg + k * W;
    cnt = static_cast<int>(std::min<int64_t>(W, Sg - k * W));
  }
};

inline Blocks make_blocks(int64_t E, int64_t Sg) {
  return {Sg, (Sg + W - 1) / W, E / Sg};
}

// D[e0 + i] and delta_bias[e0 + i] of a block of cnt channels as vectors (0 where absent and past cnt).
template <typename T, typename TBC>
inline void channel_vectors(const Direction<T, TBC>& dir, int64_t e0, int cnt, Vec& Dv, Vec& biasv) {
  float Dl[W] = {0}, biasl[W] = {0};
  for (int i = 0; i < cnt; ++i) {
    if (dir.D) Dl[i] = dir.D[e0 + i];
    if (dir.bias) biasl[i] = dir.bias[e0 + i];
  }
  Dv = Vec::loadu(Dl);
  biasv = Vec::loadu(biasl);
}

// ------------------------------------------------------------------------------------------------------
// Argument checking and dtype handling
// ------------------------------------------------------------------------------------------------------

inline void check_bc(const at::Tensor& M, const char* name, int64_t b, int64_t E, int64_t N, int64_t L) {
  const bool ok = (M.dim() == 3 && M.size(0) == b && M.size(1) == N && M.size(2) == L) ||
                  (M.dim() == 4 && M.size(0) == b && M.size(1) > 0 && E % M.size(1) == 0 && M.size(2) == N &&
                   M.size(3) == L);
  TORCH_CHECK(ok, name, " must be (batch, N, L) or (batch, G, N, L) with G dividing E; got ", M.sizes(),
              " for b=", b, ", E=", E, ", N=", N, ", L=", L);
}

inline void check_direction(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(u.device().is_cpu(), "the compiled CPU scan needs CPU tensors, got ", u.device());
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must both be (batch, E, L); got ",
              u.sizes(), " and ", delta.sizes());
  const int64_t b = u.size(0), E = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == E, "A must be (E=", E, ", N); got ", A.sizes());
  const int64_t N = A.size(1);
  check_bc(B, "B", b, E, N, L);
  check_bc(C, "C", b, E, N, L);
  if (D) TORCH_CHECK(D->dim() == 1 && D->size(0) == E, "D must be (E=", E, ",); got ", D->sizes());
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E, "delta_bias must be (E=", E, ",); got ", bias->sizes());
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C})
    TORCH_CHECK(is_kernel_dtype(t->scalar_type()), "the compiled CPU scan takes float32, bfloat16 or float16 "
                "tensors (float64: use the 'ref' backend); got ", t->scalar_type());
}

inline void check_gate(const std::optional<at::Tensor>& z, const at::Tensor& u) {   // z: None or u's shape
  if (!z) return;
  TORCH_CHECK(z->sizes() == u.sizes(), "z must have u's shape ", u.sizes(), "; got ", z->sizes());
  TORCH_CHECK(is_kernel_dtype(z->scalar_type()), "z must be float32, bfloat16 or float16");
}

// The two directions of the bidirectional pair have the same shapes.
inline void check_same_shapes(const at::Tensor& u, const at::Tensor& A, const at::Tensor& u_b, const at::Tensor& A_b) {
  TORCH_CHECK(u_b.sizes() == u.sizes() && A_b.sizes() == A.sizes(), "both directions must have the same shapes; got u ",
              u.sizes(), " / u_b ", u_b.sizes(), ", A ", A.sizes(), " / A_b ", A_b.sizes());
}

// Whether a (b, E, L) tensor is laid out time-major: its stride along E below its stride along L.
inline bool is_time_major(const at::Tensor& t) { return t.size(1) > 1 && t.size(2) > 1 && t.stride(1) < t.stride(2); }

// The dtype the kernel reads a family of tensors in: their common dtype, or float32 if they differ.
inline at::ScalarType common_or_float(std::initializer_list<const at::Tensor*> ts) {
  at::ScalarType st = (*ts.begin())->scalar_type();
  for (const at::Tensor* t : ts)
    if (t && t->scalar_type() != st) return at::kFloat;
  return st;
}

inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType st) { return t.scalar_type() == st ? t : t.to(st); }

inline std::optional<at::Tensor> small_float(const std::optional<at::Tensor>& t) {  // D, delta_bias: (E,) float32
  if (!t) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

// Output (b, E, L) of dtype st: time-major memory ((b, L, E) contiguous, returned as its (b, E, L) transpose)
// or channel-major ((b, E, L) contiguous).
inline at::Tensor new_output(const at::Tensor& u, at::ScalarType st, bool time_major) {
  const int64_t b = u.size(0), E = u.size(1), L = u.size(2);
  auto opts = u.options().dtype(st);
  return time_major ? at::empty({b, L, E}, opts).transpose(1, 2) : at::empty({b, E, L}, opts);
}

template <typename F>
void dispatch_types(at::ScalarType st, at::ScalarType st_bc, F&& f) {
  // TBC is either T or float32 (mixed families are read as float32), so five combinations.
  dispatch_kernel_dtype(st, [&](auto t) {
    if (st_bc == st) f(t, t); else f(t, float{});
  });
}

template <typename T, typename TBC>
Direction<T, TBC> make_direction(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& bias, bool reverse) {
  Direction<T, TBC> d;
  d.u = view3<const T>(u);
  d.delta = view3<const T>(delta);
  d.B = view_bc<TBC>(B);
  d.C = view_bc<TBC>(C);
  d.A = A.const_data_ptr<float>();
  d.D = D ? D->const_data_ptr<float>() : nullptr;
  d.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  d.reverse = reverse;
  d.Eg = u.size(1) / d.B.G;
  return d;
}

}  // namespace vimbench_scan
