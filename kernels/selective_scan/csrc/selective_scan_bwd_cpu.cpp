// Backward of the compiled CPU selective scan (one direction and the Vim bidirectional pair): the gradients
// autograd gives through kernels/selective_scan/ref.py's selective_scan_ref (mamba_ssm's backward semantics).
//
// Forward (see selective_scan_cpu.cpp), with x = delta + delta_bias and d = softplus(x) (or x):
//   h_t = a_t * h_{t-1} + d_t u_t B_t,  a_t = exp(d_t A);   y_t = <C_t, h_t> + D u_t;   out = y * silu(z)
// Backward, for dout = dL/dout (all per channel e and state entry n; B_t, C_t those of e's group):
//   dy_t  = dout_t * silu(z_t);   dz_t = dout_t * y_t * silu'(z_t)          (dy = dout without z)
//   g_t   = C_t dy_t + a_{t+1} g_{t+1}                       g = dL/dh, run in reverse, g_L = dlast (or 0)
//   q_t   = g_t * a_t * h_{t-1}                              dL/d(d_t A)
//   dA   += q_t d_t          (summed over batch and time)
//   dd_t  = <q_t, A> + u_t <g_t, B_t>,   du_t = d_t <g_t, B_t> + D dy_t,   dD += dy_t u_t
//   dB_t += g_t d_t u_t,   dC_t += h_t dy_t                  (summed over the channels of a group)
//   dx_t  = dd_t * sigmoid(x_t) (x_t > 20: dd_t) with softplus;   ddelta_bias += dx_t;   ddelta = dx
//
// Design: no (b, E, L, N) tensor. As in the forward, one lane = (batch, block of W channels), channels across
// the SIMD lanes, the state entries in registers. Each thread takes a contiguous range of lanes and works on
// them in groups of up to kGroup lanes that share a batch and a group of B/C:
//   the forward kept the state entering every tile of kTile steps (``states``, see scan_common.h; it is called
//   with keep_states when autograd records it), so the backward goes tile by tile from the last (in scan
//   order) to the first, lane by lane: stage the lane's rows of the tile (prefetched while the lane two lanes
//   earlier computed, a few lines per step: a lane's rows are one line per step, which the hardware prefetcher
//   does not follow), recompute its states from the kept state into a per-thread buffer (storing a_t and a_t h_{t-1}
//   per step, so the reverse recurrence has no exp; y_t and dC are formed here, where h_t is in registers),
//   then run g backwards through the tile; dB and dC accumulate per (step, n) as vectors over the group's
//   lanes and are reduced across the SIMD lanes once per tile into the thread's own float32 partial sums;
//   the partial sums of the threads are added in a fixed order at the end (no atomics, deterministic for
//   a given thread count). du, ddelta and dz go out once per tile, row by row across the group's lanes, with
//   streaming stores. dA, dD, ddelta_bias: per (batch, channel) float32, summed over batch at the end.
//   The pair: per group of lanes, the backward direction (scanned t = L-1 .. 0 by reversed offsets) is
//   differentiated first, keeping its y_b + D_b u_b in a (lanes, L, W) float32 buffer; then the forward
//   direction, whose epilogue forms dz from y_f + y_b. Both directions get dy = dout * silu(z).
// Inputs as the forward takes them (float32 / bf16 / fp16, any strides; time-major is the fast path); math in
// float32. du, ddelta and dz have their input's dtype and memory layout (time-major in, time-major out); dA,
// dB, dC, dD and ddelta_bias have their input's dtype, dB and dC with stride 1 along N. The gradient of an
// absent optional input (D, z, delta_bias) is an empty (0,) float32 tensor, which the Python wrappers drop.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "scan_common.h"
#include "vec_math.h"

