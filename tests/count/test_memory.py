"""Memory prediction: the fake trace equals the real one, closed forms, the allocator model, the CLI."""
import importlib

import math

import pandas as pd
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vimbench.count.memory as mem
from vimbench.analysis.paper import paper_gib
from vimbench.config import MemoryConfig
from vimbench.rows.memory import memory_row
from vimbench.kernels.selective_scan import ops as ss_ops
from vimbench.kernels.selective_scan.backends import REGISTRY, scan_backward
from vimbench.baselines.deit import create_deit
from vimbench.commands import main
from vimbench.rows.schema import MEMORY
from vimbench.kernels.attention import attention, modelled_card, prefers_cudnn, sdpa_fused_kernel
from vimbench.models.vim import VisionMamba
from helpers import fresh_plugins, register_forward_only_scan  # noqa: F401  (fresh_plugins: a fixture)

ss = importlib.import_module("vimbench.kernels.selective_scan")
MiB = 1 << 20

REAL_SCANS = {torch.ops.vimbench.selective_scan.default:
              lambda *a: REGISTRY[a[-1]].forward(*a[:-1], return_last_state=True),
              torch.ops.vimbench.bidirectional_scan.default:
              lambda *a: ss.bidirectional_scan_ref(*a[:-1], scan=REGISTRY[a[-1]].forward)}
"""The scan ops run op by op under the tracker with their real implementations (``ref`` and ``cpu``)."""


def traced(fn, *args):
    """Trace of ``fn(*args)`` under the tracker (inputs made before it are not in the trace)."""
    trace = mem.AllocationTrace()
    with mem.AllocationTracker(trace), torch.no_grad():
        out = fn(*args)
    del out
    return trace


def scan_inputs(b, E, L, N):
    """The 17 arguments of vimbench::bidirectional_scan (as Vim passes them, z included), on CPU."""
    t = lambda *s: torch.randn(*s)  # noqa: E731
    one = [t(b, E, L), t(b, E, L), -torch.rand(E, N), t(b, N, L), t(b, N, L), t(E)]
    two = [t(b, E, L), t(b, E, L), -torch.rand(E, N), t(b, N, L), t(b, N, L), t(E)]
    return one + two + [t(b, E, L), t(E), t(E), True]


def fake_copy(args):
    return [torch.empty_like(a) if isinstance(a, torch.Tensor) else a for a in args]


# Shapes: multi-chunk (L > scan_cpu.CHUNK) with a short last chunk for cpu; a short L for the slow ref loop.
# Five chunks: the fake run skips the middle ones (scan_cpu), and must still match.
@pytest.mark.parametrize("backend,b,E,L,N", [("cpu", 2, 64, 150, 16), ("cpu", 1, 128, 40, 16),
                                             ("cpu", 1, 32, 300, 16), ("ref", 2, 64, 24, 16), ("ref", 1, 128, 9, 4)],
                         ids=["cpu-3chunks", "cpu-1chunk", "cpu-5chunks", "ref", "ref-N4"])
def test_scan_fakes_allocate_what_the_backend_allocates(backend, b, E, L, N):
    args = scan_inputs(b, E, L, N)
    one_dir = args[:6] + [args[12], args[13], True]           # u, delta, A, B, C, D, z, delta_bias, softplus
    for op, fake, real_args in ((torch.ops.vimbench.bidirectional_scan.default, ss.bidirectional_scan_fake, args),
                                (torch.ops.vimbench.selective_scan.default, ss.selective_scan_fake, one_dir)):
        real = traced(REAL_SCANS[op], *real_args, backend)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake_args = fake_copy(real_args)
            fake = traced(fake, *fake_args, backend)
        assert fake.peak_live() == real.peak_live() > 0, op


def tiny_vim(scan, res):
    return VisionMamba(res, embed_dim=64, depth=2, scan=scan)


