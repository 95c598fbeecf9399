"""Vim and DeiT models: official checkpoint layout, parameter counts, init, both directions, any resolution."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from vimbench import count_params, create_model, list_models
from vimbench.errors import InputError
from vimbench.kernels import BackendUnavailable
from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.kernels.selective_scan.ref import selective_scan_ref

VIM = {"vim_tiny": (192, 16), "vim_small": (384, 16), "vim_base": (768, 16), "vim_tiny_s8": (192, 8),
       "vim_small_s8": (384, 8)}


def official_vim_state_dict_shapes(D, stride=16, img=224, depth=24, N=16, classes=1000):
    """Key -> shape of an official hustvl/Vim checkpoint (models_mamba.VisionMamba with mamba_simple.Mamba
    bimamba v2, RMSNorm without bias, middle cls token), written from that module layout."""
    E, R = 2 * D, math.ceil(D / 16)
    M = ((img - 16) // stride + 1) ** 2 + 1
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, M, D), "patch_embed.proj.weight": (D, 3, 16, 16),
            "patch_embed.proj.bias": (D,), "head.weight": (classes, D), "head.bias": (classes,),
            "norm_f.weight": (D,)}
    for i in range(depth):
        p = f"layers.{i}."
        keys[p + "norm.weight"] = (D,)
        keys[p + "mixer.in_proj.weight"] = (2 * E, D)
        keys[p + "mixer.out_proj.weight"] = (D, E)
        for s in ("", "_b"):
            keys[p + f"mixer.conv1d{s}.weight"] = (E, 1, 4)
            keys[p + f"mixer.conv1d{s}.bias"] = (E,)
            keys[p + f"mixer.x_proj{s}.weight"] = (R + 2 * N, E)
            keys[p + f"mixer.dt_proj{s}.weight"] = (E, R)
            keys[p + f"mixer.dt_proj{s}.bias"] = (E,)
            keys[p + f"mixer.A{s}_log"] = (E, N)
            keys[p + f"mixer.D{s}"] = (E,)
    return keys


def test_registry_lists_all_eight_models():
    assert list_models() == sorted(["vim_tiny", "vim_small", "vim_base", "vim_tiny_s8", "vim_small_s8",
                                    "deit_tiny", "deit_small", "deit_base"])


@pytest.mark.parametrize("name", list(VIM))
def test_vim_state_dict_matches_official_layout_and_loads_strict(name):
    D, stride = VIM[name]
    expected = official_vim_state_dict_shapes(D, stride)
    with torch.device("meta"):
        model = create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert count_params(model) == sum(math.prod(s) for s in expected.values())
    if name == "vim_tiny":  # a checkpoint with exactly the official keys loads strictly on a real model
        real = create_model(name)
        real.load_state_dict({k: torch.zeros(s) for k, s in expected.items()}, strict=True)


def test_param_counts_of_all_models():
    """Vim counts from the official layout above; DeiT counts are timm's (DeiT-Ti 5,717,416)."""
    expected = {"vim_tiny": 7_148_008, "vim_small": 25_796_584, "vim_base": 97_598_440,
                "vim_tiny_s8": 7_250_344, "vim_small_s8": 26_001_256,
                "deit_tiny": 5_717_416, "deit_small": 22_050_664, "deit_base": 86_567_656}
    for name, n in expected.items():
        with torch.device("meta"):
            assert count_params(create_model(name)) == n, name


def test_vim_init_follows_official():
    torch.manual_seed(0)
    m = create_model("vim_tiny", img_size=32).layers[3].mixer
    logs = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(384, 16)
    assert torch.equal(m.A_log, logs) and torch.equal(m.A_b_log, logs)
    assert torch.equal(m.D, torch.ones(384)) and torch.equal(m.D_b, torch.ones(384))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(m.dt_proj_b.bias, torch.zeros(384))
    bound = 12 ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in=384), scaled by 1/sqrt(depth=24)
    assert m.out_proj.weight.abs().max() <= (1 / math.sqrt(384)) / math.sqrt(24) + 1e-7


