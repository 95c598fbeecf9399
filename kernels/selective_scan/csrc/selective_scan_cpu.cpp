// Selective scan on CPU: a compiled ATen kernel for vimbench (one direction and the Vim bidirectional pair).
//
// Semantics are those of kernels/selective_scan/ref.py (mamba_ssm's selective_scan_ref). Shape legend:
//   b batch, E channels, L length, N state size, G groups of B/C (E/G channels share one B_t, C_t).
//
//   delta <- softplus(delta + delta_bias)                (bias and softplus optional; softplus as torch's,
//                                                          threshold 20: x > 20 -> x, else log1p(exp(x)))
//   h_t    = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t      h: (b, E, N) float32, h_{-1} = 0
//   y_t    = <C_t, h_t> + D * u_t
//   out    = y * silu(z)                                  (gate optional)
//
// Design (the exp of the state update dominates: E * L * N of them per direction):
//   * One lane = (batch, block of W channels), W = Vectorized<float>::size() (16 with AVX-512, 8 with AVX2);
//     one channel per SIMD lane, so the per-(e, n) exp is vectorised across channels. Blocks never straddle a
//     group of B/C, so B_t[n] and C_t[n] are scalars broadcast to all lanes. Each thread of at::parallel_for
//     takes a contiguous range of lanes (so torch.set_num_threads governs the thread count).
//   * The decay exp is vec_math.h's inline exp2 (a polynomial and an add on the exponent field, ~2 ulp; on
//     AVX-512 vscalefps, on AVX2 an 8-entry table), its range checked once per tile and chunk (scan_tile_impl).
//   * The state of a lane is NT vectors (NT = N, padded to 4, 8 or 16; larger N in several chunks of up to
//     kMaxNT, which the capability's vector registers set: kernel shapes in scan_common.h),
//     held in registers through a tile and in the lane's memory between tiles.
//   * Time is processed in tiles of kTile steps, and a thread takes its lanes in groups of up to kGroup; each
//     tile is staged, scanned and stored for the whole group before the next tile. Staging reads u and delta
//     (any dtype, any strides), applies bias and softplus, and forms delta*u and D*u into float32 buffers (L2);
//     B and C of the tile are copied once per (batch, group of B/C). For time-major inputs (Vim's in_proj and
//     x_proj outputs) staging and the store go row by row across the group's lanes, so each step's channels are
//     one contiguous run of memory that the hardware prefetcher streams; other layouts are gathered lane by
//     lane. The scan pass then touches only the staged buffers and its registers (no function calls, so the
//     state never spills); the epilogue applies the gate and stores the output in u's dtype and strides.
//   * The bidirectional op scans the backward direction first (t = L-1 .. 0, reading original-order memory at
//     reversed offsets; no flipped copies), keeps y_b + D_b*u_b in a float32 buffer (lanes x L x W, at most
//     64 MiB per pass), then scans forward and writes (y_f + D_f*u_f + y_b + D_b*u_b) * silu(z).
//   * keep_states (when autograd records the call): each lane's tile is scanned in spans of kStateTile steps
//     and the state entering each span is stored into ``states`` (b, ceil(L / kStateTile), N, E) float32
//     (scan_common.h), from which the backward (selective_scan_bwd_cpu.cpp) recomputes a tile's states; without
//     it the op returns an empty (0,) tensor there.
//
// Build: compiled by compiled_cpu.py with -DCPU_CAPABILITY=<AVX512|AVX2|DEFAULT> -DCPU_CAPABILITY_<...> and
// the matching -m flags, so that at::vec::Vectorized<float> has the width of the running CPU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "scan_common.h"
#include "vec_math.h"