namespace vimbench_scan {
namespace {

constexpr int kTile = kStateTile;          // steps per tile: the forward's checkpoint interval and the recompute
                                           // span (kShape.bwd_tile in scan_common.h: 16 keeps a tile's a, a*h, dB
                                           // and dC partial sums near L1; 32 is 1.3-1.4x slower at the Vim-Ti 1248
                                           // shape on AVX-512)
constexpr int kGroup = kShape.bwd_group;   // lanes per group (their dB / dC partial sums are shared per tile)
constexpr int kChunk = kShape.bwd_chunk;   // state entries per chunk: the reverse pass holds g and dA of each in
                                           // registers (2 x 8 vectors), and a chunk's a, a*h stay small

inline float hsum(const Vec& v) {          // the W lanes' sum, in a fixed order (a shuffle tree)
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// ------------------------------------------------------------------------------------------------------
// The per-tile loops for one chunk of NT state entries (template parameter packs J..., so that the state or
// its gradient stays in NT registers). Buffers: d, du, dy, y, dd, ddu are (nt, W); Bt, Ct are (nt, ld) with
// the chunk's first column at offset 0; A, A2 (NT, W): A and A * kExpScale per lane (0 past N); a, ah:
// (nt, NT, W); dBp, dCp: (nt, ld, W) with the chunk's first column at offset 0; pf: (2 nt) addresses of a later
// lane's lines, prefetched two per step (see lines_of). ``reverse``: the direction scans t = L-1 .. 0, so its
// steps within a tile run s = nt-1 .. 0.
// ------------------------------------------------------------------------------------------------------

// From the state h0 entering the tile: a[s] = exp(d_s A), ah[s] = a[s] * h_{s-1}; y[s] += <C_s, h_s>,
// dCp[s] += h_s * dy_s.
template <int... J>
inline void recompute_impl(int nt, bool reverse, const float* d, const float* du, const float* dy, const float* Bt,
                           const float* Ct, int ld, const float* A2, const float* h0, float* a, float* ah, float* y,
                           float* dCp, const void* const* pf, std::integer_sequence<int, J...>) {
  constexpr int NT = sizeof...(J);
  Vec h[NT] = {Vec::loadu(h0 + J * W)...};
  for (int k = 0; k < nt; ++k) {
    __builtin_prefetch(pf[2 * k]);
    __builtin_prefetch(pf[2 * k + 1]);
    const int s = reverse ? nt - 1 - k : k;
    const Vec dv = Vec::loadu(d + s * W), duv = Vec::loadu(du + s * W), dyv = Vec::loadu(dy + s * W);
    const float* b = Bt + s * ld;
    const float* c = Ct + s * ld;
    float* as = a + s * NT * W;
    float* ahs = ah + s * NT * W;
    float* dc = dCp + s * ld * W;
    Vec acc[2] = {Vec(0.f), Vec(0.f)};
    auto one = [&](auto jc) {
      constexpr int j = decltype(jc)::value;
      const Vec av = exp_state(dv * Vec::loadu(A2 + j * W));
      const Vec ahv = av * h[j];
      av.store(as + j * W);
      ahv.store(ahs + j * W);
      h[j] = at::vec::fmadd(duv, Vec(b[j]), ahv);
      acc[j & 1] = at::vec::fmadd(h[j], Vec(c[j]), acc[j & 1]);
      at::vec::fmadd(h[j], dyv, Vec::loadu(dc + j * W)).store(dc + j * W);
    };
    (one(std::integral_constant<int, J>{}), ...);
    (Vec::loadu(y + s * W) + (acc[0] + acc[1])).store(y + s * W);
  }
}

// The reverse recurrence through the tile: g_io holds a_{t+1} g_{t+1} from the step after the tile (in scan
// order) and receives a_t g_t of its first step. dA_acc (NT, W) += q d; dd[s] += <q, A>; ddu[s] += <g, B>;
// dBp[s] += g * du.
template <int... J>
inline void reverse_impl(int nt, bool reverse, const float* d, const float* du, const float* dy, const float* Bt,
                         const float* Ct, int ld, const float* A, const float* a, const float* ah, float* g_io,
                         float* dA_io, float* dd, float* ddu, float* dBp, const void* const* pf,
                         std::integer_sequence<int, J...>) {
  constexpr int NT = sizeof...(J);
  Vec g[NT] = {Vec::loadu(g_io + J * W)...};
  Vec dA_acc[NT] = {Vec::loadu(dA_io + J * W)...};
  for (int k = 0; k < nt; ++k) {
    __builtin_prefetch(pf[2 * k]);
    __builtin_prefetch(pf[2 * k + 1]);
    const int s = reverse ? k : nt - 1 - k;
    const Vec dv = Vec::loadu(d + s * W), duv = Vec::loadu(du + s * W), dyv = Vec::loadu(dy + s * W);
    const float* b = Bt + s * ld;
    const float* c = Ct + s * ld;
    const float* as = a + s * NT * W;
    const float* ahs = ah + s * NT * W;
    float* db = dBp + s * ld * W;
    Vec dd_acc[2] = {Vec(0.f), Vec(0.f)}, ddu_acc[2] = {Vec(0.f), Vec(0.f)};
    auto one = [&](auto jc) {
      constexpr int j = decltype(jc)::value;
      const Vec gt = at::vec::fmadd(Vec(c[j]), dyv, g[j]);
      const Vec q = gt * Vec::loadu(ahs + j * W);
      dA_acc[j] = at::vec::fmadd(q, dv, dA_acc[j]);
      dd_acc[j & 1] = at::vec::fmadd(q, Vec::loadu(A + j * W), dd_acc[j & 1]);
      ddu_acc[j & 1] = at::vec::fmadd(gt, Vec(b[j]), ddu_acc[j & 1]);
      at::vec::fmadd(gt, duv, Vec::loadu(db + j * W)).store(db + j * W);
      g[j] = gt * Vec::loadu(as + j * W);
    };
    (one(std::integral_constant<int, J>{}), ...);
    (Vec::loadu(dd + s * W) + (dd_acc[0] + dd_acc[1])).store(dd + s * W);
    (Vec::loadu(ddu + s * W) + (ddu_acc[0] + ddu_acc[1])).store(ddu + s * W);
  }
  ((g[J].store(g_io + J * W)), ...);
  ((dA_acc[J].store(dA_io + J * W)), ...);
}

template <int NT>
struct TileFns {
  static void recompute(int nt, bool rev, const float* d, const float* du, const float* dy, const float* Bt,
                        const float* Ct, int ld, const float* A2, const float* h0, float* a, float* ah, float* y,
                        float* dCp, const void* const* pf) {
    recompute_impl(nt, rev, d, du, dy, Bt, Ct, ld, A2, h0, a, ah, y, dCp, pf, std::make_integer_sequence<int, NT>{});
  }
  static void reverse(int nt, bool rev, const float* d, const float* du, const float* dy, const float* Bt,
                      const float* Ct, int ld, const float* A, const float* a, const float* ah, float* g,
                      float* dA_acc, float* dd, float* ddu, float* dBp, const void* const* pf) {
    reverse_impl(nt, rev, d, du, dy, Bt, Ct, ld, A, a, ah, g, dA_acc, dd, ddu, dBp, pf,
                 std::make_integer_sequence<int, NT>{});
  }
};

struct Chunk {                              // NT state entries from n0, and their loops
  int n0, nt;
  decltype(&TileFns<4>::recompute) recompute;
  decltype(&TileFns<4>::reverse) reverse;
};

template <int NT>
Chunk chunk_of(int n0) { return {n0, NT, &TileFns<NT>::recompute, &TileFns<NT>::reverse}; }

std::vector<Chunk> make_chunks(int64_t N) {
  std::vector<Chunk> chunks;
  for (int64_t n0 = 0; n0 < N;) {
    const int nt = chunk_width(N - n0, kChunk);
    chunks.push_back(nt == 4 ? chunk_of<4>(n0) : chunk_of<8>(n0));
    n0 += nt;
  }
  return chunks;
}

// ------------------------------------------------------------------------------------------------------
// Lanes and scratch
// ------------------------------------------------------------------------------------------------------

// One block of <= W channels [e0, e0 + cnt) of batch bi for one direction: its parameters and the gradients
// it accumulates.
struct Lane {
  int64_t bi = 0, e0 = 0, g = 0;
  int cnt = 0;
  std::vector<float> A, A2;    // (ld, W): A[e0 + i, n] and A * kExpScale (0 past N or cnt)
  std::vector<float> dh;       // (ld, W): the carried a_{t+1} g_{t+1}
  std::vector<float> dA;       // (ld, W)
  Vec Dv, biasv, dD, dbias;

  template <typename T, typename TBC>
  Lane(const Direction<T, TBC>& dir, int64_t N, int ld, int64_t bi_, int64_t e0_, int cnt_)
      : bi(bi_), e0(e0_), g(e0_ / dir.Eg), cnt(cnt_), A(ld * W, 0.f), A2(ld * W, 0.f), dh(ld * W, 0.f),
        dA(ld * W, 0.f), dD(0.f), dbias(0.f) {
    for (int i = 0; i < cnt; ++i)
      for (int64_t n = 0; n < N; ++n) {
        A[n * W + i] = dir.A[(e0 + i) * N + n];
        A2[n * W + i] = A[n * W + i] * kExpScale;
      }
    channel_vectors(dir, e0, cnt, Dv, biasv);
  }
};

// Per-thread buffers: one lane's rows of the tile read (delta, u, dout, z; (kTile, W) each, in L1) and the group's
// rows written (du, ddelta, dz; (kGroup, kTile, W) each), the lane's staged values, B and C of the tile
// ((kTile, ld)), the state entering the tile (h0: (ld, W)), the recomputed a and a*h of one chunk
// ((kTile, kChunk, W) each), the dB / dC partial sums of the group ((kTile, ld, W) each), and the lines the chunk
// loops prefetch, two per step: their loop_slots first, then any left over, which go out at once (pf: at least the
// N + 4 * kTile lines of a lane, see lines_of).
struct Scratch {
  std::vector<float> r_delta, r_u, r_dout, r_z, g_du, g_ddelta, g_dz;
  std::vector<float> sz, dsp, d, du, dy, y, dd, ddu, Bt, Ct, h0, a, ah, dBp, dCp;
  size_t loop_slots;           // 2 per step of the recompute and the reverse loop of every chunk
  std::vector<const void*> pf;
  Scratch(int ld, int64_t N, size_t chunks)
      : r_delta(kTile * W), r_u(kTile * W), r_dout(kTile * W), r_z(kTile * W), g_du(kGroup * kTile * W),
        g_ddelta(kGroup * kTile * W), g_dz(kGroup * kTile * W), sz(kTile * W), dsp(kTile * W), d(kTile * W),
        du(kTile * W), dy(kTile * W), y(kTile * W), dd(kTile * W), ddu(kTile * W), Bt(kTile * ld, 0.f),
        Ct(kTile * ld, 0.f), h0(ld * W, 0.f), a(kTile * kChunk * W), ah(kTile * kChunk * W), dBp(kTile * ld * W, 0.f),
        dCp(kTile * ld * W, 0.f), loop_slots(4 * chunks * kTile), pf(std::max<size_t>(loop_slots, N + 4 * kTile)) {}
};

// Asks Linux to back the 2 MiB-aligned interior of a fresh tensor's memory with transparent huge pages
// (madvise(MADV_HUGEPAGE), as torch does for every large allocation under THP_MEM_ALLOC_ENABLE=1; a hint: no
// effect where THP is off, nothing done off Linux). du, ddelta and dz are (b, E, L) each (9.3 MB in float32 at
// the Vim-Ti 1248 shape), and when the allocator hands back fresh memory this kernel first-touches it: with
// 4 KiB pages ~6,800 page faults per call, which varied the 1-thread backward there from call to call and cost
// it ~20% on average (median CPU time 48 -> 38 ms, AVX-512, AMD EPYC, THP in madvise mode, shared machine).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.storage().data()), end = p + t.storage().nbytes();
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

// Where a direction's gradients go. du, ddelta, dz: (b, E, L) views in T; dA: (b, E, N), dD, dbias: (b, E)
// float32 per batch; dB, dC: (b, G, L, N) float32 partial sums of this thread.
template <typename T>
struct Grads {
  View3<T> du, ddelta;
  float *dA = nullptr, *dD = nullptr, *dbias = nullptr, *dB = nullptr, *dC = nullptr;
};

// The tile at position ``pos`` in scan order (the reverse direction starts with the last tile).
inline int64_t tile_at(int64_t pos, int64_t ntiles, bool reverse) { return reverse ? ntiles - 1 - pos : pos; }

// v into W consecutive elements at p; float32 at a vector-aligned p with a streaming store, which writes the
// whole line without reading it first and keeps it out of the caches (AVX-512 and AVX2).
template <typename T>
inline void store_streaming(const Vec& v, T* p) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & (sizeof(Vec) - 1)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_ps(p, v);
#else
      _mm256_stream_ps(p, v);
#endif
      return;
    }
  }
#endif
  store_vec<T>(v, p);
}

