"""A microbenchmark of the GPU's exp2 throughput (the SFU), for the scan's compute floor.

Each program holds BLOCK values in registers and applies ``x = exp2(x * c)`` ITERS times (c < 0 keeps x in
(0, 1], so no inf/NaN), then stores x so the chain cannot be optimised away. Exp2 count = numel * ITERS;
the single multiply per exp2 is an FMA-pipe op and does not limit an SFU-bound loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ITERS = 256
BLOCK = 1024


@triton.jit
def _exp2_chain_kernel(x_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    for _ in range(ITERS):
        x = tl.exp2(x * -0.5)
    tl.store(x_ptr + offs, x, mask=mask)


def exp2_chain(x: torch.Tensor, iters: int = ITERS) -> torch.Tensor:
    """x (any shape, float32, contiguous) <- exp2(-x/2) applied ``iters`` times, in place; returns x."""
    n = x.numel()
    _exp2_chain_kernel[(triton.cdiv(n, BLOCK),)](x, n, ITERS=iters, BLOCK=BLOCK, num_warps=4)
    return x


def exp2_chain_ref(x: torch.Tensor, iters: int = ITERS) -> torch.Tensor:
    """The same chain in plain PyTorch (float64 for the oracle)."""
    for _ in range(iters):
        x = torch.exp2(x * -0.5)
    return x


def measure_exp2_rate(device="cuda", numel: int = 1 << 26) -> float:
    """Measured exp2 per second on ``device``'s GPU (a 256 MiB float32 buffer, 256 exp2 per element)."""
    from triton.testing import do_bench
    x = torch.rand(numel, device=device)
    ms = do_bench(lambda: exp2_chain(x), warmup=25, rep=200)
    return numel * ITERS / (ms * 1e-3)