namespace vimbench_scan {
namespace {

constexpr int kTile = kShape.fwd_tile;     // time steps staged per tile (the table in scan_common.h)
static_assert(kTile % kStateTile == 0, "a forward tile holds whole tiles of the kept states");
constexpr int kGroup = kShape.fwd_group;   // lanes staged together per tile (their buffers: 384 KiB, in L2)


// ------------------------------------------------------------------------------------------------------
// The scan over one tile for one chunk of NT state entries: the hot loop.
//   d, du:  (nt, W) float32, delta and delta*u of the tile's steps
//   y:      (nt, W) float32, accumulates <C_t, h_t> over this chunk's NT state entries
//   Bt, Ct: (nt, ld) float32, B_t[n0 + j] and C_t[n0 + j] of the tile's steps (zero past N)
//   A:      (NT, W) float32, A[e, n0 + j] * kExpScale per lane (zero past N)
//   h_io:   (NT, W) float32, the state carried across tiles
// reverse: steps run s = nt-1 .. 0 (the backward direction).
// The state entries are indexed by template parameters (J...), so the compiler keeps h in NT registers.
// ------------------------------------------------------------------------------------------------------

template <bool Fast, int... J>
inline void scan_steps(int nt, bool reverse, const float* d, const float* du, float* y, const float* Bt,
                       const float* Ct, int ld, const float* A, float* h_io, std::integer_sequence<int, J...>) {
  Vec h[sizeof...(J)] = {Vec::loadu(h_io + J * W)...};
  const int step = reverse ? -1 : 1;
  int s = reverse ? nt - 1 : 0;
  for (int k = 0; k < nt; ++k, s += step) {
    const Vec dv = Vec::loadu(d + s * W);
    const Vec duv = Vec::loadu(du + s * W);
    const float* b = Bt + s * ld;
    const float* c = Ct + s * ld;
    Vec acc[2] = {Vec(0.f), Vec(0.f)};   // two partial sums: shorter dependency chain, few registers
    auto one = [&](auto jc) {
      constexpr int j = decltype(jc)::value;
      const Vec t = dv * Vec::loadu(A + j * W);
      const Vec dA = Fast ? exp_state_fast(t) : exp_state(t);
      h[j] = at::vec::fmadd(dA, h[j], duv * Vec(b[j]));
      acc[j & 1] = at::vec::fmadd(h[j], Vec(c[j]), acc[j & 1]);
    };
    (one(std::integral_constant<int, J>{}), ...);
    const Vec yv = Vec::loadu(y + s * W) + (acc[0] + acc[1]);
    yv.store(y + s * W);
  }
  ((h[J].store(h_io + J * W)), ...);
}

// The tile's steps with exp_state_fast when every exp argument of the tile is within its range (checked once:
// dmax * max_j |A_j| per lane, dmax from abs_max), else with exp_state, which checks every vector (rare: exps
// that underflow, overflow or meet NaN / inf). Two separate loops, so neither carries the other's registers.
template <int... J>
inline void scan_tile_impl(int nt, bool reverse, const float* d, const float* du, float* y, const float* Bt,
                           const float* Ct, int ld, const float* A, float* h_io, const Vec& dmax,
                           std::integer_sequence<int, J...> js) {
  if (kStateExpChecked) {
    Vec amax(0.f);
    ((amax = at::vec::maximum(amax, Vec::loadu(A + J * W).abs())), ...);
    if (!all_fast(dmax * amax)) return scan_steps<false>(nt, reverse, d, du, y, Bt, Ct, ld, A, h_io, js);
  }
  scan_steps<true>(nt, reverse, d, du, y, Bt, Ct, ld, A, h_io, js);
}

template <int NT>
void scan_tile(int nt, bool reverse, const float* d, const float* du, float* y, const float* Bt, const float* Ct,
               int ld, const float* A, float* h_io, const Vec& dmax) {
  scan_tile_impl(nt, reverse, d, du, y, Bt, Ct, ld, A, h_io, dmax, std::make_integer_sequence<int, NT>{});
}

using ScanTileFn = void (*)(int, bool, const float*, const float*, float*, const float*, const float*, int,
                            const float*, float*, const Vec&);

// Per lane, an upper bound of |d_s| over a tile's nt steps (d: (nt, W) float32) for scan_tile's range check,
// computed once per tile for all chunks of the state: the max of |d_s|'s bits as int32, one integer max per
// step, which keeps a NaN (its bits exceed inf's, so the check fails and the checked loop runs).
inline Vec abs_max(const float* d, int nt) {
  IVec m(0);
  for (int s = 0; s < nt; ++s) m = at::vec::maximum(m, float_bits(Vec::loadu(d + s * W).abs()));
  return bits_float(m);
}

// The state dimension split into chunks of NT in {4, 8, 16} (kMaxNT at most), zero-padded.
struct Chunk {
  int n0, nt;           // first state index, padded chunk width
  ScanTileFn fn;
};

std::vector<Chunk> make_chunks(int64_t N) {
  std::vector<Chunk> chunks;
  for (int64_t n0 = 0; n0 < N;) {
    const int nt = chunk_width(N - n0, kMaxNT);
    ScanTileFn fn = nt == 4 ? &scan_tile<4> : nt == 8 ? &scan_tile<8> : &scan_tile<kMaxNT>;
    chunks.push_back({static_cast<int>(n0), nt, fn});
    n0 += nt;
  }
  return chunks;
}

// One block of <= W channels [e0, e0 + cnt) of batch bi, and its state carried from tile to tile.
struct Lane {
  int64_t bi = 0, e0 = 0, g = 0;
  int cnt = 0;
  std::vector<float> A, h;     // (state_len, W): A[e0 + i, n] * kExpScale per lane (0 past N or cnt); the state
  Vec Dv, biasv;