// Lane j's (nt, W) rows at src + j * kTile * W into x. Time-major x with full lanes goes row by row across the
// lanes with streaming stores: du, ddelta and dz are written once and read by the next op, and through the caches
// their lines were read from memory before being overwritten (the backward at the Vim-Ti 1248 shape wrote 28 MB
// and read 28 MB more for it). The caller fences (streaming stores are weakly ordered).
template <typename T>
void store_group_rows(const View3<T>& x, const Lane* lanes, int n, int64_t t0, int nt, const float* src) {
  if (x.se == 1 && std::all_of(lanes, lanes + n, [](const Lane& l) { return l.cnt == W; })) {
    for (int s = 0; s < nt; ++s)
      for (int j = 0; j < n; ++j)
        store_streaming<T>(Vec::loadu(src + (j * kTile + s) * W),
                           x.data + lanes[j].bi * x.sb + lanes[j].e0 + (t0 + s) * x.sl);
    return;
  }
  for (int j = 0; j < n; ++j) store_rows<T>(x, lanes[j].bi, lanes[j].e0, lanes[j].cnt, t0, nt, src + j * kTile * W);
}

// The lines lane ``l`` reads in the tile at t0 (nt steps): its N rows of the kept state and its nt rows of each
// time-major x of ``xs`` (other layouts are gathered element by element and not prefetched), written to pf[0..),
// every other slot of pf pointing at ``idle`` (memory in L1). The chunk loops prefetch two slots per step while
// they compute an earlier lane: its rows are lines one row of x apart, no stream the hardware prefetcher follows
// (and a forward direction's backward walks time backwards); issued all at once, the ~80 prefetches of a lane
// left most of its loads waiting on memory (AVX-512, AMD EPYC).
template <typename T>
void lines_of(const Lane& l, int64_t tile, int64_t t0, int nt, const States& states, int64_t N, int64_t E,
              std::initializer_list<const View3<const T>*> xs, const void* idle, std::vector<const void*>& pf) {
  std::fill(pf.begin(), pf.end(), idle);
  size_t k = 0;
  for (int64_t m = 0; m < N; ++m) pf[k++] = states.at(l.bi, tile, l.e0) + m * E;
  for (const View3<const T>* x : xs)
    if (x != nullptr && x->se == 1)
      for (int s = 0; s < nt; ++s) pf[k++] = x->data + l.bi * x->sb + l.e0 + (t0 + s) * x->sl;
}

