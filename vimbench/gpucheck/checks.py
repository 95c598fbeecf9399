"""The GPU check's work on the device that no vimbench command does: every scan backend against the
reference on CUDA, the CUDA tests of the Triton scan, the card's facts, and the Triton scan's backward at
the floor shape. Each writes its JSON under the output folder and returns its failures (see
``vimbench.gpucheck``)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from vimbench.kernels.selective_scan.backends import TRITON_DESIGNS
from vimbench.layout import checkout_root
from vimbench.measure.isolation import run_isolated
from vimbench.measure.verify import check_in_worker

FLOOR = dict(model="vim_tiny", res=1248, batch=64, dtype="fp32")
"""Where the goal is judged: the Triton scan at Vim-Ti's 1248 px shape (L = 6085), batch 64, fp32."""



def run_checks(out: Path, backends: list[str], grads: bool = False) -> list[str]:
    """``check_named_backend`` of each of ``backends`` on CUDA, each in a worker bounded by
    ``plugins.time_limit("check")`` (``verify.check_in_worker``); the results go to ``out/check.json``
    ({backend: result}). With ``grads`` (before the backward step times anything) the gradients of each backend
    with a backward too (``check.check_backward``, against float64 autograd of the reference), into
    ``out/grad-check.json``.
    Returns the failures, one line per backend that failed."""
    results = {b: check_in_worker(b, "cuda", grads) for b in backends}
    (out / ("grad-check.json" if grads else "check.json")).write_text(json.dumps(results, indent=1))
    return [f"{b}: {why}" for b, r in results.items() if (why := _check_failure(r))]


def _check_failure(result: dict) -> str:
    """Why a worker's ``check_named_backend`` result failed ("" when it passed; a forward-only backend passes
    a gradient check, having nothing to check)."""
    if result["status"] != "ok" or not result["check_ok"]:
        return result.get("check_failure") or result.get("error")
    if not result.get("forward_only", True) and not result["grad_ok"]:
        return f"gradient check failed: {result['grad_failure']}"
    return ""


def cuda_tests() -> Path | None:
    """tests/kernels/test_scan_cuda.py of the vimbench checkout this package runs from; None when it runs from
    an installed wheel (the tests are not part of the package: gpu-check then plans no tests step, and its
    summary says the CUDA tests did not run)."""
    root = checkout_root()
    path = None if root is None else root / "tests" / "kernels" / "test_scan_cuda.py"
    return path if path is not None and path.is_file() else None


def run_tests(out: Path, test_file: Path) -> list[str]:
    """pytest ``test_file`` (``cuda_tests``); its output goes to ``out/gpu-tests.txt``, the passed/failed
    counts and exit code to ``out/tests.json``. Returns the failure (none when every test ran and passed)."""
    root = test_file.parents[2]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(test_file)],
                          cwd=root, capture_output=True, text=True)
    (out / "gpu-tests.txt").write_text(proc.stdout + proc.stderr)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    (out / "tests.json").write_text(json.dumps({"returncode": proc.returncode, **counts}))
    if proc.returncode or not counts.get("passed"):  # all skipped (no CUDA in pytest's process) is no pass
        return [f"CUDA tests: exit code {proc.returncode}, {counts} (gpu-tests.txt)"]
    return []


def device_facts(device: str = "cuda") -> dict:
    """The card's exp2 rate (exp2/s) and the CUDA context size (GiB, NVML used memory after initialising
    CUDA minus before). Run it in a fresh process (``run_isolated``) so the context is this one's alone."""
    import torch

    from vimbench.measure.nvml import GpuReadings
    from vimbench.kernels.exp_rate import measure_exp2_rate
    gpu = GpuReadings(torch.device(device).index or 0)  # guarded, found by PCI bus id
    before = gpu.used_bytes()
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
    after = gpu.used_bytes() if before is not None else None
    context = None if after is None else (after - before) / 2 ** 30
    return {"card": torch.cuda.get_device_name(device), "exp2_per_s": measure_exp2_rate(device),
            "cuda_context_gib": context}


def record_facts(out: Path) -> list[str]:
    """``device_facts`` in a fresh worker, written to ``out/facts.json`` unless it is there already.
    Returns the failure, if any."""
    if (out / "facts.json").exists():
        return []
    facts = run_isolated(device_facts, ())
    if facts.pop("status") != "ok":
        return [f"device facts: {facts['error']}"]
    (out / "facts.json").write_text(json.dumps(facts))
    return []


BACKWARD_GOALS = dict(forward=2.5, mamba_ssm=1.5)
"""The Triton backward's targets at the ``FLOOR`` shape: within 2.5x of the same design's forward time and within
1.5x of mamba_ssm's backward."""


