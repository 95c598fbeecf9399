"""Fused selective scan in Triton, forward and backward: backend "triton" of ``vimbench.kernels.selective_scan``.

Same signatures, shapes and semantics as ``ref.selective_scan_ref`` and
``selective_scan.bidirectional_scan_ref`` (legend: b batch, E channels, L length, N state, G groups).

Design (kernel-facts.md section 2, design (a)): one program per (block of BLOCK_E channels of one B/C
group, batch row)
walks the tokens in order (t = 0..L-1, or L-1..0), holding the state tile h (BLOCK_N x BLOCK_E, float32)
in registers. BLOCK_E = 32 * num_warps, so each thread owns one channel and all N of its states: the C
contraction sum_n h[n] * C_t[n] is a reduction inside one thread, with no shuffles. Per token: exp(delta*A)
as exp2(delta * A2) with A2 = A * log2(e) scaled once before the loop (one exp2 per (b, e, t, n)), the
update h = exp2(delta * A2) * h + (delta * u) * B_t, y_t = sum_n h * C_t. Only u, delta, z, B, C in and y
out touch memory (plus A, D, delta_bias and the last state once): no (b, E, L, N) tensor exists. A tail
block of channels, a padded N (BLOCK_N = next power of two of N) and the tokens past L in the last tile
are masked; padded states have A2 = 0 and B = 0 and padded tokens delta = 0, so the state is unchanged.

Loading: the rows of u, delta, z and y are contiguous along L, so reading one token of 32 channels
touches 32 cache lines. The loop therefore moves tiles of 4 tokens: u, delta (and z, and y_f in the
backward direction) are loaded as (BLOCK_E, 4) tiles in Triton's coalesced layout (4 lanes along L, 16-byte
runs for float32), delta_bias + softplus (x <= 20 ? log(1 + exp(x)) : x, written with tl.exp2/tl.log2,
no explicit libdevice call) and delta * u are computed on the tile, and ``_columns`` splits it into its 4 token
columns: tl.split needs its last dimension inside one thread, so Triton converts each tile once, through
shared memory, into the channel-per-thread layout (all 4 tokens in registers; the splits are then free).
The 4 steps are unrolled; their outputs are joined back into a (BLOCK_E, 4) tile for the D * u skip, the
silu(z) gate and one store. B_t and C_t are (N,) vectors per token (a program's channels lie in one group:
the grid enumerates channel blocks per group), loaded in the layout where every thread holds all N, so
all lanes of a warp read the same address. 8-token tiles would halve the cache lines per token but need
the B_t, C_t of 8 tokens in flight (256 registers): compiled with Triton 3.6 and 3.8 they spilled.

Registers, spills and shared memory for sm_80 and sm_90 come from ``vimbench check-kernels`` (compiled
ahead of time, no GPU). Speed is unmeasured: this was written on a machine without a GPU.

Bidirectional: one launch, one program per (channel block, batch row) runs the forward direction, which
stores y_f into the output, then the backward direction, reading its inputs (all in original token order)
at offsets L-1-i, adding y_f back and applying the shared silu(z) gate. y_f is therefore rounded once
to the output dtype before the sum (exact for float32 outputs; at most one extra rounding for bf16/fp16).

Backward (``selective_scan_triton_backward``, the backward of both designs' records in ``backends.REGISTRY``; the
bidirectional pair's backward runs it once per direction through ``ops._bidir_backward``, flipping the backward
direction's inputs):
one program per (channel block, batch row) as in the forward, in the same design's tile and warps. It saves
the state every ``BWD_CHUNK`` tokens in a first forward pass (the forward itself saves nothing: the custom
op's autograd keeps the inputs only), then per chunk from last to first recomputes the chunk's states from
its checkpoint into a per-program scratch and walks them in reverse with the state's gradient in registers.
No (b, E, L, N) tensor: the checkpoints are 1/32 of one, the scratch (BWD_CHUNK + 1) tiles per program. dA,
dD and the bias gradient are per-program partials over the batch row, dB and dC per channel block, summed by
torch afterwards: deterministic, no atomics. Three exp2 per (b, e, t, n) (the checkpoint pass, the
recompute, the reverse step).

Not autotuned: the tile is fixed by the design (one channel per thread; 1 warp per program, for the most
programs and so the most warps in flight), and the compile report (``vimbench check-kernels``) checks
exactly the configurations in ``kernel_configs``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vimbench.kernels.selective_scan.ref import compute_dtype


@triton.jit
def _softplus(x):
    # x <= 20 ? log(1 + exp(x)) : x (mamba_ssm's threshold) in base 2: tl.exp2 is one ex2.approx, and no
    # explicit libdevice call (which the interpreter can't run); the minimum keeps exp2 finite in the
    # branch that where() discards
    x2 = tl.minimum(x, 20.0) * 1.4426950408889634
    return tl.where(x <= 20.0, tl.log2(1.0 + tl.exp2(x2)) * 0.6931471805599453, x)


@triton.jit
def _columns(x, BLOCK_E: tl.constexpr):
    """The 4 columns (BLOCK_E,) of a (BLOCK_E, 4) tile, in order. Each split needs its last dim inside one
    thread, so Triton moves the tile to a channel-per-thread layout once (through shared memory)."""
    a, b = tl.split(tl.reshape(x, (BLOCK_E, 2, 2)))              # columns 0 2 | 1 3
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    return c0, c1, c2, c3


@triton.jit
def _join_columns(c0, c1, c2, c3, BLOCK_E: tl.constexpr):
    """Inverse of ``_columns``: four (BLOCK_E,) columns -> the (BLOCK_E, 4) tile."""
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK_E, 4))


@triton.jit
def _step(h, A2, delta, du, B_ptr, C_ptr, offs_bc, mask_n, j, L, REVERSE: tl.constexpr):
    """One token: h (BLOCK_N, BLOCK_E) <- exp2(delta * A2) * h + du * B_t; returns (h, y_t = sum_n h * C_t).
    B_t, C_t: (BLOCK_N,) at offsets ``offs_bc`` + t, shared by the program's channels (one group).
    ``j`` is the step in scan order; past the end (j >= L) B_t and C_t are read at the last valid token."""
    t = tl.minimum(j, L - 1)
    if REVERSE:
        t = L - 1 - t
    Bt = tl.load(B_ptr + offs_bc + t, mask=mask_n, other=0.0).to(tl.float32)                  # (BLOCK_N,)
    Ct = tl.load(C_ptr + offs_bc + t, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.exp2(delta[None, :] * A2) * h + du[None, :] * Bt[:, None]
    return h, tl.sum(h * Ct[:, None], axis=0)


@triton.jit
def _scan_direction(out_ptr, last_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr,
                    pid_b, group, offs_e, mask_e, E, L, G,
                    REVERSE: tl.constexpr, ADD_TO_OUT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                    HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr, STORE_LAST_STATE: tl.constexpr,
                    N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Scans one direction for the channels ``offs_e`` (valid where ``mask_e``, all in B/C group ``group``)
    of batch row ``pid_b`` and writes y into out. A_ptr points to A transposed, (N, E) contiguous, so that A
    loads in the layout of the state tile."""
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N                                         # (BLOCK_N,), all true when N is a power of two
    mask_ne = mask_n[:, None] & mask_e[None, :]                                         # (BLOCK_N, BLOCK_E)
    # 64-bit offset of this batch row; offsets inside one row of the batch fit in 32 bits
    row = pid_b * E * L
    u_ptr, delta_ptr, z_ptr, out_ptr = u_ptr + row, delta_ptr + row, z_ptr + row, out_ptr + row
    B_ptr, C_ptr = B_ptr + pid_b * G * N * L, C_ptr + pid_b * G * N * L
    offs_u = offs_e * L                                                                 # (BLOCK_E,)
    offs_bc = (group * N + offs_n) * L                                                  # (BLOCK_N,)
    # A * log2(e), so that exp(delta * A) == exp2(delta * A2)
    A2 = tl.load(A_ptr + offs_n[:, None] * E + offs_e[None, :], mask=mask_ne, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for c in tl.range(0, L, 4, num_stages=NUM_STAGES):      # NUM_STAGES None: Triton's default for the loop
        # the 4 tokens scanned next, as a tile in ascending address order (so that it loads coalesced in
        # both directions); the backward direction scans its columns from last to first
        if REVERSE:
            t = L - 4 - c + tl.arange(0, 4)
        else:
            t = c + tl.arange(0, 4)
        offs = offs_u[:, None] + t[None, :]                                             # (BLOCK_E, 4)
        mask = mask_e[:, None] & ((t >= 0) & (t < L))[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            delta = delta + bias[:, None]
        if DELTA_SOFTPLUS:
            delta = _softplus(delta)
        delta = tl.where(mask, delta, 0.0)           # tokens past the end: decay 1, input 0, state unchanged
        d0, d1, d2, d3 = _columns(delta, BLOCK_E)
        v0, v1, v2, v3 = _columns(delta * u, BLOCK_E)
        if REVERSE:
            d0, d1, d2, d3 = d3, d2, d1, d0
            v0, v1, v2, v3 = v3, v2, v1, v0
        h, y0 = _step(h, A2, d0, v0, B_ptr, C_ptr, offs_bc, mask_n, c + 0, L, REVERSE)
        h, y1 = _step(h, A2, d1, v1, B_ptr, C_ptr, offs_bc, mask_n, c + 1, L, REVERSE)
        h, y2 = _step(h, A2, d2, v2, B_ptr, C_ptr, offs_bc, mask_n, c + 2, L, REVERSE)
        h, y3 = _step(h, A2, d3, v3, B_ptr, C_ptr, offs_bc, mask_n, c + 3, L, REVERSE)
        if REVERSE:
            y = _join_columns(y3, y2, y1, y0, BLOCK_E)                                   # (BLOCK_E, 4)
        else:
            y = _join_columns(y0, y1, y2, y3, BLOCK_E)
        if HAS_D:
            y = y + D[:, None] * u
        if ADD_TO_OUT:
            y = y + tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_LAST_STATE:
        tl.store(last_ptr + (pid_b * E + offs_e[None, :]) * N + offs_n[:, None], h, mask=mask_ne)


@triton.jit
def _selective_scan_fwd_kernel(
        out_ptr, last_ptr,
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,           # forward direction
        ub_ptr, deltab_ptr, Ab_ptr, Bb_ptr, Cb_ptr, Db_ptr, biasb_ptr,    # backward direction (BIDIRECTIONAL)
        z_ptr,
        E, L, G,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
        BIDIRECTIONAL: tl.constexpr, STORE_LAST_STATE: tl.constexpr, N: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    # grid: (G * cdiv(E // G, BLOCK_E), b): blocks of channels never straddle two groups, so that B_t and
    # C_t are one (N,) vector per program. All (b, E, L) tensors and B, C (b, G, N, L) are contiguous.
    pid_b = tl.program_id(1).to(tl.int64)
    channels_per_group = E // G
    blocks_per_group = tl.cdiv(channels_per_group, BLOCK_E)
    group = tl.program_id(0) // blocks_per_group
    offs_in_group = (tl.program_id(0) % blocks_per_group) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_in_group < channels_per_group
    offs_e = group * channels_per_group + offs_in_group
    if BIDIRECTIONAL:
        _scan_direction(out_ptr, last_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr,
                        pid_b, group, offs_e, mask_e, E, L, G, False, False, HAS_D, False, HAS_DELTA_BIAS,
                        DELTA_SOFTPLUS, False, N, BLOCK_E, BLOCK_N, NUM_STAGES)
        tl.debug_barrier()  # y_f stored by the forward pass is visible to every thread of the program
        _scan_direction(out_ptr, last_ptr, ub_ptr, deltab_ptr, Ab_ptr, Bb_ptr, Cb_ptr, Db_ptr, biasb_ptr, z_ptr,
                        pid_b, group, offs_e, mask_e, E, L, G, True, True, HAS_D, HAS_Z, HAS_DELTA_BIAS,
                        DELTA_SOFTPLUS, False, N, BLOCK_E, BLOCK_N, NUM_STAGES)
    else:
        _scan_direction(out_ptr, last_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr,
                        pid_b, group, offs_e, mask_e, E, L, G, False, False, HAS_D, HAS_Z, HAS_DELTA_BIAS,
                        DELTA_SOFTPLUS, STORE_LAST_STATE, N, BLOCK_E, BLOCK_N, NUM_STAGES)


DESIGNS = {"triton": dict(num_warps=1, num_stages=None), "triton_pipelined": dict(num_warps=4, num_stages=3)}
"""The two launch designs, each its own scan backend (rows name the one that ran):
    triton            one warp per program, 32 channels; the token loop as Triton schedules it by default (the
                      most programs, hence the most warps in flight to hide load latency)
    triton_pipelined  four warps per program, 4 x 32 channels (four channel blocks of the first design, sharing
                      one program's B_t, C_t loads), and the token loop software-pipelined over 3 stages
                      (``tl.range(num_stages=3)``: the loads of the next tiles are issued while the current one
                      is scanned)
Which is faster is a measurement: the GPU check times both at the Vim-Ti 1248 shape, batch 64."""


def _launch_config(N: int, design: str) -> dict:
    """Tile, warps and loop stages of ``design`` (``DESIGNS``) for state size N: one channel per thread."""
    cfg = DESIGNS[design]
    return dict(BLOCK_E=32 * cfg["num_warps"], BLOCK_N=triton.next_power_of_2(N), NUM_STAGES=cfg["num_stages"],
                num_warps=cfg["num_warps"])


def _direction_inputs(u, delta, A, B, C, D, delta_bias):
    """One direction's inputs as the kernel reads them: contiguous, A transposed to (N, E) (a copy of
    E * N elements), B and C as (b, G, N, L)."""
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    return [t if t is None else t.contiguous() for t in (u, delta, A.t(), B, C, D, delta_bias)]


def _kernel_launch(out, last, fwd, bwd, z, delta_softplus, design):
    """Grid, pointer/size arguments, constexprs and num_warps of one launch of ``design`` (shared by the
    launcher and ``kernel_configs``). ``fwd``/``bwd``: ``_direction_inputs`` lists; ``bwd`` None for one
    direction; ``last``: (b, E, N) float32 or None."""
    u, delta, A, B, C, D, bias = fwd
    b, E, L = u.shape
    N, G = A.shape[0], B.shape[1]
    if bwd is not None and bwd[3].shape[1] != G:
        raise ValueError(f"bidirectional scan: B_b has {bwd[3].shape[1]} groups, B has {G}")
    ub, deltab, Ab, Bb, Cb, Db, biasb = bwd if bwd is not None else fwd
    cfg = _launch_config(N, design)
    args = dict(out_ptr=out, last_ptr=last if last is not None else out,
                u_ptr=u, delta_ptr=delta, A_ptr=A, B_ptr=B, C_ptr=C,
                D_ptr=D if D is not None else A, bias_ptr=bias if bias is not None else A,
                ub_ptr=ub, deltab_ptr=deltab, Ab_ptr=Ab, Bb_ptr=Bb, Cb_ptr=Cb,
                Db_ptr=Db if Db is not None else Ab, biasb_ptr=biasb if biasb is not None else Ab,
                z_ptr=z if z is not None else u, E=E, L=L, G=G)
    constexprs = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=bias is not None,
                      DELTA_SOFTPLUS=bool(delta_softplus), BIDIRECTIONAL=bwd is not None,
                      STORE_LAST_STATE=last is not None, N=N, BLOCK_E=cfg["BLOCK_E"], BLOCK_N=cfg["BLOCK_N"],
                      NUM_STAGES=cfg["NUM_STAGES"])
    grid = (G * triton.cdiv(E // G, cfg["BLOCK_E"]), b)
    return grid, args, constexprs, cfg["num_warps"]


def _selective_scan_fwd(fwd, bwd, z, delta_softplus, return_last_state, design):
    """Host launcher: allocates out (b, E, L) in u's dtype (and the last state (b, E, N) float32), launches
    the kernel once in ``design``. Returns (out, last or None)."""
    u = fwd[0]
    b, E, L = u.shape
    out = torch.empty_like(u)
    last = u.new_empty(b, E, fwd[2].shape[0], dtype=torch.float32) if return_last_state else None
    grid, args, constexprs, num_warps = _kernel_launch(out, last, fwd, bwd, z, delta_softplus, design)
    if L == 0 or b == 0 or E == 0:
        if last is not None:
            last.zero_()
        return out, last
    _selective_scan_fwd_kernel[grid](**args, **constexprs, num_warps=num_warps)
    return out, last


def kernel_configs(N: int = 16):
    """Every kernel instance the public functions launch for Vim's inputs at state size N, in both
    ``DESIGNS``, for compile checks.

    Returns a list of (label, kernel, args, constexprs, num_warps), args holding meta-device tensors and
    ints as the launcher passes them at Vim-Ti's 1248 px shape (E = 384, L = 6085, G = 1). Triton's JIT
    specialises on these values (``vimbench.count.kernel_compile.specialisation``), and every Vim shape
    gives the same variant: G = 1, E = 2 D divisible by 16, L = (res/16)^2 + 1 neither 1 nor divisible by
    16. Cases: the one-direction scan (D, z, delta_bias, softplus, last state) and the bidirectional scan
    (both D, both biases, z), and the backward of the one-direction scan (D, z, delta_bias, softplus) and as
    the bidirectional backward launches it per direction (without z), each for float32 and bfloat16
    activations; A, D and the biases are float32 as in Vim.
    """
    b, E, L = 2, 384, 6085
    configs = []
    for dtype in (torch.float32, torch.bfloat16):
        def direction():
            act = lambda *shape: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
            f32 = lambda *shape: torch.empty(*shape, dtype=torch.float32, device="meta")  # noqa: E731
            return _direction_inputs(act(b, E, L), act(b, E, L), f32(E, N), act(b, N, L), act(b, N, L),
                                     f32(E), f32(E))
        z = torch.empty(b, E, L, dtype=dtype, device="meta")
        out = torch.empty_like(z)
        last = torch.empty(b, E, N, dtype=torch.float32, device="meta")
        name = str(dtype).removeprefix("torch.")
        for design in DESIGNS:
            for label, last_, bwd in ((f"scan {name}", last, None), (f"bidirectional {name}", None, direction())):
                _, args, constexprs, num_warps = _kernel_launch(out, last_, direction(), bwd, z, True, design)
                label = label if design == "triton" else f"{label} {design}"
                configs.append((label, _selective_scan_fwd_kernel, args, constexprs, num_warps))
            # the backward: of the one-direction scan (with z), and as the bidirectional pair launches it for
            # each direction (the gate's gradient taken outside, so without z)
            for label, z_ in ((f"scan backward {name}", z), (f"bidirectional backward {name}", None)):
                fwd = direction()
                buf = _bwd_buffers(fwd[0], fwd[2], fwd[3], z_, design)
                _, args, constexprs, num_warps = _bwd_launch(buf, fwd, z_, torch.empty_like(z), True, design)
                label = label if design == "triton" else f"{label} {design}"
                configs.append((label, _selective_scan_bwd_kernel, args, constexprs, num_warps))
    return configs


def _both_or_none(v, v_b):
    """(E,) vectors of the two directions, a missing one replaced by zeros when the other is given (a zero
    D or bias is the same as none), so that one HAS_D / HAS_DELTA_BIAS flag covers both directions."""
    if (v is None) == (v_b is None):
        return v, v_b
    return (torch.zeros_like(v_b), v_b) if v is None else (v, torch.zeros_like(v))


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, design="triton"):
    """Fused selective scan; same signature, shapes and semantics as ``ref.selective_scan_ref``, launched
    in ``design`` (``DESIGNS``).

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L) or (b, G, N, L); D, delta_bias: (E,). Inputs
    float32, float16 or bfloat16 (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); math in float32.
    Returns out (b, E, L) in u's dtype, and with ``return_last_state`` also h_{L-1} (b, E, N) float32.
    """
    if compute_dtype(u) != torch.float32:
        raise ValueError(f"the triton scan computes in float32; got u of dtype {u.dtype}")
    out, last = _selective_scan_fwd(_direction_inputs(u, delta, A, B, C, D, delta_bias), None,
                                    None if z is None else z.contiguous(), delta_softplus, return_last_state, design)
    return (out, last) if return_last_state else out


def bidirectional_scan_triton(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z=None, delta_bias=None,
                              delta_bias_b=None, delta_softplus=True, design="triton"):
    """Both scans of a Vim mixer layer in one launch of ``design`` (``DESIGNS``); same semantics as
    ``bidirectional_scan_ref``.

    Forward inputs (u, delta, A, B, C, D, delta_bias) and backward inputs (u_b, delta_b, A_b, B_b, C_b, D_b,
    delta_bias_b) are in original token order, shapes as in ``selective_scan_triton``; the backward scan
    reads them at offsets L-1..0. B and B_b must have the same number of groups. Returns
    (y_f + y_b) * silu(z), (b, E, L) in u's dtype.
    """
    if compute_dtype(u) != torch.float32:
        raise ValueError(f"the triton scan computes in float32; got u of dtype {u.dtype}")
    D, D_b = _both_or_none(D, D_b)
    delta_bias, delta_bias_b = _both_or_none(delta_bias, delta_bias_b)
    out, _ = _selective_scan_fwd(_direction_inputs(u, delta, A, B, C, D, delta_bias),
                                 _direction_inputs(u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b),
                                 None if z is None else z.contiguous(), delta_softplus, False, design)
    return out


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------

BWD_CHUNK = 32
"""Tokens per checkpoint of the backward: the state is saved every BWD_CHUNK tokens, and each chunk's states are
recomputed from its checkpoint before the chunk is walked in reverse."""


@triton.jit
def _bwd_token(u_ptr, delta_ptr, B_ptr, C_ptr, bias, offs_u, offs_bc, mask_e, mask_n, t, L,
               HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """Token t's inputs for the program's channels: u, the raw delta + bias x, delta (softplus(x) or x; 0
    past the end or in a masked channel, so that the state is unchanged), all (BLOCK_E,) float32, and B_t,
    C_t (BLOCK_N,) float32 (read at the last token past the end)."""
    valid = mask_e & (t < L)
    u = tl.load(u_ptr + offs_u + t, mask=valid, other=0.0).to(tl.float32)
    x = tl.load(delta_ptr + offs_u + t, mask=valid, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        x = x + bias
    delta = x
    if DELTA_SOFTPLUS:
        delta = _softplus(x)
    delta = tl.where(valid, delta, 0.0)
    tc = tl.minimum(t, L - 1)
    Bt = tl.load(B_ptr + offs_bc + tc, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + offs_bc + tc, mask=mask_n, other=0.0).to(tl.float32)
    return u, x, delta, Bt, Ct


@triton.jit
def _selective_scan_bwd_kernel(
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, ckpt_ptr, states_ptr,
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, dout_ptr,
        E, L, G, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
        N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """One direction's gradients for the channel block and batch row of this program (grid as the forward's).

    Phase 1 walks the tokens forward and saves the state before every chunk of CHUNK tokens into this
    program's slice of ``ckpt`` (n_chunks tiles of BLOCK_N x BLOCK_E float32). Phase 2 takes the chunks from
    last to first: it recomputes the chunk's states from its checkpoint into this program's slice of
    ``states`` (CHUNK + 1 tiles: slot 0 the state before the chunk, slot i + 1 the state after its token i),
    then walks them in reverse with dh (the gradient of the state, BLOCK_N x BLOCK_E) in registers:
        dy_t = dout_t * silu(z_t)        dz_t = dout_t * y_t * silu'(z_t)       (y_t recomputed)
        dh  += C_t dy_t                  dC_t = sum_e h_t dy_t      dB_t = sum_e dh (delta_t u_t)
        g    = dh * h_{t-1} * exp(delta_t A)  (the gradient of delta_t A)
        dA  += g delta_t                 ddelta_t = u_t sum_n dh B_t + sum_n g A  (then softplus')
        du_t = D dy_t + delta_t sum_n dh B_t                 dh <- dh * exp(delta_t A)
    Outputs: du, ddelta, dz (b, E, L) in their inputs' dtypes; per-program partials, summed by the host
    without atomics: dA (b, E, N), dD and dbias (b, E), and dB, dC (b, G, blocks per group, N, L), all float32.
    """
    pid_b = tl.program_id(1).to(tl.int64)
    channels_per_group = E // G
    blocks_per_group = tl.cdiv(channels_per_group, BLOCK_E)
    group = tl.program_id(0) // blocks_per_group
    block = tl.program_id(0) % blocks_per_group
    offs_in_group = block * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_in_group < channels_per_group
    offs_e = group * channels_per_group + offs_in_group
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_ne = mask_n[:, None] & mask_e[None, :]
    row = pid_b * E * L
    u_ptr, delta_ptr, z_ptr, dout_ptr = u_ptr + row, delta_ptr + row, z_ptr + row, dout_ptr + row
    du_ptr, ddelta_ptr, dz_ptr = du_ptr + row, ddelta_ptr + row, dz_ptr + row
    B_ptr, C_ptr = B_ptr + pid_b * G * N * L, C_ptr + pid_b * G * N * L
    # this program's rows of the dB, dC partials: (N, L) at (pid_b, group, block)
    part = ((pid_b * G + group) * blocks_per_group + block) * N * L
    dB_ptr, dC_ptr = dB_ptr + part, dC_ptr + part
    offs_u = offs_e * L
    offs_bc = (group * N + offs_n) * L
    A = tl.load(A_ptr + offs_n[:, None] * E + offs_e[None, :], mask=mask_ne, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32) if HAS_DELTA_BIAS else 0.0
    tile = BLOCK_N * BLOCK_E
    offs_tile = offs_n[:, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, :]
    prog = pid_b * tl.num_programs(0) + tl.program_id(0)
    ckpt_ptr = ckpt_ptr + prog * n_chunks * tile + offs_tile
    states_ptr = states_ptr + prog * (CHUNK + 1) * tile + offs_tile

    # phase 1: the state before each chunk
    h = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for k in range(0, n_chunks):
        tl.store(ckpt_ptr + k * tile, h)
        for i in range(0, CHUNK):
            u, x, delta, Bt, Ct = _bwd_token(u_ptr, delta_ptr, B_ptr, C_ptr, bias, offs_u, offs_bc, mask_e, mask_n,
                                             k * CHUNK + i, L, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
            h = tl.exp2(delta[None, :] * A2) * h + (delta * u)[None, :] * Bt[:, None]

    # phase 2: the chunks in reverse
    dh = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dA = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dD = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        tl.debug_barrier()  # the previous chunk's reads of ``states`` are done before it is overwritten
        h = tl.load(ckpt_ptr + k * tile)
        tl.store(states_ptr, h)
        for i in range(0, CHUNK):
            u, x, delta, Bt, Ct = _bwd_token(u_ptr, delta_ptr, B_ptr, C_ptr, bias, offs_u, offs_bc, mask_e, mask_n,
                                             k * CHUNK + i, L, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
            h = tl.exp2(delta[None, :] * A2) * h + (delta * u)[None, :] * Bt[:, None]
            tl.store(states_ptr + (i + 1) * tile, h)
        tl.debug_barrier()  # the recomputed states are visible to every thread of the program
        for ii in range(0, CHUNK):
            i = CHUNK - 1 - ii
            t = k * CHUNK + i
            valid = mask_e & (t < L)
            u, x, delta, Bt, Ct = _bwd_token(u_ptr, delta_ptr, B_ptr, C_ptr, bias, offs_u, offs_bc, mask_e, mask_n,
                                             t, L, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
            h = tl.load(states_ptr + (i + 1) * tile)
            h_prev = tl.load(states_ptr + i * tile)
            dy = tl.load(dout_ptr + offs_u + t, mask=valid, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + offs_u + t, mask=valid, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[:, None], axis=0) + D * u
                sig = tl.sigmoid(z)
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + offs_u + t, dz.to(dz_ptr.dtype.element_ty), mask=valid)
                dy = dy * z * sig
            dD += dy * u
            dh += Ct[:, None] * dy[None, :]
            mask_t = mask_n & (t < L)
            tl.store(dC_ptr + offs_n * L + t, tl.sum(h * dy[None, :], axis=1), mask=mask_t)
            tl.store(dB_ptr + offs_n * L + t, tl.sum(dh * (delta * u)[None, :], axis=1), mask=mask_t)
            dv = tl.sum(dh * Bt[:, None], axis=0)                                # d(delta_t u_t), (BLOCK_E,)
            decay = tl.exp2(delta[None, :] * A2)
            g = dh * h_prev * decay
            dA += g * delta[None, :]
            ddelta = dv * u + tl.sum(g * A, axis=0)
            if DELTA_SOFTPLUS:
                ddelta = ddelta * tl.where(x <= 20.0, tl.sigmoid(x), 1.0)
            ddelta = tl.where(valid, ddelta, 0.0)
            dbias += ddelta
            tl.store(du_ptr + offs_u + t, (D * dy + delta * dv).to(du_ptr.dtype.element_ty), mask=valid)
            tl.store(ddelta_ptr + offs_u + t, ddelta.to(ddelta_ptr.dtype.element_ty), mask=valid)
            dh = dh * decay
    tl.store(dA_ptr + (pid_b * E + offs_e[None, :]) * N + offs_n[:, None], dA, mask=mask_ne)
    if HAS_D:
        tl.store(dD_ptr + pid_b * E + offs_e, dD, mask=mask_e)
    if HAS_DELTA_BIAS:
        tl.store(dbias_ptr + pid_b * E + offs_e, dbias, mask=mask_e)


def _bwd_buffers(u, A, B, z, design):
    """What the backward of ``design`` allocates, by name: du, ddelta, dz (None without z) like their inputs;
    float32 per-program partials dA (b, E, N), dD and dbias (b, E), dB and dC (b, G, blocks per group, N, L);
    the checkpoints (programs, n_chunks, BLOCK_N, BLOCK_E) and the chunk's states (programs, BWD_CHUNK + 1,
    BLOCK_N, BLOCK_E) float32 scratch; ``A`` is the (N, E) copy, B (b, G, N, L)."""
    b, E, L = u.shape
    N, G = A.shape[0], B.shape[1]
    cfg = _launch_config(N, design)
    blocks = triton.cdiv(E // G, cfg["BLOCK_E"])
    programs, tile = b * G * blocks, cfg["BLOCK_N"] * cfg["BLOCK_E"]
    f32 = dict(dtype=torch.float32)
    return dict(du=torch.empty_like(u), ddelta=torch.empty_like(u), dz=None if z is None else torch.empty_like(z),
                dA=u.new_empty(b, E, N, **f32), dD=u.new_empty(b, E, **f32), dbias=u.new_empty(b, E, **f32),
                dB=u.new_empty(b, G, blocks, N, L, **f32), dC=u.new_empty(b, G, blocks, N, L, **f32),
                ckpt=u.new_empty(programs * max(1, triton.cdiv(L, BWD_CHUNK)) * tile, **f32),
                states=u.new_empty(programs * (BWD_CHUNK + 1) * tile, **f32))


def _bwd_launch(buf, fwd, z, dout, delta_softplus, design):
    """Grid, arguments (by name, in kernel order), constexprs and num_warps of the backward's launch in
    ``design`` (shared by the launcher and ``kernel_configs``). ``buf``: ``_bwd_buffers``; ``fwd``: a
    ``_direction_inputs`` list; z None or (b, E, L); dout (b, E, L) contiguous."""
    u, delta, A, B, C, D, bias = fwd
    b, E, L = u.shape
    N, G = A.shape[0], B.shape[1]
    cfg = _launch_config(N, design)
    args = dict(du_ptr=buf["du"], ddelta_ptr=buf["ddelta"], dz_ptr=buf["dz"] if z is not None else buf["du"],
                dA_ptr=buf["dA"], dB_ptr=buf["dB"], dC_ptr=buf["dC"], dD_ptr=buf["dD"], dbias_ptr=buf["dbias"],
                ckpt_ptr=buf["ckpt"], states_ptr=buf["states"], u_ptr=u, delta_ptr=delta, A_ptr=A, B_ptr=B, C_ptr=C,
                D_ptr=D if D is not None else A, bias_ptr=bias if bias is not None else A,
                z_ptr=z if z is not None else u, dout_ptr=dout, E=E, L=L, G=G, n_chunks=triton.cdiv(L, BWD_CHUNK))
    constexprs = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=bias is not None,
                      DELTA_SOFTPLUS=bool(delta_softplus), N=N, BLOCK_E=cfg["BLOCK_E"], BLOCK_N=cfg["BLOCK_N"],
                      CHUNK=BWD_CHUNK)
    grid = (G * triton.cdiv(E // G, cfg["BLOCK_E"]), b)
    return grid, args, constexprs, cfg["num_warps"]


def selective_scan_triton_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, design="triton",
                                   launch=True):
    """The gradients of ``selective_scan_triton``'s out for ``dout`` (b, E, L): (du, ddelta, dA, dB, dC, dD, dz,
    ddelta_bias), each in its input's shape and dtype, None for an absent input (the signature of
    ``register_scan_backend``'s ``backward``); ddelta is the gradient of the raw delta. One launch of
    ``_selective_scan_bwd_kernel`` in ``design``'s tile and warps, then the partials summed with torch
    (deterministic: no atomics). ``launch`` False allocates everything and skips the kernel (the fake, for
    memory prediction)."""
    if compute_dtype(u) != torch.float32:
        raise ValueError(f"the triton scan computes in float32; got u of dtype {u.dtype}")
    if dout.shape != u.shape:
        raise ValueError(f"dout has shape {tuple(dout.shape)}, expected {tuple(u.shape)}")
    fwd = _direction_inputs(u, delta, A, B, C, D, delta_bias)
    z = None if z is None else z.contiguous()
    buf = _bwd_buffers(fwd[0], fwd[2], fwd[3], z, design)
    if 0 in u.shape:
        for name in ("du", "ddelta", "dz", "dA", "dD", "dbias", "dB", "dC"):
            if buf[name] is not None:
                buf[name].zero_()
    elif launch:
        grid, args, constexprs, num_warps = _bwd_launch(buf, fwd, z, dout.contiguous(), delta_softplus, design)
        _selective_scan_bwd_kernel[grid](**args, **constexprs, num_warps=num_warps)
    dB, dC = buf["dB"].sum(2), buf["dC"].sum(2)
    if B.dim() == 3:
        dB, dC = dB.squeeze(1), dC.squeeze(1)
    return (buf["du"], buf["ddelta"], buf["dA"].sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else buf["dD"].sum(0).to(D.dtype), buf["dz"],
            None if delta_bias is None else buf["dbias"].sum(0).to(delta_bias.dtype))