// softplus(x) (as vec_math.h's softplus) and its derivative sigmoid(x) from one exp: with e = exp(-|x|),
// softplus = max(x, 0) + log1p(e) and sigmoid = (x < 0 ? e : 1) / (1 + e); past the threshold (x > 20) x and 1.
inline void softplus_with_grad(const Vec& x, Vec& sp, Vec& grad) {
  const Vec e = exp_accurate(x.abs().neg()), big = x > Vec(20.f);
  sp = Vec::blendv(at::vec::maximum(x, Vec(0.f)) + log1p_unit(e), x, big);
  grad = Vec::blendv(fast_div(Vec::blendv(Vec(1.f), e, x < Vec(0.f)), Vec(1.f) + e), Vec(1.f), big);
}

// Stages delta (+ bias, softplus) and delta * u of the tile's steps for one lane, from its rows of delta and
// u, into sc.d, sc.du, and with softplus its derivative sigmoid(delta + bias) (1 past 20) into sc.dsp.
template <typename T, typename TBC>
void stage_delta(const Direction<T, TBC>& dir, const Lane& lane, bool softplus_on, int nt, const float* raw,
                 const float* u, Scratch& sc) {
  for (int s = 0; s < nt; ++s) {
    Vec xv = Vec::loadu(raw + s * W);
    if (dir.bias) xv = xv + lane.biasv;
    Vec dv = xv;
    if (softplus_on) {
      Vec grad;
      softplus_with_grad(xv, dv, grad);
      grad.store(sc.dsp.data() + s * W);
    }
    dv.store(sc.d.data() + s * W);
    (dv * Vec::loadu(u + s * W)).store(sc.du.data() + s * W);
  }
}