def backward_at_floor(dtype: str, mamba: bool) -> dict:
    """Run in a worker on CUDA: the Triton scan's backward at the ``FLOOR`` shape (vim_tiny's mixer at 1248 px,
    batch 64; one direction with D, z, delta_bias and softplus; activations in ``dtype``, fp32 or bf16), in
    both designs. Each design's gradients against the chunked ``cpu`` backend's backward on the same card, and
    against mamba_ssm's when ``mamba``, by the gradient check's rule (``check.GRAD_TOLERANCES`` of each
    reference gradient's largest magnitude); then times in ms (``triton.testing.do_bench``, median) of each
    design's forward and backward and of mamba_ssm's backward, and the backward's floor in ms: the larger of
    bytes / copy rate (u, delta, z, dout, B, C read, du, ddelta, dz written, once each; the copy rate of a
    1 GiB device copy) and exp2 count / exp2 rate (one exp2 per (b, e, t, n): the states recomputed once).
    Returns {"shape", "floor_ms", "<design>": {"fwd_ms", "bwd_ms", "bwd_over_fwd", "bwd_over_floor",
    "grad_failures"}, "mamba_ssm_bwd_ms" (when ``mamba``)}."""
    import torch
    from triton.testing import do_bench

    from vimbench.kernels.exp_rate import measure_exp2_rate
    from vimbench.kernels.selective_scan.backends import scan_backward
    from vimbench.kernels.selective_scan.check import GRAD_ATOL, GRAD_TOLERANCES, scan_case
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton
    from vimbench.count.ops import model_geometry
    g = model_geometry(FLOOR["model"], FLOOR["res"], FLOOR["batch"])
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    (u, delta, A, B, C), kw = scan_case(g.batch, g.d_inner, g.L, g.d_state, 0, dtype=torch_dtype, device="cuda")
    inputs = (u, delta, A, B, C, kw["D"], kw["z"], kw["delta_bias"], True)
    dout = torch.randn_like(u)
    references = {"cpu": scan_backward("cpu")(*inputs, dout)}
    result = {"shape": dict(b=g.batch, E=g.d_inner, L=g.L, N=g.d_state, dtype=dtype)}
    if mamba:
        mamba_backward = scan_backward("mamba_ssm")
        references["mamba_ssm"] = mamba_backward(*inputs, dout)
        result["mamba_ssm_bwd_ms"] = do_bench(lambda: mamba_backward(*inputs, dout), quantiles=None,
                                              return_mode="median")
    src = torch.empty(2 ** 28, device="cuda")
    copy_ms = do_bench(lambda: torch.empty_like(src).copy_(src), quantiles=None, return_mode="median")
    moved = sum(t.numel() * t.element_size() for t in (u, delta, kw["z"], dout, B, C, u, delta, kw["z"]))
    exps = g.batch * g.d_inner * g.L * g.d_state
    result["floor_ms"] = max(moved / (2 * src.numel() * 4 / copy_ms), exps / measure_exp2_rate("cuda") * 1e3)
    del src
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for design in TRITON_DESIGNS:
        backward = scan_backward(design)
        got = backward(*inputs, dout)
        failures = [f"d{n} differs from {ref}'s by {(x.double() - w.double()).abs().max().item():.3g}"
                    for ref, want in references.items() for n, x, w in zip(names, got, want)
                    if not (x.double() - w.double()).abs().max().item()
                    <= GRAD_TOLERANCES[torch_dtype] * w.double().abs().max().item() + GRAD_ATOL]
        fwd_ms = do_bench(lambda: selective_scan_triton(*inputs, design=design), quantiles=None, return_mode="median")
        bwd_ms = do_bench(lambda: backward(*inputs, dout), quantiles=None, return_mode="median")
        result[design] = dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, bwd_over_fwd=bwd_ms / fwd_ms,
                              bwd_over_floor=bwd_ms / result["floor_ms"], grad_failures=failures)
        if mamba:
            result[design]["bwd_over_mamba_ssm"] = bwd_ms / result["mamba_ssm_bwd_ms"]
    return result


def run_backward(out: Path, present: list[str]) -> list[str]:
    """First the gradients of every ``present`` scan backend on the awkward shapes (``run_checks`` with
    ``grads``): when one fails, its failure and nothing timed. Then ``backward_at_floor`` for fp32 and bf16,
    each in a worker (mamba_ssm's backward when it is ``present``); the results go to ``out/backward.json``
    ({dtype: result}). Returns the failures: a gradient check, a worker that failed, a gradient beyond tolerance
    at that shape (timings of a design whose gradients failed there are still recorded, for diagnosis)."""
    failures = run_checks(out, present, grads=True)
    if failures:
        return [*failures, "backward: not timed (a scan backend failed its gradient check)"]
    results = {dtype: run_isolated(backward_at_floor, (dtype, "mamba_ssm" in present)) for dtype in ("fp32", "bf16")}
    (out / "backward.json").write_text(json.dumps(results, indent=1))
    for dtype, r in results.items():
        if r["status"] != "ok":
            failures.append(f"backward {dtype}: {r.get('error')}")
            continue
        failures += [f"backward {dtype} {design}: {f}" for design in TRITON_DESIGNS for f in r[design]["grad_failures"]]
    return failures