  template <typename T, typename TBC>
  Lane(const Direction<T, TBC>& dir, int64_t N, int state_len, int64_t bi_, int64_t e0_, int cnt_)
      : bi(bi_), e0(e0_), g(e0_ / dir.Eg), cnt(cnt_), A(state_len * W, 0.f), h(state_len * W, 0.f) {
    for (int i = 0; i < cnt; ++i)
      for (int64_t n = 0; n < N; ++n) A[n * W + i] = dir.A[(e0 + i) * N + n] * kExpScale;
    channel_vectors(dir, e0, cnt, Dv, biasv);
  }
};

// Per-thread scratch for one group of <= kGroup lanes and one tile: the staged delta, delta*u and y of every
// lane ((kGroup, kTile, W) float32 each, in L2), a lane's gathered rows for inputs that are not time-major, and
// B and C of the tile, staged once for all lanes of one (batch, group of B/C): ``bc_key`` says which they hold.
struct Scratch {
  std::vector<float> d, du, y, rows_a, rows_b, Bt, Ct;
  struct BCKey {
    const void* B = nullptr;
    int64_t bi = -1, g = -1, t0 = -1;
    bool operator==(const BCKey& o) const { return B == o.B && bi == o.bi && g == o.g && t0 == o.t0; }
  } bc_key;
  explicit Scratch(int ld)
      : d(kGroup * kTile * W), du(kGroup * kTile * W), y(kGroup * kTile * W), rows_a(kTile * W), rows_b(kTile * W),
        Bt(kTile * ld, 0.f), Ct(kTile * ld, 0.f) {}
  float* d_of(int j) { return d.data() + j * kTile * W; }
  float* du_of(int j) { return du.data() + j * kTile * W; }
};

// Whether a group's rows of x are read in place: x time-major (stride 1 along E) and every lane full.
template <typename T>
bool in_place(const View3<T>& x, const Lane* lanes, int n) {
  return x.se == 1 && std::all_of(lanes, lanes + n, [](const Lane& l) { return l.cnt == W; });
}

// The W elements x[lane.bi, lane.e0 .. lane.e0 + W - 1, t] of a time-major x.
template <typename T>
inline T* row(const View3<T>& x, const Lane& lane, int64_t t) { return x.data + lane.bi * x.sb + lane.e0 + t * x.sl; }

// Rows of time-major inputs and outputs are prefetched this many steps ahead of their use, in scan order, by the
// row-by-row staging and epilogue loops: a few of a group's rows in flight at a time. (Prefetching all of the next
// tile's rows lane by lane during the scan left the staging waiting on its loads: the AVX2 forward at the Vim-Ti
// 1248 shape went from ~20 to ~15 ms on an AMD EPYC, 1 thread.)
constexpr int kPrefetchRows = 8;

// Scans one direction over all L steps for a group of n <= kGroup lanes, tile by tile. Per tile:
//   stage     delta (+ bias, softplus), delta*u, and y's start D*u (+ the other direction's y + D*u, acc_in)
//             for every lane; time-major inputs are read row by row across the group's lanes, so each
//             step's channels are one contiguous run of memory (the hardware prefetcher streams it), others
//             are gathered lane by lane;
//   scan      lane by lane, chunk by chunk of the state, from the staged buffers;
//   epilogue  the gate y * silu(z) and the store in u's dtype, row by row again where the output is time-major.
//   acc_out: null, or (n, L, W) float32 that receives y + D*u in place of the output (first pass of the pair);
//            its rows are the scan's accumulator, so nothing is copied
//   acc_in:  null, or (n, L, W) float32 added to y + D*u before the gate (second pass of the pair)
//   last:    null, or (b, E, N) float32 contiguous, receives h at the end of the scan of every lane
//   states:  states.data null, or where the state entering every kStateTile steps goes (scan_common.h); the
//            tile is then scanned in spans of kStateTile steps
template <typename T, typename TBC>
void scan_group(const Direction<T, TBC>& dir, const std::vector<Chunk>& chunks, int ld, int64_t N, int64_t L,
                int64_t E, Lane* lanes, int n, bool softplus_on, const View3<const T>* z, const View3<T>* out,
                float* acc_out, const float* acc_in, float* last, const States& states, Scratch& sc) {
  const int64_t ntiles = (L + kTile - 1) / kTile;
  const bool rows_du = in_place(dir.delta, lanes, n) && in_place(dir.u, lanes, n);
  const bool rows_out = acc_out == nullptr && in_place(*out, lanes, n) && (z == nullptr || in_place(*z, lanes, n));
  for (int64_t k = 0; k < ntiles; ++k) {
    const int64_t t0 = (dir.reverse ? ntiles - 1 - k : k) * kTile;
    const int nt = static_cast<int>(std::min<int64_t>(kTile, L - t0));
    auto y_of = [&](int j) { return acc_out ? acc_out + (j * L + t0) * W : sc.y.data() + j * kTile * W; };

    // stage
    auto stage = [&](int j, int s, Vec dv, const Vec uv) {
      if (dir.bias) dv = dv + lanes[j].biasv;
      if (softplus_on) dv = softplus(dv);
      dv.store(sc.d_of(j) + s * W);
      (dv * uv).store(sc.du_of(j) + s * W);
      Vec y0 = dir.D ? lanes[j].Dv * uv : Vec(0.f);
      if (acc_in) y0 = y0 + Vec::loadu(acc_in + (j * L + t0 + s) * W);
      y0.store(y_of(j) + s * W);
    };
    // the rows go in scan order (t descending in the reverse direction), so that the row kPrefetchRows steps
    // ahead (-1 past either end of the sequence) is the next tile's once the tile's last rows are reached
    auto step_of = [&](int i) { return dir.reverse ? nt - 1 - i : i; };
    auto ahead = [&](int s) {
      const int64_t t = dir.reverse ? t0 + s - kPrefetchRows : t0 + s + kPrefetchRows;
      return t >= 0 && t < L ? t : int64_t{-1};
    };
    if (rows_du) {
      for (int i = 0; i < nt; ++i) {
        const int s = step_of(i);
        const int64_t tp = ahead(s);
        for (int j = 0; j < n; ++j) {
          if (tp >= 0) {
            __builtin_prefetch(row(dir.delta, lanes[j], tp));
            __builtin_prefetch(row(dir.u, lanes[j], tp));
          }
          stage(j, s, load_vec<T>(row(dir.delta, lanes[j], t0 + s)), load_vec<T>(row(dir.u, lanes[j], t0 + s)));
        }
      }
    } else {
      for (int j = 0; j < n; ++j) {
        load_rows<T>(dir.delta, lanes[j].bi, lanes[j].e0, lanes[j].cnt, t0, nt, sc.rows_a.data());
        load_rows<T>(dir.u, lanes[j].bi, lanes[j].e0, lanes[j].cnt, t0, nt, sc.rows_b.data());
        for (int s = 0; s < nt; ++s)
          stage(j, s, Vec::loadu(sc.rows_a.data() + s * W), Vec::loadu(sc.rows_b.data() + s * W));
      }
    }

    // scan
    for (int j = 0; j < n; ++j) {
      const Scratch::BCKey key{dir.B.data, lanes[j].bi, lanes[j].g, t0};
      if (!(sc.bc_key == key)) {
        load_bc<TBC>(dir.B, lanes[j].bi, lanes[j].g, N, t0, nt, ld, sc.Bt.data());
        load_bc<TBC>(dir.C, lanes[j].bi, lanes[j].g, N, t0, nt, ld, sc.Ct.data());
        sc.bc_key = key;
      }
      const Vec dmax = kStateExpChecked ? abs_max(sc.d_of(j), nt) : Vec(0.f);   // bounds every span's steps
      const int span = states.data ? kStateTile : nt, spans = (nt + span - 1) / span;
      for (int q = 0; q < spans; ++q) {
        const int o = (dir.reverse ? spans - 1 - q : q) * span, len = std::min(span, nt - o);
        if (states.data) {
          const int64_t k = (t0 + o) / kStateTile;
          store_state(states, lanes[j].bi, k, lanes[j].e0, lanes[j].cnt, lanes[j].h.data());
          prefetch_state(states, lanes[j].bi, dir.reverse ? k - 1 : k + 1, lanes[j].e0);   // the next span's
        }
        for (const Chunk& ch : chunks)
          ch.fn(len, dir.reverse, sc.d_of(j) + o * W, sc.du_of(j) + o * W, y_of(j) + o * W,
                sc.Bt.data() + o * ld + ch.n0, sc.Ct.data() + o * ld + ch.n0, ld, lanes[j].A.data() + ch.n0 * W,
                lanes[j].h.data() + ch.n0 * W, dmax);
      }
    }

    // epilogue
    if (acc_out) continue;
    if (rows_out) {
      for (int i = 0; i < nt; ++i) {
        const int s = step_of(i);
        const int64_t tp = ahead(s);
        for (int j = 0; j < n; ++j) {
          if (tp >= 0) {
            if (z) __builtin_prefetch(row(*z, lanes[j], tp));
            __builtin_prefetch(row(*out, lanes[j], tp), 1);
          }
          Vec v = Vec::loadu(y_of(j) + s * W);
          if (z) v = v * silu(load_vec<T>(row(*z, lanes[j], t0 + s)));
          store_vec<T>(v, row(*out, lanes[j], t0 + s));
        }
      }
    } else {
      for (int j = 0; j < n; ++j) {
        float* y = y_of(j);
        if (z) {
          load_rows<T>(*z, lanes[j].bi, lanes[j].e0, lanes[j].cnt, t0, nt, sc.rows_a.data());
          for (int s = 0; s < nt; ++s)
            (Vec::loadu(y + s * W) * silu(Vec::loadu(sc.rows_a.data() + s * W))).store(y + s * W);
        }
        store_rows<T>(*out, lanes[j].bi, lanes[j].e0, lanes[j].cnt, t0, nt, y);
      }
    }
  }
  if (last)
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < lanes[j].cnt; ++i)
        for (int64_t m = 0; m < N; ++m) last[(lanes[j].bi * E + lanes[j].e0 + i) * N + m] = lanes[j].h[m * W + i];
}

// scan_group over ``lanes`` in groups; acc_out / acc_in as there, (lanes.size(), L, W) here.
template <typename T, typename TBC>
void scan_direction(const Direction<T, TBC>& dir, const std::vector<Chunk>& chunks, int ld, int64_t N, int64_t L,
                    int64_t E, std::vector<Lane>& lanes, bool softplus_on, const View3<const T>* z,
                    const View3<T>* out, float* acc_out, const float* acc_in, float* last, const States& states,
                    Scratch& sc) {
  // Groups pay off where rows are read across lanes (time-major inputs); for other layouts a lane is staged
  // alone, so its buffers stay in L1.
  const size_t group = dir.delta.se == 1 && dir.u.se == 1 ? kGroup : 1;
  for (size_t first = 0; first < lanes.size(); first += group) {
    const int n = static_cast<int>(std::min<size_t>(group, lanes.size() - first));
    scan_group(dir, chunks, ld, N, L, E, lanes.data() + first, n, softplus_on, z, out,
               acc_out ? acc_out + first * L * W : nullptr, acc_in ? acc_in + first * L * W : nullptr, last, states,
               sc);
  }
}

// The lanes of tasks [begin, end) for direction ``dir``.
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

// Lanes per pass of the bidirectional op: its (lanes, L, W) float32 buffer stays under 64 MiB.
int64_t lanes_per_pass(int64_t L) {
  return std::max<int64_t>(1, (int64_t{64} << 20) / (L * W * int64_t{sizeof(float)}));
}

// ------------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------------

// The (b, T, N, E) float32 states a forward keeps for its backward (scan_common.h), or an empty (0,) tensor.
at::Tensor new_states(const at::Tensor& u, int64_t N, bool keep) {
  auto f32 = u.options().dtype(at::kFloat);
  return keep ? at::empty({u.size(0), state_tiles(u.size(2)), N, u.size(1)}, f32) : at::empty({0}, f32);
}

States states_or_none(const at::Tensor& s) { return s.numel() > 0 ? states_of(s) : States{}; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D_in, const std::optional<at::Tensor>& z_in,
    const std::optional<at::Tensor>& bias_in, bool delta_softplus, bool time_major_out, bool keep_states) {
  check_direction(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  check_gate(z_in, u_in);
  const int64_t b = u_in.size(0), E = u_in.size(1), L = u_in.size(2), N = A_in.size(1);
  const at::ScalarType out_st = u_in.scalar_type();
  const at::ScalarType st = common_or_float({&u_in, &delta_in, z_in ? &*z_in : nullptr});
  const at::ScalarType st_bc = common_or_float({&B_in, &C_in}) == st ? st : at::kFloat;
  const at::Tensor u = as_dtype(u_in, st), delta = as_dtype(delta_in, st);
  const std::optional<at::Tensor> z = z_in ? std::optional<at::Tensor>(as_dtype(*z_in, st)) : std::nullopt;
  const at::Tensor B = as_dtype(B_in, st_bc), C = as_dtype(C_in, st_bc);
  const at::Tensor A = A_in.to(at::kFloat).contiguous();
  const auto D = small_float(D_in), bias = small_float(bias_in);

  at::Tensor out = new_output(u, st, time_major_out);
  at::Tensor last = at::zeros({b, E, N}, u.options().dtype(at::kFloat));
  at::Tensor states = new_states(u, N, keep_states);
  if (b == 0 || E == 0 || L == 0) return {out.to(out_st), last, states};

  const auto chunks = make_chunks(N);
  const int ld = chunks.back().n0 + chunks.back().nt;
  const Blocks blocks = make_blocks(E, E / (B.dim() == 4 ? B.size(1) : 1));
  TORCH_CHECK(B.dim() == C.dim() && (B.dim() == 3 || B.size(1) == C.size(1)), "B and C must have the same groups");

  dispatch_types(st, st_bc, [&](auto t_tag, auto bc_tag) {
    using T = decltype(t_tag);
    using TBC = decltype(bc_tag);
    const auto dir = make_direction<T, TBC>(u, delta, A, B, C, D, bias, /*reverse=*/false);
    const View3<const T> zv = z ? view3<const T>(*z) : View3<const T>{};
    const View3<T> ov = view3<T>(out);
    float* lastp = last.data_ptr<float>();
    at::parallel_for(0, blocks.count(b), 1, [&](int64_t begin, int64_t end) {
      Scratch sc(ld);
      std::vector<Lane> lanes = make_lanes(dir, blocks, N, ld, begin, end);
      scan_direction<T, TBC>(dir, chunks, ld, N, L, E, lanes, delta_softplus, z ? &zv : nullptr, &ov, nullptr,
                             nullptr, lastp, states_or_none(states), sc);
    });
  });
  return {out.scalar_type() == out_st ? out : out.to(out_st), last, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bidirectional_scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D_in, const at::Tensor& ub_in,
    const at::Tensor& deltab_in, const at::Tensor& Ab_in, const at::Tensor& Bb_in, const at::Tensor& Cb_in,
    const std::optional<at::Tensor>& Db_in, const std::optional<at::Tensor>& z_in,
    const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& biasb_in, bool delta_softplus,
    bool time_major_out, bool keep_states) {
  check_direction(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  check_direction(ub_in, deltab_in, Ab_in, Bb_in, Cb_in, Db_in, biasb_in);
  check_same_shapes(u_in, A_in, ub_in, Ab_in);
  check_gate(z_in, u_in);
  const int64_t b = u_in.size(0), E = u_in.size(1), L = u_in.size(2), N = A_in.size(1);
  const at::ScalarType out_st = u_in.scalar_type();
  const at::ScalarType st = common_or_float({&u_in, &delta_in, &ub_in, &deltab_in, z_in ? &*z_in : nullptr});
  const at::ScalarType st_bc = common_or_float({&B_in, &C_in, &Bb_in, &Cb_in}) == st ? st : at::kFloat;
  const at::Tensor u = as_dtype(u_in, st), delta = as_dtype(delta_in, st);
  const at::Tensor ub = as_dtype(ub_in, st), deltab = as_dtype(deltab_in, st);
  const std::optional<at::Tensor> z = z_in ? std::optional<at::Tensor>(as_dtype(*z_in, st)) : std::nullopt;
  const at::Tensor B = as_dtype(B_in, st_bc), C = as_dtype(C_in, st_bc);
  const at::Tensor Bb = as_dtype(Bb_in, st_bc), Cb = as_dtype(Cb_in, st_bc);
  const at::Tensor A = A_in.to(at::kFloat).contiguous(), Ab = Ab_in.to(at::kFloat).contiguous();
  const auto D = small_float(D_in), bias = small_float(bias_in);
  const auto Db = small_float(Db_in), biasb = small_float(biasb_in);
  TORCH_CHECK(B.dim() == C.dim() && (B.dim() == 3 || B.size(1) == C.size(1)), "B and C must have the same groups");
  TORCH_CHECK(Bb.dim() == Cb.dim() && (Bb.dim() == 3 || Bb.size(1) == Cb.size(1)),
              "B_b and C_b must have the same groups");

  at::Tensor out = new_output(u, st, time_major_out);
  at::Tensor states_f = new_states(u, N, keep_states), states_b = new_states(u, N, keep_states);
  if (b == 0 || E == 0 || L == 0) return {out.to(out_st), states_f, states_b};

  const auto chunks = make_chunks(N);
  const int ld = chunks.back().n0 + chunks.back().nt;
  // segments that cross no group boundary of either direction
  const int64_t Eg_f = E / (B.dim() == 4 ? B.size(1) : 1), Eg_b = E / (Bb.dim() == 4 ? Bb.size(1) : 1);
  const Blocks blocks = make_blocks(E, std::gcd(Eg_f, Eg_b));

  dispatch_types(st, st_bc, [&](auto t_tag, auto bc_tag) {
    using T = decltype(t_tag);
    using TBC = decltype(bc_tag);
    const auto fwd = make_direction<T, TBC>(u, delta, A, B, C, D, bias, /*reverse=*/false);
    const auto bwd = make_direction<T, TBC>(ub, deltab, Ab, Bb, Cb, Db, biasb, /*reverse=*/true);
    const View3<const T> zv = z ? view3<const T>(*z) : View3<const T>{};
    const View3<T> ov = view3<T>(out);
    at::parallel_for(0, blocks.count(b), 1, [&](int64_t begin, int64_t end) {
      Scratch sc(ld);
      const int64_t per_pass = lanes_per_pass(L);
      // y_b + D_b * u_b of the pass's lanes, (lanes, L, W) float32; every element is written before it is read
      const std::unique_ptr<float[]> acc(new float[std::min(end - begin, per_pass) * L * W]);
      for (int64_t first = begin; first < end; first += per_pass) {
        const int64_t last_task = std::min(end, first + per_pass);
        std::vector<Lane> back = make_lanes(bwd, blocks, N, ld, first, last_task);
        scan_direction<T, TBC>(bwd, chunks, ld, N, L, E, back, delta_softplus, nullptr, nullptr, acc.get(),
                               nullptr, nullptr, states_or_none(states_b), sc);
        std::vector<Lane> fore = make_lanes(fwd, blocks, N, ld, first, last_task);
        scan_direction<T, TBC>(fwd, chunks, ld, N, L, E, fore, delta_softplus, z ? &zv : nullptr, &ov, nullptr,
                               acc.get(), nullptr, states_or_none(states_f), sc);
      }
    });
  });
  return {out.scalar_type() == out_st ? out : out.to(out_st), states_f, states_b};
}

// Microbenchmark for the floor: applies x <- exp(x * c), c = -1/2, `iters` times to every element of the float32
// contiguous x (numel a multiple of kChainBlock * W), in place, through at::parallel_for, with the scan's
// state exp (exp_state_fast: x * c is within its range), or with at::vec's exp_u20 if aten_exp (the exp the
// kernels used off AVX-512 before vec_math.h's exp2, for comparison). Each thread takes blocks of kChainBlock
// vectors (4 KiB with AVX-512, in L1) and sweeps each block `iters` times, a load, a multiply, an exp and a
// store per vector as in the scan's hot loop: the block's vectors are independent, so the rate is the exp's
// throughput, not its latency. Returns the elapsed seconds; exps = numel * iters.
double exp_chain(at::Tensor x, int64_t iters, bool aten_exp) {
  constexpr int64_t kChainBlock = 64;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() % (kChainBlock * W) == 0,
              "x must be contiguous float32 with numel a multiple of ", kChainBlock * W);
  float* p = x.data_ptr<float>();
  const int64_t blocks = x.numel() / (kChainBlock * W);
  auto sweep = [&](auto exp_fn, float c) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        float* q = p + bi * kChainBlock * W;
        for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 8
          for (int64_t j = 0; j < kChainBlock; ++j) exp_fn(Vec::loadu(q + j * W) * Vec(c)).store(q + j * W);
      }
    });
  };
  const auto t0 = std::chrono::steady_clock::now();
  if (aten_exp)
    sweep([](const Vec& v) { return v.exp_u20(); }, -0.5f);
  else
    sweep([](const Vec& v) { return exp_state_fast(v); }, -0.5f * kExpScale);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The vector math of vec_math.h applied elementwise to a float32 contiguous x (numel a multiple of W), for the