// The backward of one direction for a group of n lanes sharing a batch and a group of B/C.
//   dout, z:  the op's output gradient and gate (z null: no gate)
//   acc_out:  null, or (n, L, W) float32 receiving y + D u (the pair's first direction; no dz then)
//   acc_in:   null, or (n, L, W) float32 holding the other direction's y + D u, added before dz is formed
//   dz:       null, or where dz goes (with z and without acc_out)
//   states:   the states the forward kept (scan_common.h)
template <typename T, typename TBC>
void backward_group(const Direction<T, TBC>& dir, const std::vector<Chunk>& chunks, int ld, int64_t N, int64_t L,
                    int64_t E, Lane* lanes, int n, bool softplus_on, const States& states, const View3<const T>& dout,
                    const View3<const T>* z, float* acc_out, const float* acc_in, const View3<T>* dz,
                    const Grads<T>& gr, Scratch& sc) {
  const int64_t ntiles = (L + kTile - 1) / kTile;
  const int64_t bi = lanes[0].bi, g = lanes[0].g, G = dir.B.G;

  // tile by tile, from the last in scan order to the first
  for (int64_t pos = ntiles - 1; pos >= 0; --pos) {
    const int64_t tile = tile_at(pos, ntiles, dir.reverse);
    const int64_t t0 = tile * kTile;
    const int nt = static_cast<int>(std::min<int64_t>(kTile, L - t0));
    load_bc<TBC>(dir.B, bi, g, N, t0, nt, ld, sc.Bt.data());
    load_bc<TBC>(dir.C, bi, g, N, t0, nt, ld, sc.Ct.data());
    // the lines of the lane two lanes ahead in the walk (near the group's end, of the next tile's first lanes)
    const int64_t tile_next = pos > 0 ? tile_at(pos - 1, ntiles, dir.reverse) : -1;
    auto prefetch_later = [&](int ahead) {
      const auto xs = {&dir.delta, &dir.u, &dout, z};
      if (ahead < n) return lines_of<T>(lanes[ahead], tile, t0, nt, states, N, E, xs, sc.d.data(), sc.pf);
      if (ahead - n < n && tile_next >= 0) {
        const int64_t t0n = tile_next * kTile;
        const int ntn = static_cast<int>(std::min<int64_t>(kTile, L - t0n));
        return lines_of<T>(lanes[ahead - n], tile_next, t0n, ntn, states, N, E, xs, sc.d.data(), sc.pf);
      }
      std::fill(sc.pf.begin(), sc.pf.end(), sc.d.data());
    };
    for (int j = 0; j < n; ++j) {
      Lane& lane = lanes[j];
      prefetch_later(j + 2);
      for (size_t r = sc.loop_slots; r < sc.pf.size(); ++r) __builtin_prefetch(sc.pf[r]);
      load_rows<T>(dir.delta, lane.bi, lane.e0, lane.cnt, t0, nt, sc.r_delta.data());
      load_rows<T>(dir.u, lane.bi, lane.e0, lane.cnt, t0, nt, sc.r_u.data());
      load_rows<T>(dout, lane.bi, lane.e0, lane.cnt, t0, nt, sc.r_dout.data());
      if (z) load_rows<T>(*z, lane.bi, lane.e0, lane.cnt, t0, nt, sc.r_z.data());
      const float* u = sc.r_u.data();
      const float* dout_j = sc.r_dout.data();
      const float* z_j = sc.r_z.data();
      float* du_out = sc.g_du.data() + j * kTile * W;
      float* ddelta_out = sc.g_ddelta.data() + j * kTile * W;
      float* dz_out = sc.g_dz.data() + j * kTile * W;
      load_state(states, lane.bi, tile, lane.e0, lane.cnt, sc.h0.data());
      stage_delta(dir, lane, softplus_on, nt, sc.r_delta.data(), u, sc);
      for (int s = 0; s < nt; ++s) {                    // dy = dout * silu(z), keeping sigmoid(z) for dz
        const Vec dov = Vec::loadu(dout_j + s * W);
        if (!z) {
          dov.store(sc.dy.data() + s * W);
          continue;
        }
        const Vec zv = Vec::loadu(z_j + s * W), sg = sigmoid(zv);
        sg.store(sc.sz.data() + s * W);
        (dov * zv * sg).store(sc.dy.data() + s * W);
      }
      std::fill(sc.y.begin(), sc.y.begin() + nt * W, 0.f);
      std::fill(sc.dd.begin(), sc.dd.begin() + nt * W, 0.f);
      std::fill(sc.ddu.begin(), sc.ddu.begin() + nt * W, 0.f);
      const void* const* pf = sc.pf.data();
      for (const Chunk& ch : chunks) {
        ch.recompute(nt, dir.reverse, sc.d.data(), sc.du.data(), sc.dy.data(), sc.Bt.data() + ch.n0,
                     sc.Ct.data() + ch.n0, ld, lane.A2.data() + ch.n0 * W, sc.h0.data() + ch.n0 * W,
                     sc.a.data(), sc.ah.data(), sc.y.data(), sc.dCp.data() + ch.n0 * W, pf);
        pf += 2 * kTile;
        ch.reverse(nt, dir.reverse, sc.d.data(), sc.du.data(), sc.dy.data(), sc.Bt.data() + ch.n0,
                   sc.Ct.data() + ch.n0, ld, lane.A.data() + ch.n0 * W, sc.a.data(), sc.ah.data(),
                   lane.dh.data() + ch.n0 * W, lane.dA.data() + ch.n0 * W, sc.dd.data(), sc.ddu.data(),
                   sc.dBp.data() + ch.n0 * W, pf);
        pf += 2 * kTile;
      }
      // epilogue: y, dz, du, ddelta (into the group's rows written at the tile's end), dD, ddelta_bias
      for (int s = 0; s < nt; ++s) {
        const Vec uv = Vec::loadu(u + s * W), dyv = Vec::loadu(sc.dy.data() + s * W);
        const Vec dv = Vec::loadu(sc.d.data() + s * W), dduv = Vec::loadu(sc.ddu.data() + s * W);
        Vec yv = Vec::loadu(sc.y.data() + s * W);
        if (dir.D) yv = at::vec::fmadd(lane.Dv, uv, yv);
        if (acc_out) yv.store(acc_out + (j * L + t0 + s) * W);
        if (dz) {
          if (acc_in) yv = yv + Vec::loadu(acc_in + (j * L + t0 + s) * W);
          const Vec zv = Vec::loadu(z_j + s * W), sg = Vec::loadu(sc.sz.data() + s * W);
          const Vec dsilu = sg * at::vec::fmadd(zv, Vec(1.f) - sg, Vec(1.f));
          (Vec::loadu(dout_j + s * W) * yv * dsilu).store(dz_out + s * W);
        }
        Vec du_grad = dv * dduv;
        if (dir.D) {
          du_grad = at::vec::fmadd(lane.Dv, dyv, du_grad);
          lane.dD = at::vec::fmadd(dyv, uv, lane.dD);
        }
        Vec ddv = at::vec::fmadd(dduv, uv, Vec::loadu(sc.dd.data() + s * W));
        if (softplus_on) ddv = ddv * Vec::loadu(sc.dsp.data() + s * W);
        lane.dbias = lane.dbias + ddv;
        du_grad.store(du_out + s * W);
        ddv.store(ddelta_out + s * W);
      }
    }
    store_group_rows<T>(gr.du, lanes, n, t0, nt, sc.g_du.data());
    store_group_rows<T>(gr.ddelta, lanes, n, t0, nt, sc.g_ddelta.data());
    if (dz) store_group_rows<T>(*dz, lanes, n, t0, nt, sc.g_dz.data());
    // the group's dB, dC of this tile: reduced across the SIMD lanes into the thread's partial sums
    float* dB = gr.dB + ((bi * G + g) * L + t0) * N;
    float* dC = gr.dC + ((bi * G + g) * L + t0) * N;
    for (int s = 0; s < nt; ++s)
      for (int64_t m = 0; m < N; ++m) {
        dB[s * N + m] += hsum(Vec::loadu(sc.dBp.data() + (s * ld + m) * W));
        dC[s * N + m] += hsum(Vec::loadu(sc.dCp.data() + (s * ld + m) * W));
      }
    std::fill(sc.dBp.begin(), sc.dBp.begin() + nt * ld * W, 0.f);
    std::fill(sc.dCp.begin(), sc.dCp.begin() + nt * ld * W, 0.f);
  }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();        // store_group_rows' streaming stores are globally visible before the op returns
#endif
  // per-lane sums
  for (int j = 0; j < n; ++j) {
    const Lane& lane = lanes[j];
    float dDl[W], dbl[W];
    lane.dD.store(dDl);
    lane.dbias.store(dbl);
    for (int i = 0; i < lane.cnt; ++i) {
      const int64_t e = lane.e0 + i;
      for (int64_t m = 0; m < N; ++m) gr.dA[(bi * E + e) * N + m] = lane.dA[m * W + i];
      gr.dD[bi * E + e] = dDl[i];
      gr.dbias[bi * E + e] = dbl[i];
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------------

// One direction's inputs converted to what the kernel reads (dtype st for u / delta, st_bc for B / C, A, D
// and delta_bias float32 contiguous), and its gradients' buffers.
struct DirData {
  at::Tensor u, delta, A, B, C;
  std::optional<at::Tensor> D, bias;
  at::Tensor du, ddelta, dA, dB, dC, dD, dbias;     // dA (b, E, N), dD / dbias (b, E), dB / dC (parts, b, G, L, N)

  DirData(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
          const at::Tensor& C_in, const std::optional<at::Tensor>& D_in, const std::optional<at::Tensor>& bias_in,
          at::ScalarType st, at::ScalarType st_bc, int64_t parts)
      : u(as_dtype(u_in, st)), delta(as_dtype(delta_in, st)), A(A_in.to(at::kFloat).contiguous()),
        B(as_dtype(B_in, st_bc)), C(as_dtype(C_in, st_bc)), D(small_float(D_in)), bias(small_float(bias_in)) {
    TORCH_CHECK(B.dim() == C.dim() && (B.dim() == 3 || B.size(1) == C.size(1)), "B and C must have the same groups");
    const int64_t b = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1), G = B.dim() == 4 ? B.size(1) : 1;
    du = new_output(u, st, is_time_major(u));
    ddelta = new_output(u, st, is_time_major(delta));
    advise_huge_pages(du);
    advise_huge_pages(ddelta);
    auto f32 = u.options().dtype(at::kFloat);
    dA = at::zeros({b, E, N}, f32);
    dD = at::zeros({b, E}, f32);
    dbias = at::zeros({b, E}, f32);
    dB = at::zeros({parts, b, G, L, N}, f32);
    dC = at::zeros({parts, b, G, L, N}, f32);
  }

  int64_t Eg() const { return u.size(1) / (B.dim() == 4 ? B.size(1) : 1); }

  template <typename T>
  Grads<T> grads(int64_t part) {
    const int64_t per_part = dB.numel() / dB.size(0);
    return {view3<T>(du), view3<T>(ddelta), dA.data_ptr<float>(), dD.data_ptr<float>(), dbias.data_ptr<float>(),
            dB.data_ptr<float>() + part * per_part, dC.data_ptr<float>() + part * per_part};
  }

  // The gradients in the inputs' dtypes: du, ddelta, dA, dB, dC, dD, ddelta_bias (absent inputs: empty).
  std::vector<at::Tensor> finish(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
                                 const at::Tensor& B_in, const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
                                 const std::optional<at::Tensor>& bias_in) const {
    auto bc = [&](const at::Tensor& parts, const at::Tensor& like) {   // (b, G, L, N) -> like's shape, stride 1 on N
      at::Tensor s = parts.sum(0).transpose(2, 3);
      if (like.dim() == 3) s = s.select(1, 0);
      return s.to(like.scalar_type());
    };
    auto opt = [&](const at::Tensor& v, const std::optional<at::Tensor>& like) {
      return like ? v.sum(0).to(like->scalar_type()) : at::empty({0}, v.options());
    };
    return {du.to(u_in.scalar_type()), ddelta.to(delta_in.scalar_type()), dA.sum(0).to(A_in.scalar_type()),
            bc(dB, B_in), bc(dC, C_in), opt(dD, D_in), opt(dbias, bias_in)};
  }
};

template <typename T, typename TBC>
std::vector<Lane> make_lanes(const Direction<T, TBC>& dir, const Blocks& blocks, int64_t N, int ld, int64_t begin,
                             int64_t end) {
  std::vector<Lane> lanes;
  lanes.reserve(end - begin);
  for (int64_t task = begin; task < end; ++task) {
    int64_t bi, e0;
    int cnt;
    blocks.at(task, bi, e0, cnt);
    lanes.emplace_back(dir, N, ld, bi, e0, cnt);
  }
  return lanes;
}

// Calls f(part, begin, end) for ``parts`` contiguous ranges of tasks [0, count), in parallel.
template <typename F>
void for_parts(int64_t count, int64_t parts, F&& f) {
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(p, p * count / parts, (p + 1) * count / parts);
  });
}

