"""Vision Mamba (Vim), arXiv 2401.09417, as released in github.com/hustvl/Vim (vim/models_mamba.py with
its fork of mamba_ssm's mamba_simple.py): the "bimamba v2, middle cls token, divide-by-2" models.

Architecture, initialisation and state_dict keys follow the official checkpoints, so that an official
checkpoint loads with ``strict=True``. Differences from the official code, all numerically neutral:
  * no dependency on mamba_ssm / causal_conv1d: RMSNorm is PyTorch's; the scan is the backend chosen with
    ``scan=`` (see ``vimbench.kernels.selective_scan``); the two causal convs with their SiLU run through
    ``vimbench.kernels.causal_conv``: its compiled kernel with the ``cpp`` scan (as the official fast path
    pairs mamba_ssm's CUDA scan with causal_conv1d's kernel), F.conv1d with every other backend; likewise the
    residual add with RMSNorm runs through ``vimbench.kernels.rms_norm`` (its compiled kernel with the ``cpp``
    scan, as the official fused add-norm; nn.RMSNorm's computation otherwise);
  * the scan backend is resolved once per forward and handed to every layer;
  * both directions run on every path (the official eager path silently drops the backward direction);
  * the backward direction is computed in original token order: its causal conv over the flipped
    sequence is an anti-causal conv over the original one, and its scan runs from the last token to the
    first, so no flipped copies of activations are made (``kernels.bidirectional_scan``).
Shapes: b batch, M tokens (patches + the cls token), D embed_dim, E = 2*D channels, N d_state, R dt_rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import lecun_normal_, trunc_normal_

from vimbench.kernels import (add_rms_norm, causal_conv1d_pair, resolve_scan_backend, run_bidirectional_scan,
                              scan_choices)
from vimbench.kernels.selective_scan.backends import record


class PatchEmbed(nn.Module):
    """Conv2d(3, D, patch, stride) over an (img_size x img_size) image; grid ((img - patch) // stride + 1)^2."""

    def __init__(self, img_size: int, patch_size: int, stride: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.img_size = img_size
        self.grid_size = (img_size - patch_size) // stride + 1
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x):  # (b, 3, H, W) -> (b, M-1, D)
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, this model was built for img_size={self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


def fused_impl(scan: str) -> str:
    """The implementation of the causal convs and of the add + RMSNorm that goes with scan backend ``scan``: its
    record's ``companion_impl`` (the compiled CPU kernels with ``cpp``, PyTorch's ops otherwise)."""
    return record(scan).companion_impl


class BiMambaMixer(nn.Module):
    """The bidirectional Mamba mixer ("bimamba v2"): shared in_proj and out_proj, separate conv1d, x_proj,
    dt_proj, A_log and D per direction. (b, M, D) -> (b, M, D)."""

    def __init__(self, d_model: int, depth: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, scan: str = "auto"):
        super().__init__()
        E, R, N = expand * d_model, math.ceil(d_model / 16), d_state
        self.d_inner, self.dt_rank, self.d_state, self.d_conv = E, R, N, d_conv
        self.scan = scan
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.A_b_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.conv1d_b = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj_b = nn.Linear(R, E)
        self.D_b = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=False)

        # Official init: dt_proj weight U(-R^-0.5, R^-0.5); dt_proj bias = softplus^-1(dt) with
        # dt ~ exp(U(log dt_min, log dt_max)) clamped at dt_init_floor; every other Linear bias zero
        # (that includes dt_proj_b.bias); out_proj re-drawn (kaiming-uniform) and scaled by 1/sqrt(depth).
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            nn.init.zeros_(self.dt_proj_b.bias)
            nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
            self.out_proj.weight /= math.sqrt(depth)

    def _ssm_inputs(self, x, x_proj, dt_proj):
        """x (b, E, M) after conv+silu -> delta (b, E, M) without bias, B and C (b, N, M), all three
        (b, channels, M) views of time-major (b, M, channels) memory."""
        x_dbl = x_proj(x.transpose(1, 2))                                      # (b, M, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)                     # (b, E, M)
        return delta, B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, h, scan: str | None = None):
        """h (b, M, D) -> (b, M, D). ``scan``: the concrete backend to run (the model resolves it once per
        forward); None resolves ``self.scan`` here."""
        # Every (b, channels, M) tensor below is a view of time-major (b, M, channels) memory, except the conv
        # outputs of the torch conv path (contiguous (b, E, M)); the scan's entry point copies its inputs to the
        # layout the backend reads (one whose record is ``strided``, the cpp scan, reads them as they are).
        scan = resolve_scan_backend(self.scan, h.device) if scan is None else scan
        xz = self.in_proj(h).transpose(1, 2)                                    # (b, 2E, M)
        x, z = xz.chunk(2, dim=1)
        xf, xb = causal_conv1d_pair(x, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight,
                                    self.conv1d_b.bias, impl=fused_impl(scan))
        delta_f, B_f, C_f = self._ssm_inputs(xf, self.x_proj, self.dt_proj)
        delta_b, B_b, C_b = self._ssm_inputs(xb, self.x_proj_b, self.dt_proj_b)
        y = run_bidirectional_scan(
            scan, xf, delta_f, -torch.exp(self.A_log.float()), B_f, C_f, self.D.float(),
            xb, delta_b, -torch.exp(self.A_b_log.float()), B_b, C_b, self.D_b.float(),
            z, self.dt_proj.bias.float(), self.dt_proj_b.bias.float(), True)
        return self.out_proj(y.transpose(1, 2)) / 2  # = out_proj(y / 2): out_proj has no bias


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, returning (mixer output, residual); the residual is kept in float32."""

    def __init__(self, dim: int, depth: int, d_state: int, scan: str):
        super().__init__()
        self.mixer = BiMambaMixer(dim, depth, d_state=d_state, scan=scan)
        self.norm = nn.RMSNorm(dim, eps=1e-5)

    def forward(self, hidden, residual, scan: str):
        """hidden (b, M, D), residual None or (b, M, D) float32; ``scan`` the resolved scan backend."""
        normed, residual = add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, impl=fused_impl(scan))
        return self.mixer(normed, scan), residual


class VisionMamba(nn.Module):
    """Vim backbone + classifier head. ``forward_features`` (b, 3, img, img) -> (b, D) cls features."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, stride: int = 16, embed_dim: int = 192,
                 depth: int = 24, d_state: int = 16, num_classes: int = 1000, scan: str = "auto"):
        super().__init__()
        if scan not in scan_choices():
            raise ValueError(f"unknown scan backend {scan!r}; choose from {', '.join(scan_choices())}")
        if img_size < patch_size:
            raise ValueError(f"img_size {img_size} is smaller than the patch size {patch_size}")
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, embed_dim)
        self.num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.layers = nn.ModuleList(Block(embed_dim, depth, d_state, scan) for _ in range(depth))
        self.norm_f = nn.RMSNorm(embed_dim, eps=1e-5)
        self.head = nn.Linear(embed_dim, num_classes)
        with torch.no_grad():
            lecun_normal_(self.patch_embed.proj.weight)
            nn.init.zeros_(self.patch_embed.proj.bias)
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            trunc_normal_(self.pos_embed, std=0.02)
            trunc_normal_(self.cls_token, std=0.02)
            for layer in self.layers:  # the official init zeroes every Linear bias except dt_proj's
                layer.mixer.dt_proj_b.bias.zero_()

    @property
    def scan(self) -> str:
        """The scan backend requested at construction (may be 'auto'; see ``scan_backend``)."""
        return self.layers[0].mixer.scan

    def set_scan(self, scan: str) -> None:
        """Switches every layer to another scan backend."""
        if scan not in scan_choices():
            raise ValueError(f"unknown scan backend {scan!r}; choose from {', '.join(scan_choices())}")
        for layer in self.layers:
            layer.mixer.scan = scan

    def scan_backend(self, device) -> str:
        """The concrete scan backend a forward pass on ``device`` runs (raises if it can't run there)."""
        return resolve_scan_backend(self.scan, device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (as timm's models offer it): in training with gradients on,
        each block's activations are not kept for the backward but recomputed from its inputs
        (torch.utils.checkpoint, non-reentrant); the results and gradients are unchanged."""
        self.grad_checkpointing = enable

    def forward_features(self, x):
        scan = self.scan_backend(x.device)                                      # once per forward, for every layer
        x = self.patch_embed(x)                                                 # (b, M-1, D)
        mid = x.shape[1] // 2
        x = torch.cat((x[:, :mid], self.cls_token.expand(x.shape[0], -1, -1), x[:, mid:]), dim=1)
        hidden, residual = x + self.pos_embed, None
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                hidden, residual = checkpoint(layer, hidden, residual, scan, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, scan)
        hidden, _ = add_rms_norm(hidden, residual, self.norm_f.weight, self.norm_f.eps, impl=fused_impl(scan))
        return hidden[:, mid]

    def forward(self, x):
        return self.head(self.forward_features(x))