@pytest.mark.parametrize("build,shape", [
    (lambda: tiny_vim("cpu", 192), (1, 3, 192, 192)),      # 145 tokens: two scan chunks
    (lambda: tiny_vim("ref", 64), (2, 3, 64, 64)),
    (lambda: create_deit("tiny", 64, "eager"), (2, 3, 64, 64)),
], ids=["vim-cpu", "vim-ref", "deit-eager"])
def test_fake_trace_equals_real_cpu_trace(build, shape):
    """The whole prediction pipeline on fake CPU tensors against the same model run for real on the CPU,
    the scan ops traced op by op: same live peak, same allocator peaks."""
    real_model = build().eval()
    with torch.device("meta"):
        meta_model = build().eval()
    real = mem.trace_forward(real_model, shape, torch.float32, False, device="cpu", inline=REAL_SCANS)
    fake = mem.trace_forward(meta_model, shape, torch.float32, False, device="cpu", inline=mem.SCAN_FAKES)
    assert fake.n_weights == real.n_weights
    assert fake.peak_live() == real.peak_live()
    r = mem.CachingAllocatorModel().replay(real.events)
    f = mem.CachingAllocatorModel().replay(fake.events)
    assert (f.peak_allocated, f.peak_reserved) == (r.peak_allocated, r.peak_reserved)
    weights = sum(mem.round_request(t.untyped_storage().nbytes())
                  for t in [*real_model.parameters(), *real_model.buffers()])
    assert f.peak_allocated > weights


@pytest.mark.parametrize("build,shape", [
    (lambda: tiny_vim("cpu", 64), (1, 3, 64, 64)),
    (lambda: create_deit("tiny", 64, "eager"), (2, 3, 64, 64)),
], ids=["vim-cpu", "deit-eager"])
def test_fake_trace_under_autocast_equals_real_cpu_trace(build, shape):
    """Autocast (bf16, fp32 weights) on fake tensors allocates what it allocates for real: the weights' bf16
    copies, cached until the forward ends, and half-size activations."""
    real_model = build().eval()
    with torch.device("meta"):
        meta_model = build().eval()
    real = mem.trace_forward(real_model, shape, torch.float32, False, device="cpu", inline=REAL_SCANS, amp="bf16")
    fake = mem.trace_forward(meta_model, shape, torch.float32, False, device="cpu", inline=mem.SCAN_FAKES, amp="bf16")
    plain = mem.trace_forward(real_model, shape, torch.float32, False, device="cpu", inline=REAL_SCANS)
    assert fake.peak_live() == real.peak_live() != plain.peak_live()
    r = mem.CachingAllocatorModel().replay(real.events)
    f = mem.CachingAllocatorModel().replay(fake.events)
    assert (f.peak_allocated, f.peak_reserved) == (r.peak_allocated, r.peak_reserved)


def test_autocast_on_fake_cuda_tensors_without_a_gpu():
    """torch.autocast("cuda") disables itself where CUDA is unavailable; the prediction's must not."""
    with FakeTensorMode(), mem.fake_autocast("cuda", "fp16"):
        out = torch.nn.functional.linear(torch.empty(2, 8, device="cuda"), torch.empty(4, 8, device="cuda"))
    assert out.dtype == torch.float16 and out.device.type == "cuda"
    fp32 = mem.predict_memory(MemoryConfig("deit_tiny", {"attn": "sdpa"}, 64, 2))
    amp = mem.predict_memory(MemoryConfig("deit_tiny", {"attn": "sdpa"}, 64, 2), amp="fp16")
    assert amp.mem_pred_weights_gib == fp32.mem_pred_weights_gib
    assert amp.mem_pred_peak_gib != fp32.mem_pred_peak_gib
    # SDPA's modelled pick for fp32 and fp16 inputs on the default card (an H100: cuDNN or flash for fp16,
    # by torch's rule, tested with the rule itself in tests/kernels/test_probes.py)
    assert (fp32.kernel, amp.kernel) == ("efficient", sdpa_fused_kernel(torch.float16, (9, 0)))