// Calls f(first, last) for the tasks [begin, end) in groups of up to kGroup consecutive tasks with equal
// key(task) (their batch and groups of B/C, so that a group shares B_t and C_t).
template <typename Key, typename F>
void for_groups(int64_t begin, int64_t end, Key&& key, F&& f) {
  for (int64_t first = begin; first < end;) {
    int64_t last = first + 1;
    while (last < end && last - first < kGroup && key(last) == key(first)) ++last;
    f(first, last);
    first = last;
  }
}

// A task's batch and its groups of B/C in two directions (of Eg1 and Eg2 channels per group).
std::tuple<int64_t, int64_t, int64_t> group_key(const Blocks& blocks, int64_t task, int64_t Eg1, int64_t Eg2) {
  int64_t bi, e0;
  int cnt;
  blocks.at(task, bi, e0, cnt);
  return {bi, e0 / Eg1, e0 / Eg2};
}

// dz in dtype st and z's layout, or an empty (0,) float32 tensor without z.
at::Tensor new_gate_grad(const std::optional<at::Tensor>& z, const at::Tensor& u, at::ScalarType st) {
  if (!z) return at::empty({0}, u.options().dtype(at::kFloat));
  at::Tensor dz = new_output(*z, st, is_time_major(*z));
  advise_huge_pages(dz);
  return dz;
}

