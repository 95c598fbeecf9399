"""FLOP counts against closed forms derived here, independently of the counter (2 FLOPs per multiply-add)."""
import math

import pytest

from vimbench.config import FlopsConfig
from vimbench.count.flops import count_flops
from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.ops import scan_bwd_flops


def deit_closed_form(res, D, depth=12, b=1):
    P = (res // 16) ** 2
    L = P + 1
    patch = 2 * b * P * (3 * 16 * 16) * D
    linear_per_layer = 2 * b * L * (D * 3 * D + D * D + 2 * D * 4 * D)   # qkv, proj, fc1 + fc2
    attention_per_layer = 4 * b * L * L * D                               # QK^T and AV over all heads
    return dict(linear=patch + depth * linear_per_layer, attention=depth * attention_per_layer)


def vim_closed_form(res, D, depth=24, N=16, b=1):
    P = (res // 16) ** 2
    L, E, R = P + 1, 2 * D, math.ceil(D / 16)
    patch = 2 * b * P * (3 * 16 * 16) * D
    per_dir = 2 * b * L * (E * 4 + E * (R + 2 * N) + R * E)              # depthwise conv k=4, x_proj, dt_proj
    linear_per_layer = 2 * b * L * (D * 2 * E + E * D) + 2 * per_dir     # in_proj, out_proj, both directions
    # scan per direction: 7 per (e, t, n); per (e, t): delta*u, bias, softplus, D skip (2); then the sum of
    # the two directions (1) and the silu(z) gate (3) once
    scan_per_layer = 2 * b * E * L * (7 * N + 1 + 1 + 1 + 2) + b * E * L * (1 + 3)
    return dict(linear=patch + depth * linear_per_layer, scan=depth * scan_per_layer)


@pytest.mark.parametrize("res", [224, 1248])
@pytest.mark.parametrize("name,D", [("deit_tiny", 192), ("deit_small", 384)])
def test_deit_flops_closed_form(name, D, res):
    got, want = count_flops(FlopsConfig(name, {"attn": "eager"}, res)), deit_closed_form(res, D)
    assert got.flops_linear == want["linear"]
    assert got.flops_attention == want["attention"]
    assert got.flops_scan == 0 and got.flops_other == 0
    assert got.flops_total == want["linear"] + want["attention"]


@pytest.mark.parametrize("scan", ["cpu", "cpp"])
@pytest.mark.parametrize("res", [224, 1248])
def test_vim_flops_closed_form(res, scan):
    """Every path counts the same: the custom scan op (cpu) and the compiled ops the cpp path calls directly
    (scan, causal conv pair, add + RMSNorm)."""
    if scan == "cpp" and not compiled_cpu.available()[0]:
        pytest.skip(f"compiled CPU kernels unavailable: {compiled_cpu.available()[1]}")
    got, want = count_flops(FlopsConfig("vim_tiny", {"scan": scan}, res)), vim_closed_form(res, 192)
    assert got.flops_linear == want["linear"]
    assert got.flops_scan == want["scan"]
    assert got.flops_attention == 0 and got.flops_total == want["linear"] + want["scan"]


def test_batch_head_and_backend_independence():
    one, four = count_flops(FlopsConfig("deit_tiny", res=224)), count_flops(FlopsConfig("deit_tiny", res=224, batch=4))
    assert four.flops_total == 4 * one.flops_total
    head = count_flops(FlopsConfig("deit_tiny", res=224, head=True))
    assert head.flops_total - one.flops_total == 2 * 192 * 1000
    assert count_flops(FlopsConfig("deit_tiny", {"attn": "sdpa"}, 224)).flops_attention == one.flops_attention


def test_deit_tiny_1248_matches_published_counter_value():
    # tooling-facts.md: FlopCounterMode on timm DeiT-Ti at 1248 counts 407.6 GFLOPs
    assert round(count_flops(FlopsConfig("deit_tiny", res=1248)).flops_total / 1e9, 1) == 407.6


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_deit_train_flops_closed_form(attn, grad_checkpointing):
    """A train step = forward + backward: every matmul's backward is 2x its forward (grad input, grad weight),
    the patch embedding's 1x (its input needs no gradient), attention's 4 batched matmuls 2x. Checkpointing
    runs each block's forward once more up to its last saved tensor (torch.utils.checkpoint's early stop):
    qkv, proj, fc1 and attention (8 D^2 of the block's 12 D^2 of projections), not fc2, whose output the
    backward does not need."""
    res, D = 32, 192
    fwd = deit_closed_form(res, D)
    patch = 2 * 1 * (res // 16) ** 2 * (3 * 16 * 16) * D
    blocks = fwd["linear"] - patch
    got = count_flops(FlopsConfig("deit_tiny", {"attn": attn}, res, mode="train",
                                  grad_checkpointing=grad_checkpointing))
    again = int(grad_checkpointing)
    assert got.flops_linear == 2 * patch + 3 * blocks + again * blocks * 8 // 12
    assert got.flops_attention == (3 + again) * fwd["attention"]
    assert got.flops_scan == 0 and got.flops_other == 0


@pytest.mark.parametrize("scan", ["cpu", "ref", "cpp"])
def test_vim_train_flops_closed_form(scan):
    """A Vim train step: every matmul and convolution (the depthwise conv1d included, whose weight gradient
    torch's own formula counts E times over) 3x its forward, the patch embedding 2x; the scan part is the
    forward's plus per layer each direction's ``scan_bwd_flops`` and the shared gate's backward (8 per
    (b, e, t))."""
    if scan == "cpp" and not compiled_cpu.available()[0]:
        pytest.skip(compiled_cpu.available()[1])
    res, D, b, N = 64, 192, 2, 16
    L, E = (res // 16) ** 2 + 1, 2 * D
    fwd = vim_closed_form(res, D, b=b)
    patch = 2 * b * (res // 16) ** 2 * (3 * 16 * 16) * D
    one_direction = scan_bwd_flops(b, E, L, N, has_D=True, has_z=False, has_delta_bias=True, delta_softplus=True)
    got = count_flops(FlopsConfig("vim_tiny", {"scan": scan}, res, b, mode="train"))
    assert got.flops_linear == 2 * patch + 3 * (fwd["linear"] - patch)
    assert got.flops_scan == fwd["scan"] + 24 * (2 * one_direction + 8 * b * E * L)
    assert got.flops_attention == 0 and got.flops_other == 0