def test_attention_scores_closed_form():
    """Eager keeps the (b, H, L, L) scores and their softmax; fused kernels only the output (b, H, L, d)
    and, for flash, the logsumexp (b, H, L) float32. Sizes chosen as multiples of 512 B."""
    b, H, L, d = 2, 3, 64, 32
    scores, out = b * H * L * L * 4, b * H * L * d * 4
    peaks = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for dtype in (torch.float32, torch.float16):
            q, k, v = (torch.empty(b, H, L, d, device="cuda", dtype=dtype) for _ in range(3))
            for backend in ("eager", "efficient", "sdpa", "flash", "cudnn"):
                if backend in ("flash", "cudnn") and dtype == torch.float32:
                    continue
                with modelled_card((8, 0)):  # an A100: flash first for half precision in every torch but 2.5
                    peaks[backend, dtype] = traced(attention, q, k, v, backend).peak_live()
            with modelled_card((9, 0)):
                peaks["sdpa on sm_90", dtype] = traced(attention, q, k, v, "sdpa").peak_live()
    assert peaks["eager", torch.float32] == 2 * scores + out
    assert peaks["efficient", torch.float32] == peaks["sdpa", torch.float32] == out
    assert peaks["sdpa on sm_90", torch.float32] == out
    assert peaks["eager", torch.float32] - peaks["efficient", torch.float32] == 2 * scores
    flash = out // 2 + mem.round_request(b * H * L * 4)
    assert peaks["cudnn", torch.float16] == out // 2
    assert peaks["flash", torch.float16] == flash
    assert peaks["sdpa", torch.float16] == (out // 2 if prefers_cudnn((8, 0)) else flash)
    assert peaks["sdpa on sm_90", torch.float16] == (out // 2 if prefers_cudnn((9, 0)) else flash)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(b, H, L, d, device="cuda")
        with pytest.raises(ss.BackendUnavailable):
            attention(q, q, q, "flash")


@pytest.mark.parametrize("torch_version,cudnn,cuda,capability,expected", [
    ("2.11.0+cu130", 91600, "13.0", (9, 0), True),    # H100/H200, cuDNN 9.16: cuDNN first
    ("2.11.0+cu130", 91500, "13.0", (9, 0), False),   # cuDNN 9.15.0 is not > 91500
    ("2.11.0+cu128", 91600, "12.8", (10, 0), True),   # B200
    ("2.11.0+cu128", 91600, "12.8", (10, 1), False),  # minor 1 on a CUDA 12 build
    ("2.11.0+cu130", 91600, "13.0", (10, 1), True),   # ... allowed on a CUDA 13 build
    ("2.11.0+cu130", 91600, "13.0", (8, 0), False),   # A100: flash first
    ("2.11.0+cu130", 0, "13.0", (9, 0), False),       # no cuDNN
    ("2.9.1+cu128", 91600, "12.8", (9, 0), False),    # before 2.11: flash first
    ("2.5.0+cu124", 90100, "12.4", (8, 0), True),     # 2.5.0: cuDNN first everywhere
])
def test_prefers_cudnn_follows_torchs_rule(torch_version, cudnn, cuda, capability, expected, monkeypatch):
    monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", raising=False)
    assert prefers_cudnn(capability, torch_version, cudnn, cuda) is expected
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    assert prefers_cudnn(capability, torch_version, cudnn, cuda) is (expected and torch_version.startswith("2.5"))


def test_sdpa_fused_kernel_per_card():
    """fp32 never takes flash or cuDNN; a V100 (sm_70) has neither; half precision on sm_90 takes cuDNN
    exactly when the installed torch prefers it (prefers_cudnn)."""
    assert sdpa_fused_kernel(torch.float32, (9, 0)) == sdpa_fused_kernel(torch.float32, (8, 0)) == "efficient"
    assert sdpa_fused_kernel(torch.float16, (7, 0)) == "efficient"
    assert sdpa_fused_kernel(torch.bfloat16, (8, 0)) == ("cudnn" if prefers_cudnn((8, 0)) else "flash")
    assert sdpa_fused_kernel(torch.bfloat16, (9, 0)) == ("cudnn" if prefers_cudnn((9, 0)) else "flash")
    with modelled_card((7, 0)):
        assert sdpa_fused_kernel(torch.float16) == "efficient"


def test_memory_rows_model_sdpa_per_card():
    h100, v100 = (memory_row(MemoryConfig("deit_tiny", {"attn": "sdpa"}, 64, 1, "bf16", card=card), {}, paper_gib)
                  for card in ("h100-80gb", "v100-32gb"))
    assert h100["kernel"] == sdpa_fused_kernel(torch.bfloat16, (9, 0)) and v100["kernel"] == "efficient"


def test_deit_eager_vs_fused_differ_by_the_scores():
    """Whole model: the peaks differ by the two (b, H, L, L) tensors, up to what else is live at each peak."""
    b, res = 1, 512                          # L = 1025: the scores are the largest tensors
    L, H = (res // 16) ** 2 + 1, 3
    eager = mem.predict_memory(MemoryConfig("deit_tiny", {"attn": "eager"}, res, b))
    fused = mem.predict_memory(MemoryConfig("deit_tiny", {"attn": "sdpa"}, res, b))
    assert fused.impl == "sdpa" and fused.kernel == "efficient"
    diff = (eager.mem_pred_peak_gib - fused.mem_pred_peak_gib) * mem.GIB
    scores, slack = b * H * L * L * 4, 4 * b * L * 4 * 192 * 4   # slack: a few (b, L, 4D) MLP activations
    assert 2 * scores - slack <= diff <= 2 * scores + slack


@pytest.mark.parametrize("model,dtype,nbytes", [("deit_tiny", "fp32", 4), ("vim_tiny", "fp32", 4),
                                                 ("vim_tiny", "bf16", 2)])
def test_weights_are_params_times_element_size(model, dtype, nbytes):
    pred = mem.predict_memory(MemoryConfig(model, res=64, dtype=dtype))
    with torch.device("meta"):
        n_tensors = sum(1 for _ in mem.create_model(model, img_size=64).state_dict())
    exact = pred.params * nbytes
    assert exact <= pred.mem_pred_weights_gib * mem.GIB < exact + 512 * n_tensors
    assert pred.mem_pred_peak_gib > pred.mem_pred_weights_gib + 1 * 3 * 64 * 64 * nbytes / mem.GIB


def test_caching_allocator_model():
    trace = mem.AllocationTrace()
    small = trace.alloc(100)                 # -> 512 B from a 2 MiB small segment
    trace.alloc(11 * MiB + 1)                # >= 10 MiB: its own segment, rounded up to 12 MiB; not split
    big = trace.alloc(3 * MiB)               # -> a new 20 MiB large segment, split
    trace.alloc(3 * MiB)                     # from the remainder
    trace.free(big)
    trace.alloc(2 * MiB)                     # best fit: the freed 3 MiB block, not split (only 1 MiB left)
    trace.free(small)
    sim = mem.CachingAllocatorModel().replay(trace.events)
    assert sim.reserved == sim.peak_reserved == 2 * MiB + 12 * MiB + 20 * MiB
    assert sim.allocated == 12 * MiB + 3 * MiB + 3 * MiB
    assert sim.peak_allocated == 512 + 18 * MiB
    assert trace.peak_live() == 512 + mem.round_request(11 * MiB + 1) + 6 * MiB


def test_paper_preset_rows_carry_the_papers_values(tmp_path, capsys):
    path = tmp_path / "paper.csv"
    assert main(["memory", "--preset", "paper", "--res", "1248", "--out", str(path)]) == 0
    df = pd.read_csv(path)
    assert list(df["model"]) == ["vim_tiny", "deit_tiny", "deit_tiny"] and set(df["res"]) == {1248}
    assert (df["batch"] == 64).all() and (df["dtype"] == "fp32").all()
    assert df["mem_pred_used_gib"].tolist() == (df["mem_pred_reserved_gib"] + mem.CONTEXT_GIB).tolist()
    vim, eager, sdpa = df.itertuples()
    assert vim.paper_gib == 11.14 and math.isnan(eager.paper_gib) and math.isnan(sdpa.paper_gib)
    out = capsys.readouterr().out
    assert "| deit_tiny | eager | eager | 1248 | 6085 | OOM |" in out and "| 11.14 |" in out


@pytest.mark.parametrize("argv,msg", [
    (["--models", "vim_huge"], "unknown model 'vim_huge'"),
    (["--attn", "fast"], "unknown attention backend 'fast'"),
    (["--scan", "fast"], "unknown scan backend 'fast'"),
    (["--card", "tpu"], "--card 'tpu': unknown"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--res", "1248..224"], "runs backwards"),
    (["--res", "abc"], "cannot read resolution"),
    (["--dtype", "fp8"], "'fp8' is not one of"),
    (["--attn", "flash"], "needs --dtype fp16 or bf16"),
    (["--mode", "training"], "--mode 'training': unknown"),
    (["--mode", "infer", "--grad-checkpointing"], "add train to --mode"),
])
def test_bad_input_is_one_line_exit_2(argv, msg, capsys):
    assert main(["memory", *argv]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and msg in err and "Traceback" not in err and not out


def test_unwritable_out_exits_2_before_work(tmp_path, capsys):
    assert main(["memory", "--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "is a directory" in err and not out


def test_cli_writes_csv(tmp_path, capsys):
    path = tmp_path / "mem.csv"
    argv = ["memory", "--models", "vim_tiny,deit_tiny", "--attn", "eager,sdpa", "--res", "64", "--batch", "2",
            "--card", "rtx4090-24gb", "--out", str(path)]
    assert main(argv) == 0
    df = pd.read_csv(path)
    assert list(df.columns) == MEMORY.columns and len(df) == 3
    assert set(df["impl"]) in ({"triton", "eager", "sdpa"}, {"cpu", "eager", "sdpa"})
    assert df.set_index("impl").loc["sdpa", "kernel"] == "efficient"
    assert df["fits"].all() and (df["card_gib"] == mem.CARDS["rtx4090-24gb"]).all()
    assert (df["mem_pred_reserved_gib"] >= df["mem_pred_peak_gib"]).all()


class TinyLinear(torch.nn.Module):
    """forward_features: one bias-free Linear (K -> M), the smallest model with a train step."""

    def __init__(self, K, M):
        super().__init__()
        self.fc = torch.nn.Linear(K, M, bias=False)

    def forward_features(self, x):
        return self.fc(x)


def test_train_step_closed_form_linear():
    """A train step of y = x W^T, W (M, K), x (b, K), fp32, sizes multiples of 512 B, the loss mean(y^2). The
    second step peaks in the backward of the matmul: the weights, the input, the momentum buffer (made by the
    first step's optimizer and kept), the gradient of y and the weight's gradient, plus two scalars (the loss
    and its gradient, 512 B each). The first step peaks in its optimizer step: weights, input, gradient and the
    momentum buffer it makes."""
    K, M, b = 256, 384, 8
    W, x, dy = M * K * 4, b * K * 4, b * M * 4
    steady, first = (mem.trace_train_step(_meta_linear(K, M), (b, K), torch.float32, False, steps=s).peak_live()
                     for s in (2, 1))
    assert steady == W + x + W + dy + W + 2 * 512   # weights, input, momentum, dy, dW, two scalars
    assert first == W + x + W + W                   # weights, input, dW, the new momentum buffer


def _meta_linear(K, M):
    with torch.device("meta"):
        return TinyLinear(K, M)


def test_fake_train_trace_equals_real_cpu_trace():
    """Two train steps of a tiny DeiT (eager attention) on fake tensors against the same steps run for real on
    the CPU: same weights, same live peak, same allocator peaks."""
    shape = (2, 3, 32, 32)
    real = mem.trace_train_step(create_deit("tiny", 32, "eager"), shape, torch.float32, False)
    with torch.device("meta"):
        fake = mem.trace_train_step(create_deit("tiny", 32, "eager"), shape, torch.float32, False)
    assert fake.n_weights == real.n_weights and fake.peak_live() == real.peak_live()
    r, f = (mem.CachingAllocatorModel().replay(t.events) for t in (real, fake))
    assert (f.peak_allocated, f.peak_reserved) == (r.peak_allocated, r.peak_reserved)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_deit_train_peak_holds_what_autograd_saves(attn):
    """The train step's peak exceeds the inference peak by at least the gradients and momentum buffers
    (one parameter size each), and eager attention's by the (b, H, L, L) probabilities autograd saves in
    each of the 12 blocks; checkpointing per block saves one block's at a time and lowers the peak."""
    b, res, H = 2, 256, 3
    L = (res // 16) ** 2 + 1
    infer = mem.predict_memory(MemoryConfig("deit_tiny", {"attn": attn}, res, b))
    train = mem.predict_memory(MemoryConfig("deit_tiny", {"attn": attn}, res, b, mode="train"))
    ckpt = mem.predict_memory(MemoryConfig("deit_tiny", {"attn": attn}, res, b, mode="train",
                                           grad_checkpointing=True))
    extra = (train.mem_pred_peak_gib - infer.mem_pred_peak_gib) * mem.GIB
    probs = 12 * b * H * L * L * 4 if attn == "eager" else 0
    assert extra >= 2 * train.params * 4 + probs
    assert ckpt.mem_pred_peak_gib < train.mem_pred_peak_gib
    assert train.mem_pred_weights_gib == infer.mem_pred_weights_gib


def test_train_prediction_refuses_a_forward_only_scan_backend(fresh_plugins, capsys):
    name = register_forward_only_scan()
    with pytest.raises(mem.BackendUnavailable, match="forward-only"):
        mem.predict_memory(MemoryConfig("vim_tiny", {"scan": name}, 64, mode="train"))
    assert main(["memory", "--scan", name, "--mode", "infer,train", "--res", "64"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--scan {name}: " in err and "forward-only" in err


def _real_bidir_bwd(*a):
    """``vimbench::bidirectional_scan_bwd`` run op by op under the tracker with its real implementation."""
    *tensors, dout, softplus, backend = a
    return ss_ops._present(*ss_ops._bidir_backward(REGISTRY[backend].forward, scan_backward(backend), *tensors,
                                                   softplus, dout))


def test_fake_vim_train_trace_equals_real_cpu_trace():
    """Two train steps of a tiny Vim (chunked cpu scan) on fake tensors against the same steps run for real on
    the CPU, the scan ops and their backwards traced op by op: same live peak, same allocator peaks."""
    inline = {**REAL_SCANS, torch.ops.vimbench.bidirectional_scan_bwd.default: _real_bidir_bwd}
    shape = (1, 3, 64, 64)
    real = mem.trace_train_step(tiny_vim("cpu", 64), shape, torch.float32, False, inline=inline)
    with torch.device("meta"):
        fake = mem.trace_train_step(tiny_vim("cpu", 64), shape, torch.float32, False, inline=mem.SCAN_FAKES)
    assert fake.n_weights == real.n_weights and fake.peak_live() == real.peak_live()
    r, f = (mem.CachingAllocatorModel().replay(t.events) for t in (real, fake))
    assert (f.peak_allocated, f.peak_reserved) == (r.peak_allocated, r.peak_reserved)


def test_vim_checkpointing_lowers_the_train_peak():
    """Activation checkpointing per block (Vim's set_grad_checkpointing) keeps one block's saved tensors at a
    time: a tiny Vim whose activations outweigh its weights peaks lower with it."""
    peaks = []
    for ckpt in (False, True):
        with torch.device("meta"):
            model = VisionMamba(128, embed_dim=32, depth=4, scan="cpu")
        peaks.append(mem.trace_train_step(model, (4, 3, 128, 128), torch.float32, False, ckpt,
                                          inline=mem.SCAN_FAKES, steps=1).peak_live())
    assert peaks[1] < 0.8 * peaks[0]