void check_dout(const at::Tensor& dout, const at::Tensor& u) {
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must have u's shape ", u.sizes(), "; got ", dout.sizes());
  TORCH_CHECK(is_kernel_dtype(dout.scalar_type()), "dout must be float32, bfloat16 or float16");
}

// The states the forward kept for u and A ((b, T, N, E) float32 contiguous; see scan_common.h).
States check_states(const at::Tensor& states, const at::Tensor& u, const at::Tensor& A) {
  const int64_t b = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  TORCH_CHECK(states.sizes() == at::IntArrayRef({b, state_tiles(L), N, E}) && states.scalar_type() == at::kFloat &&
              states.is_contiguous(), "states must be the forward's kept states, (b, ceil(L / ", kStateTile,
              "), N, E) float32 contiguous (a forward with keep_states); got ", states.sizes());
  return states_of(states);
}

std::vector<at::Tensor> selective_scan_bwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D_in, const std::optional<at::Tensor>& z_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& dout_in, const std::optional<at::Tensor>& dlast_in,
    const at::Tensor& states_in, bool delta_softplus) {
  check_direction(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  check_dout(dout_in, u_in);
  const States states = check_states(states_in, u_in, A_in);
  check_gate(z_in, u_in);
  const int64_t b = u_in.size(0), E = u_in.size(1), L = u_in.size(2), N = A_in.size(1);
  if (dlast_in)
    TORCH_CHECK(dlast_in->sizes() == at::IntArrayRef({b, E, N}), "dlast must be (b, E, N); got ", dlast_in->sizes());
  const at::ScalarType st = common_or_float({&u_in, &delta_in, &dout_in, z_in ? &*z_in : nullptr});
  const at::ScalarType st_bc = common_or_float({&B_in, &C_in}) == st ? st : at::kFloat;
  const at::Tensor dout = as_dtype(dout_in, st);
  const std::optional<at::Tensor> z = z_in ? std::optional<at::Tensor>(as_dtype(*z_in, st)) : std::nullopt;
  const at::Tensor dlast = dlast_in ? dlast_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t Eg = E / (B_in.dim() == 4 ? B_in.size(1) : 1);
  const Blocks blocks = make_blocks(E, Eg);
  const int64_t tasks = blocks.count(b);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  DirData dd(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in, st, st_bc, parts);
  at::Tensor dz = new_gate_grad(z, u_in, st);

  if (tasks > 0 && L > 0) {
    const auto chunks = make_chunks(N);
    const int ld = chunks.back().n0 + chunks.back().nt;
    dispatch_types(st, st_bc, [&](auto t_tag, auto bc_tag) {
      using T = decltype(t_tag);
      using TBC = decltype(bc_tag);
      const auto dir = make_direction<T, TBC>(dd.u, dd.delta, dd.A, dd.B, dd.C, dd.D, dd.bias, /*reverse=*/false);
      const View3<const T> dov = view3<const T>(dout);
      const View3<const T> zv = z ? view3<const T>(*z) : View3<const T>{};
      const View3<T> dzv = z ? view3<T>(dz) : View3<T>{};
      for_parts(tasks, parts, [&](int64_t part, int64_t begin, int64_t end) {
        Scratch sc(ld, N, chunks.size());
        const Grads<T> gr = dd.grads<T>(part);
        for_groups(begin, end, [&](int64_t task) { return group_key(blocks, task, Eg, Eg); },
                   [&](int64_t first, int64_t last) {
          std::vector<Lane> lanes = make_lanes(dir, blocks, N, ld, first, last);
          if (dlast.defined())   // the gradient of the last state starts the reverse recurrence
            for (Lane& lane : lanes)
              for (int i = 0; i < lane.cnt; ++i)
                for (int64_t m = 0; m < N; ++m)
                  lane.dh[m * W + i] = dlast.const_data_ptr<float>()[(lane.bi * E + lane.e0 + i) * N + m];
          backward_group<T, TBC>(dir, chunks, ld, N, L, E, lanes.data(), static_cast<int>(last - first),
                                 delta_softplus, states, dov, z ? &zv : nullptr, nullptr, nullptr,
                                 z ? &dzv : nullptr, gr, sc);
        });
      });
    });
  }
  std::vector<at::Tensor> g = dd.finish(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  g.insert(g.begin() + 6, z_in ? dz.to(z_in->scalar_type()) : dz);
  return g;   // du, ddelta, dA, dB, dC, dD, dz, ddelta_bias
}

std::vector<at::Tensor> bidirectional_scan_bwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D_in, const at::Tensor& ub_in,
    const at::Tensor& deltab_in, const at::Tensor& Ab_in, const at::Tensor& Bb_in, const at::Tensor& Cb_in,
    const std::optional<at::Tensor>& Db_in, const std::optional<at::Tensor>& z_in,
    const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& biasb_in, const at::Tensor& dout_in,
    const at::Tensor& states_in, const at::Tensor& statesb_in, bool delta_softplus) {
  check_direction(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  check_direction(ub_in, deltab_in, Ab_in, Bb_in, Cb_in, Db_in, biasb_in);
  check_same_shapes(u_in, A_in, ub_in, Ab_in);
  check_dout(dout_in, u_in);
  const States states_f = check_states(states_in, u_in, A_in), states_b = check_states(statesb_in, ub_in, Ab_in);
  check_gate(z_in, u_in);
  const int64_t b = u_in.size(0), E = u_in.size(1), L = u_in.size(2), N = A_in.size(1);
  const at::ScalarType st =
      common_or_float({&u_in, &delta_in, &ub_in, &deltab_in, &dout_in, z_in ? &*z_in : nullptr});
  const at::ScalarType st_bc = common_or_float({&B_in, &C_in, &Bb_in, &Cb_in}) == st ? st : at::kFloat;
  const at::Tensor dout = as_dtype(dout_in, st);
  const std::optional<at::Tensor> z = z_in ? std::optional<at::Tensor>(as_dtype(*z_in, st)) : std::nullopt;
  const int64_t Eg_f = E / (B_in.dim() == 4 ? B_in.size(1) : 1), Eg_b = E / (Bb_in.dim() == 4 ? Bb_in.size(1) : 1);
  const Blocks blocks = make_blocks(E, std::gcd(Eg_f, Eg_b));
  const int64_t tasks = blocks.count(b);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  DirData fd(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in, st, st_bc, parts);
  DirData bd(ub_in, deltab_in, Ab_in, Bb_in, Cb_in, Db_in, biasb_in, st, st_bc, parts);
  at::Tensor dz = new_gate_grad(z, u_in, st);

  if (tasks > 0 && L > 0) {
    const auto chunks = make_chunks(N);
    const int ld = chunks.back().n0 + chunks.back().nt;
    dispatch_types(st, st_bc, [&](auto t_tag, auto bc_tag) {
      using T = decltype(t_tag);
      using TBC = decltype(bc_tag);
      const auto fwd = make_direction<T, TBC>(fd.u, fd.delta, fd.A, fd.B, fd.C, fd.D, fd.bias, /*reverse=*/false);
      const auto bwd = make_direction<T, TBC>(bd.u, bd.delta, bd.A, bd.B, bd.C, bd.D, bd.bias, /*reverse=*/true);
      const View3<const T> dov = view3<const T>(dout);
      const View3<const T> zv = z ? view3<const T>(*z) : View3<const T>{};
      const View3<T> dzv = z ? view3<T>(dz) : View3<T>{};
      for_parts(tasks, parts, [&](int64_t part, int64_t begin, int64_t end) {
        Scratch sc(ld, N, chunks.size());
        const Grads<T> gr_f = fd.grads<T>(part), gr_b = bd.grads<T>(part);
        // y_b + D_b u_b of a group, (lanes, L, W) float32; every element is written before it is read
        std::vector<float> acc(z ? std::min<int64_t>(kGroup, end - begin) * L * W : 0);
        for_groups(begin, end, [&](int64_t task) { return group_key(blocks, task, Eg_f, Eg_b); },
                   [&](int64_t first, int64_t last) {
          const int n = static_cast<int>(last - first);
          std::vector<Lane> back = make_lanes(bwd, blocks, N, ld, first, last);
          backward_group<T, TBC>(bwd, chunks, ld, N, L, E, back.data(), n, delta_softplus, states_b, dov,
                                 z ? &zv : nullptr,
                                 z ? acc.data() : nullptr, nullptr, nullptr, gr_b, sc);
          back.clear();
          std::vector<Lane> fore = make_lanes(fwd, blocks, N, ld, first, last);
          backward_group<T, TBC>(fwd, chunks, ld, N, L, E, fore.data(), n, delta_softplus, states_f, dov,
                                 z ? &zv : nullptr,
                                 nullptr, z ? acc.data() : nullptr, z ? &dzv : nullptr, gr_f, sc);
        });
      });
    });
  }
  std::vector<at::Tensor> g = fd.finish(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  std::vector<at::Tensor> gb = bd.finish(ub_in, deltab_in, Ab_in, Bb_in, Cb_in, Db_in, biasb_in);
  // du, ddelta, dA, dB, dC, dD, du_b, ddelta_b, dA_b, dB_b, dC_b, dD_b, dz, ddelta_bias, ddelta_bias_b
  return {g[0], g[1], g[2], g[3], g[4], g[5], gb[0], gb[1], gb[2], gb[3], gb[4], gb[5],
          z_in ? dz.to(z_in->scalar_type()) : dz, g[6], gb[6]};
}

}  // namespace
}  // namespace vimbench_scan

TORCH_LIBRARY_FRAGMENT(vimbench_cpu, m) {
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor dout, Tensor? dlast, Tensor states, bool delta_softplus) -> Tensor[]");
  m.def("bidirectional_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor u_b, "
        "Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor? D_b, Tensor? z, Tensor? delta_bias, "
        "Tensor? delta_bias_b, Tensor dout, Tensor states, Tensor states_b, bool delta_softplus) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(vimbench_cpu, CPU, m) {
  m.impl("selective_scan_bwd", &vimbench_scan::selective_scan_bwd);
  m.impl("bidirectional_scan_bwd", &vimbench_scan::bidirectional_scan_bwd);
}