// accuracy tests against float64: fn is "exp2" (2^x, exp_state's exp2), "exp" (exp_accurate), "softplus",
// "silu", "sigmoid" or "silu_grad".
at::Tensor vec_math(const at::Tensor& x, c10::string_view fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() % W == 0,
              "x must be contiguous float32 with numel a multiple of ", W);
  Vec (*f)(const Vec&) = nullptr;
  if (fn == "exp2") f = [](const Vec& v) { return exp2(v); };
  if (fn == "exp") f = [](const Vec& v) { return exp_accurate(v); };
  if (fn == "softplus") f = [](const Vec& v) { return softplus(v); };
  if (fn == "silu") f = [](const Vec& v) { return silu(v); };
  if (fn == "sigmoid") f = [](const Vec& v) { return sigmoid(v); };
  if (fn == "silu_grad") f = [](const Vec& v) { return silu_grad(v); };
  TORCH_CHECK(f != nullptr, "unknown function ", fn);
  at::Tensor out = at::empty_like(x);
  const float* p = x.const_data_ptr<float>();
  float* q = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); i += W) f(Vec::loadu(p + i)).store(q + i);
  return out;
}

int64_t vector_width() { return W; }

}  // namespace
}  // namespace vimbench_scan

// Ops live in their own namespace, torch.ops.vimbench_cpu, so that they never collide with the Python-defined
// custom ops of torch.ops.vimbench.
TORCH_LIBRARY(vimbench_cpu, m) {
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, bool time_major_out, bool keep_states) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("bidirectional_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor u_b, "
        "Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor? D_b, Tensor? z, Tensor? delta_bias, "
        "Tensor? delta_bias_b, bool delta_softplus, bool time_major_out, bool keep_states) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("exp_chain(Tensor(a!) x, int iters, bool aten_exp=False) -> float");
  m.def("vec_math(Tensor x, str fn) -> Tensor");
  m.def("vector_width() -> int", &vimbench_scan::vector_width);   // SIMD lanes of float32 (16: AVX-512)
}

TORCH_LIBRARY_IMPL(vimbench_cpu, CPU, m) {
  m.impl("selective_scan_fwd", &vimbench_scan::selective_scan_fwd);
  m.impl("bidirectional_scan_fwd", &vimbench_scan::bidirectional_scan_fwd);
  m.impl("exp_chain", &vimbench_scan::exp_chain);
  m.impl("vec_math", &vimbench_scan::vec_math);
}