def official_mixer_forward(m, h):
    """The official bimamba-v2 mixer with the backward direction made explicit by flips (what the
    official fused path computes), using the reference scan."""
    M = h.shape[1]
    x, z = m.in_proj(h).transpose(1, 2).chunk(2, dim=1)

    def direction(x, z, conv, x_proj, dt_proj, A_log, D):
        x = F.silu(conv(x)[..., :M])
        dt, B, C = x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(x, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z,
                                  dt_proj.bias, delta_softplus=True)

    y_f = direction(x, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    y_b = direction(x.flip(-1), z.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b).flip(-1)
    return m.out_proj((y_f + y_b).transpose(1, 2) / 2)


@pytest.mark.parametrize("scan", ["ref", "cpu", "cpp"])
def test_mixer_runs_both_directions_like_official(scan):
    if scan == "cpp" and not compiled_cpu.available()[0]:
        pytest.skip(f"compiled CPU kernels unavailable: {compiled_cpu.available()[1]}")
    model = create_model("vim_tiny", img_size=32, scan=scan).eval()
    m = model.layers[0].mixer
    with torch.no_grad():  # a non-zero backward bias so the backward branch is fully exercised
        m.dt_proj_b.bias.normal_()
        h = torch.randn(2, 10, 192)
        assert_close("mixer", official_mixer_forward(m, h), m(h))
        forward_only = m.out_proj(torch.zeros(2, 10, 384))  # sanity: dropping a direction changes the output
        assert not torch.allclose(m(h), forward_only)


def test_vim_compiled_cpu_path_equals_the_reference_model():
    """scan=cpp (compiled scan, convs and add + RMSNorm) against scan=ref (sequential scan, F.conv1d,
    nn.RMSNorm's computation) on the same weights, the whole backbone in float32."""
    if not compiled_cpu.available()[0]:
        pytest.skip(f"compiled CPU kernels unavailable: {compiled_cpu.available()[1]}")
    model = create_model("vim_tiny", img_size=48, scan="ref").eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for layer in model.layers:   # non-trivial norms: weights away from 1
            layer.norm.weight.uniform_(0.5, 1.5)
        ref = model.forward_features(x)
        model.set_scan("cpp")
        assert_close("features", ref, model.forward_features(x))


def test_vim_any_resolution_and_middle_cls_token():
    with torch.device("meta"):
        assert create_model("vim_tiny", img_size=738).num_tokens == 46 * 46 + 1
        assert create_model("vim_tiny_s8", img_size=224).num_tokens == 27 * 27 + 1
        assert create_model("deit_tiny", img_size=738).num_tokens == 46 * 46 + 1
    model = create_model("vim_tiny", img_size=40).eval()  # 2x2 patches, cls at index 2
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 192) and model(x).shape == (1, 1000)
    with pytest.raises(ValueError, match="built for img_size=40"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("attn", ["sdpa", "math", "flash"])
def test_deit_attention_backends_agree_with_eager(attn):
    torch.manual_seed(0)
    eager = create_model("deit_tiny", img_size=50, attn="eager").eval()
    other = create_model("deit_tiny", img_size=50, attn=attn).eval()
    other.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 50, 50)
    with torch.no_grad():
        assert_close(attn, eager.forward_features(x), other.forward_features(x))
    assert other.attn == attn and all(b.attn.backend == attn for b in other.blocks)


def test_deit_state_dict_is_timms():
    import timm
    ours = create_model("deit_tiny", img_size=64, attn="eager")
    theirs = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("attn", ["efficient", "cudnn"])
def test_unavailable_attention_backend_raises_not_falls_back(attn):
    model = create_model("deit_tiny", img_size=32, attn=attn).eval()
    with pytest.raises(BackendUnavailable, match=attn):
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))


def test_bad_names_and_options():
    with pytest.raises(InputError, match="unknown model"):
        create_model("vim_huge")
    with pytest.raises(InputError, match="takes no option 'attn'"):
        create_model("vim_tiny", attn="eager")
    with pytest.raises(InputError, match="unknown scan"):
        create_model("vim_tiny", scan="fast")


def test_timm_models_by_name():
    with torch.device("meta"):
        vit = create_model("timm:vit_tiny_patch16_224", img_size=96, attn="eager")
        assert vit.family == "timm" and vit.attn == "eager" and vit.num_tokens == 37
        cnn = create_model("timm:resnet18", img_size=96)
        assert cnn.family == "timm"


def test_sdpa_kernel_used_names_the_kernel_even_under_inference_mode():
    from vimbench.kernels.attention import _sdpa_choice, sdpa_kernel_used
    _sdpa_choice.cache_clear()
    with torch.inference_mode():
        inside = sdpa_kernel_used("cpu", torch.float32, 77, 64, 3)
    _sdpa_choice.cache_clear()
    assert inside == sdpa_kernel_used("cpu", torch.float32, 77, 64, 3) == "flash"  # torch's flash-style CPU kernel
