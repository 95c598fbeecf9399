"""measure/train.py: the train step (loss, SGD update, phases, NaN check), activation checkpointing, and the
--max-batch search of rows/scaling.py."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from vimbench.config import ScalingConfig
from vimbench.measure import model as measure
from vimbench.measure.core import PhaseClock
from vimbench.measure.train import (LR, GradCheckpointingUnsupported, NonFiniteStep, TrainStep,
                                    enable_grad_checkpointing, train_loss)
from vimbench.models.registry import create_model
from vimbench.models.vim import VisionMamba
from vimbench.rows import scaling as scaling_rows

RES = 32
TRAIN_CFG = ScalingConfig("deit_tiny", {"attn": "eager"}, RES, batch=2, mode="train", warmup=0, repeats=1, min_time=0)


def test_losses_are_the_documented_scalars():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert train_loss(feats, None).item() == pytest.approx(7.5)           # mean of squares: 30 / 4
    logits = torch.zeros(3, 10)                                            # uniform: cross-entropy log(classes)
    assert train_loss(logits, torch.tensor([0, 4, 9])).item() == pytest.approx(math.log(10))


@pytest.mark.parametrize("head", [False, True])
def test_a_step_applies_the_sgd_update_and_marks_three_phases(head):
    model = create_model("deit_tiny", img_size=RES, attn="eager")
    step = TrainStep(model, torch.randn(2, 3, RES, RES), head=head, amp="none")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clock = PhaseClock(torch.device("cpu"))
    step(model if head else model.forward_features, clock)
    assert model.training and len(clock.phases_ms()) == 3 and all(t >= 0 for t in clock.phases_ms())
    changed = 0
    for name, p in model.named_parameters():
        if p.grad is None:  # the unused head of a backbone loss
            assert not head and name.startswith("head") and torch.equal(p, before[name])
            continue
        # first SGD step with momentum: the buffer is the gradient, so p <- p - lr * grad
        torch.testing.assert_close(p.detach(), before[name] - LR * p.grad, rtol=0, atol=1e-7)
        changed += bool((p.grad != 0).any())
    assert changed > 10


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_train_row_has_the_phases_that_make_up_the_step(amp):
    out = measure.measure_model(replace(TRAIN_CFG, amp=amp))
    assert out["repeats"] == 1  # one step: its time is exactly the sum of its phases
    phases = [out["time_fwd_ms"], out["time_bwd_ms"], out["time_opt_ms"]]
    assert all(t > 0 for t in phases) and sum(phases) == pytest.approx(out["time_ms"])
    assert out["throughput_img_s"] == pytest.approx(2 / (out["time_ms"] / 1e3))
    assert out["mem_peak_gib"] > 0


@pytest.mark.slow
def test_a_compiled_train_step_compiles_forward_and_backward_whole():
    out = measure.measure_model(replace(TRAIN_CFG, compile="default"))
    assert out["graph_breaks"] == 0 and out["compile_s"] > 0 and out["time_bwd_ms"] > 0


def test_infer_row_has_no_phases():
    out = measure.measure_model(replace(TRAIN_CFG, mode="infer"))
    assert not any(k in out for k in ("time_fwd_ms", "time_bwd_ms", "time_opt_ms")) and out["time_ms"] > 0


@pytest.mark.parametrize("warmup", [0, 1])
def test_a_nan_loss_is_an_error(monkeypatch, warmup):
    def poisoned(name, img_size, **options):
        model = create_model(name, img_size=img_size, **options)
        with torch.no_grad():
            model.pos_embed.fill_(float("nan"))
        return model

    monkeypatch.setattr(measure.registry, "create_model", poisoned)
    with pytest.raises(NonFiniteStep, match="non-finite .* loss and gradient"):
        measure.measure_model(replace(TRAIN_CFG, warmup=warmup))


def _tiny_vim(scan: str = "ref") -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(img_size=RES, depth=2, scan=scan).double().train()


def _grads(model, x) -> dict:
    model.zero_grad(set_to_none=True)
    train_loss(model.forward_features(x), None).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_block_forwards(blocks) -> list[int]:
    """Counts every run of the blocks' forward (a forward hook would miss checkpointing's recomputation)."""
    calls = [0]

    def counted(forward):
        def run(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)
        return run

    for blk in blocks:
        blk.forward = counted(blk.forward)
    return calls


@pytest.mark.parametrize("family", ["vim", "deit"])
def test_grad_checkpointing_recomputes_blocks_and_keeps_the_gradients(family):
    if family == "vim":
        model = _tiny_vim()
        blocks = model.layers
    else:
        torch.manual_seed(0)
        model = create_model("deit_tiny", img_size=RES, attn="eager").double().train()
        blocks = model.blocks
    x = torch.randn(2, 3, RES, RES, dtype=torch.float64)
    calls = _count_block_forwards(blocks)
    plain = _grads(model, x)
    assert calls[0] == len(blocks)
    enable_grad_checkpointing(model)
    calls[0] = 0
    checkpointed = _grads(model, x)
    assert calls[0] == 2 * len(blocks)  # each block ran again in the backward
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-12, atol=1e-14)


def test_vim_checkpoints_only_when_training():
    model = _tiny_vim()
    enable_grad_checkpointing(model)
    calls = _count_block_forwards(model.layers)
    model.eval()
    model.forward_features(torch.randn(1, 3, RES, RES, dtype=torch.float64)).sum().backward()
    assert calls[0] == len(model.layers)


def test_a_model_without_checkpointing_is_refused():
    class Refuses(torch.nn.Linear):
        def set_grad_checkpointing(self, enable=True):
            assert not enable, "gradient checkpointing not supported"

    with pytest.raises(GradCheckpointingUnsupported, match="Linear has no activation checkpointing"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(GradCheckpointingUnsupported, match="Refuses does not support .*: gradient checkpointing not"):
        enable_grad_checkpointing(Refuses(2, 2))


@pytest.mark.parametrize("limit", [1, 2, 3, 37, 64, 100, 1000])
def test_largest_batch_finds_the_boundary_in_logarithmic_tries(limit):
    tried = []
    batch, misfit, tries = scaling_rows.largest_batch(lambda b: tried.append(b) or b <= limit, cap=1 << 12)
    assert (batch, misfit, tries) == (limit, limit + 1, len(tried))
    assert len(set(tried)) == len(tried) and tries <= 2 * math.ceil(math.log2(limit + 1)) + 1
    assert tried[:3] == [1, 2, 4][:len(tried[:3])]  # doubling first


def test_largest_batch_when_nothing_or_everything_fits():
    assert scaling_rows.largest_batch(lambda b: False) == (0, 1, 1)
    assert scaling_rows.largest_batch(lambda b: True, cap=16) == (16, None, 5)  # 1, 2, 4, 8, 16


def _fake_worker(per_image_gib: float, gpu_limit: int | None = None):
    """run_isolated for measure_model: on CPU a step adds ``per_image_gib`` per image; on a GPU batches above
    ``gpu_limit`` run out of memory. Records the batches tried."""
    tried = []

    def run(fn, args, timeout=None):
        cfg = args[0]
        tried.append((cfg.batch, cfg.warmup, cfg.repeats))
        if gpu_limit is not None and cfg.batch > gpu_limit:
            return {"status": "oom", "error": "OutOfMemoryError: CUDA out of memory"}
        return {"status": "ok", "time_ms": 1.0 * cfg.batch, "throughput_img_s": 1e3,
                "mem_peak_gib": per_image_gib * cfg.batch}
    return run, tried


def test_max_batch_row_on_cpu_is_bounded_by_the_memory_limit(monkeypatch):
    run, tried = _fake_worker(0.01)
    monkeypatch.setattr(scaling_rows, "run_isolated", run)
    cfg = replace(TRAIN_CFG, batch=0, mem_limit_gib=0.375, warmup=3, repeats=5)
    row = scaling_rows.scaling_row(cfg, {}, backoff=False)
    assert row["batch"] == 37 and row["batch_requested"] == 0 and row["mem_limit_gib"] == 0.375
    assert row["batch_search"] == ("doubling+bisection: 37 fits, 38 does not (12 tries); "
                                   "bound: 0.375 GiB added resident memory")
    assert [b for b, *_ in tried] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37, 37]
    assert {(w, r) for _, w, r in tried[:-1]} == {(1, 1)} and tried[-1] == (37, 3, 5)  # probes short, row full
    assert row["status"] == "ok" and row["mem_pred_peak_gib"] > 0  # the train step's predicted GPU peak


def test_max_batch_row_on_gpu_is_bounded_by_oom_and_none_fitting_is_an_oom_row(monkeypatch):
    run, _ = _fake_worker(0.0, gpu_limit=5)
    monkeypatch.setattr(scaling_rows, "run_isolated", run)
    cfg = replace(TRAIN_CFG, device="cuda:0", batch=0, mem_limit_gib=None)
    row = scaling_rows.scaling_row(cfg, {}, backoff=False)
    assert row["batch"] == 5 and row["batch_search"] == "doubling+bisection: 5 fits, 6 does not (6 tries)"
    run, tried = _fake_worker(0.0, gpu_limit=0)
    monkeypatch.setattr(scaling_rows, "run_isolated", run)
    row = scaling_rows.scaling_row(cfg, {}, backoff=False)
    assert row["status"] == "oom" and row["error"] == "--max-batch: batch 1 does not fit" and len(tried) == 1


def test_max_batch_stops_on_a_failure_that_is_not_memory(monkeypatch):
    monkeypatch.setattr(scaling_rows, "run_isolated",
                        lambda fn, args, timeout=None: {"status": "error", "error": "ValueError: broken"})
    row = scaling_rows.scaling_row(replace(TRAIN_CFG, batch=0, mem_limit_gib=1.0), {}, backoff=False)
    assert row["status"] == "error" and row["error"] == "--max-batch: the try at batch 1 failed: ValueError: broken"
