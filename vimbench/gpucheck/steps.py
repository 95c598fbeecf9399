"""The GPU check's steps in priority order, their time estimates, and running them within a budget.

Steps (``build_steps``), highest priority first; each writes under one output folder:
    check    every scan backend present on CUDA (cpu, triton, mamba_ssm when it imports) against the
             sequential reference (``kernels/selective_scan/check.py``), one worker each      -> check.json
    tests    the CUDA tests of the Triton scan (tests/kernels/test_scan_cuda.py; a checkout's only) -> tests.json
    paper    ``vimbench scaling --preset paper`` with the fastest scan present, and ``vimbench report``
             (the claim check)                                         -> scaling-paper.csv, report/
    floor    the card's exp2 rate and CUDA context, and ``vimbench kernels`` for the Triton scan at the
             Vim-Ti 1248 shape (L = 6085), batch 64, fp32: the scan against its floor
                                                                        -> facts.json, kernels-b64-fp32.csv
    designs  the same for the second Triton scan design (``triton_pipelined``), so that the summary can say
             which design is faster at that shape (the tests step covers both designs' correctness)
                                                                        -> kernels-b64-fp32.csv
    backward first the gradients of every scan backend present against float64 autograd of the reference on
             the awkward shapes (``check.check_backward``; a failure stops the step before any timing)
                                                                        -> grad-check.json
             then the Triton scan's backward at that shape, batch 64, fp32 and bf16, both designs: its gradients
             against the chunked cpu backend's (and mamba_ssm's when it imports) on the card, its time against the
             forward's, its floor and mamba_ssm's backward (``checks.run_backward``)   -> backward.json
    kernels  the wider kernel sweeps: Vim-Ti/S/B and DeiT-Ti widths, 224..1248 (5 points), batch 1 fp32 and
             batch 64 fp32/bf16, every scan and attention backend (the floor step's rows are resumed)
                                                                        -> kernels-*.csv
    figures  ``vimbench plot`` of every kernels CSV                    -> figures/
The commands a step calls (scaling, kernels, report, plot) are run through a ``Caller`` the command layer
passes in (``vimbench.commands.gpu_check.call_command``): this package never imports vimbench.commands.
``check`` and ``tests`` are the correctness steps: when one fails, no later step takes a timing.

ESTIMATES (seconds, ``COST``) are built from each step's configurations, resolutions and batch, for an
H100 or H200, starting with a cold Triton cache (Triton keeps compiled kernels on disk, so a specialisation
compiled once is loaded, not compiled, by every later process):
    check                  per backend (``check_estimate``): triton a worker plus its specialisations for
                           check.CASES (6 shapes x 2 dtypes x with/without extras = 24) at compile_s each;
                           check_other_s for cpu and mamba_ssm (nothing to compile)
    tests                  tests_s: ~55 Triton specialisations (the shapes of test_scan_cuda.py fall into ~6
                           classes of divisibility, x 3 dtypes x (2 extras + bidirectional)) at compile_s, ~0.2 M
                           steps of the sequential reference at ~0.1 ms (launch bound), pytest's start-up
    scaling configuration  worker_s + 25 forwards (warmup 5 + repeats 20), each forward
                           FLOPs / fp32_flops_s, plus for eager attention the (b, H, L, L) score matrix
                           written, read and written by the softmax and read by AV (4 x 4 bytes per element
                           in fp32, i.e. flops_attention / 16 bytes at head_dim 64) / hbm_bytes_s
    backward               step_s + the gradient checks (``grad_check_estimate``: per backend its forward check
                           again, and triton's backward specialisations for the same 24 cases at compile_s,
                           check_other_s for the others) + per dtype (fp32, bf16) worker_s, the exp2 rate
                           (exp2_s), the cpu reference's backward (check_other_s), the compiles of both designs'
                           forward and backward (4 x compile_s), and op_s per timing (2 designs x (forward,
                           backward), plus mamba_ssm's backward and its reference call when present)
    kernels run            step_s + check_other_s per scan checked (its kernels are compiled by then)
                           + per configuration worker_s + op_s (do_bench runs ~0.1 s of calls, then a memory pass)
    each step              + step_s (imports, the sweep's worker server, the device ceilings)
The rates are sustained, not peak: fp32 without TF32 runs on the CUDA cores (H100/H200 SXM peak
67 TFLOP/s), and HBM sustains ~2.5 TB/s of the H100 SXM's 3.35 (the H200 has 4.8).

WHY 420 s DELIVERS STEPS 1-3 on an H100/H200 (triton and cpu present; ``estimate_s`` rounded):
    check 39 + 8 = 47 s; tests 115 s (55 x 1.5 = 83 s compiling, ~19 s of reference steps, ~13 s start and
    the vim_tiny forward); paper 171 s (15 configurations: 45 s of workers and 91 s of forwards, DeiT-Ti
    eager 52 s of them, 30 s at 1248 alone, DeiT-Ti sdpa 29 s, Vim-Ti 9 s; 10 s start, 25 s for the report
    with its figures); floor 35 s (the exp2 rate 5 s, start 10 s, the triton check 8 s, 3 ops at 4 s).
    Total 368 s + ``run.WRAP_UP_S`` 10 s for the summary and the archive = 378 s, leaving 42 s (10%) for what
    the model leaves out (the designs step, ~25 s, runs when a budget leaves room for it): Vim's elementwise
    passes (~0.2 s per forward at 1248, batch 64: ~13 s over the paper's resolutions) and planning in the
    parent (the FLOP counts, a few seconds). With mamba_ssm present its check adds 8 s (and 60 s no longer
    fits the check step). The tests check the plans for 60, 420 and 3600 s (check only; steps 1-3;
    everything). Each run records every step's actual seconds beside
    its estimate (steps.jsonl and the summary), so the constants can be corrected from data.
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vimbench.analysis.paper import PAPER_SETTING_OPTIONS
from vimbench.gpucheck import checks
from vimbench.gpucheck.checks import FLOOR
from vimbench.kernels.selective_scan.backends import TRITON_DESIGNS
from vimbench.config import DEFAULT_TIMING

COST = dict(worker_s=3.0, op_s=1.0, step_s=10.0, compile_s=1.5, check_other_s=8.0, tests_s=115.0, report_s=25.0,
            exp2_s=5.0, plot_s=5.0, fp32_flops_s=40e12, hbm_bytes_s=2.5e12)
"""The cost model's constants: seconds, FLOP/s (2 FLOPs per multiply-add) and bytes/s; see the docstring."""
FORWARDS = DEFAULT_TIMING["cuda"]["warmup"] + DEFAULT_TIMING["cuda"]["repeats"]
"""Forwards per scaling configuration on a GPU: warmup + timed (25)."""
RES = "224,512,738,1024,1248"


Call = tuple[str, dict]
"""A vimbench command a step calls: (its name, its options by parameter name)."""


@dataclass
class Step:
    """One step: ``run()`` does the work and returns the failures (empty: all went well). ``calls``: the
    vimbench commands it calls, if any (run by a ``Caller``). A ``correctness`` step's failure stops every later
    timing."""
    name: str
    what: str
    estimate_s: float
    run: Callable[[], list[str]]
    correctness: bool = False
    calls: tuple[Call, ...] = ()


def started(csv: str) -> bool:
    """Whether the sweep CSV ``csv`` has rows already: a step cut short is then resumed, not restarted."""
    path = Path(csv)
    return path.exists() and path.stat().st_size > 0


Caller = Callable[[str, dict, str], int]
"""Runs a vimbench command by name with options by parameter name, recording a command line in the rows of a
sweep, and returns the exit code it would give (``vimbench.commands.gpu_check.call_command``)."""


def _label(options: dict) -> str:
    """The file a call writes (a sweep) or reads (report, plot), by name."""
    target = options.get("out") or options["results"]
    return Path(target if isinstance(target, str) else target[0]).name


def command_step(name: str, what: str, estimate_s: float, *calls: Call, command: str, call: Caller,
                 before: Callable[[], list[str]] = list) -> Step:
    """A step that runs ``before()`` and then the vimbench commands ``calls`` through ``call``; its failures are
    before's and each call with a non-zero exit code."""
    def run():
        failures = before()
        codes = [(n, opts, call(n, opts, command)) for n, opts in calls]
        return failures + [f"vimbench {n} ({_label(opts)}): exit code {code}" for n, opts, code in codes if code != 0]
    return Step(name, what, estimate_s, run, calls=calls)


def scan_backends_present() -> list[str]:
    """The scan backends that can run on CUDA here, but the reference: cpu, triton, mamba_ssm when it imports."""
    return ["cpu", "triton"] + (["mamba_ssm"] if importlib.util.find_spec("mamba_ssm") else [])


def check_estimate(backend: str) -> float:
    """Seconds of ``check_backend`` of ``backend`` on CUDA in a worker, Triton's cache cold (see COST)."""
    if backend != "triton":
        return COST["check_other_s"]
    from vimbench.kernels.selective_scan.check import CASES
    return COST["worker_s"] + len(CASES) * 2 * 2 * COST["compile_s"]  # x 2 dtypes x with/without extras


def grad_check_estimate(backend: str) -> float:
    """Seconds of ``check_named_backend`` with grads of ``backend`` on CUDA in a worker: its forward check
    (``check_estimate``) and its backward's (triton compiles as many backward specialisations as forward ones)."""
    return 2 * check_estimate(backend) - (COST["worker_s"] if backend == "triton" else 0)


def backward_estimate(present: list[str]) -> float:
    """Seconds of the backward step (``checks.run_backward``; see COST)."""
    per_dtype = (COST["worker_s"] + COST["exp2_s"] + COST["check_other_s"] + 2 * len(TRITON_DESIGNS) * COST["compile_s"]
                 + (2 * len(TRITON_DESIGNS) + 2 * ("mamba_ssm" in present)) * COST["op_s"])
    return COST["step_s"] + sum(map(grad_check_estimate, present)) + 2 * per_dtype


def fastest_scan(present: list[str]) -> str:
    """What ``--scan auto`` resolves to on CUDA: mamba_ssm when present, else triton."""
    return "mamba_ssm" if "mamba_ssm" in present else "triton"


@functools.cache
def forward_s(model: str, res: int, batch: int, eager_attention: bool) -> float:
    """Estimated seconds of one fp32 backbone forward of ``model`` at ``res``, batch ``batch`` (see COST)."""
    from vimbench.config import FlopsConfig
    from vimbench.count.flops import count_flops
    flops = count_flops(FlopsConfig(model, res=res, batch=batch))
    score_bytes = flops.flops_attention / 16 if eager_attention else 0.0
    return flops.flops_total / COST["fp32_flops_s"] + score_bytes / COST["hbm_bytes_s"]


def scaling_estimate(pairs: list[tuple[str, str]], res: tuple[int, ...], batch: int) -> float:
    """Seconds of a scaling sweep over (model, impl) ``pairs`` x ``res`` at ``batch``, without step_s."""
    return sum(COST["worker_s"] + FORWARDS * forward_s(model, r, batch, impl == "eager")
               for model, impl in pairs for r in res)


def paper_pairs(scan: str) -> list[tuple[str, str]]:
    """(model, backend) of ``scaling --preset paper --scan scan``: Vim models with ``scan``, DeiT with each attn."""
    models, attns = PAPER_SETTING_OPTIONS["models_spec"].split(","), PAPER_SETTING_OPTIONS["attn_spec"].split(",")
    return [(m, scan) for m in models if m.startswith("vim")] + \
           [(m, a) for m in models if m.startswith("deit") for a in attns]


def paper_res_batch() -> tuple[tuple[int, ...], int]:
    """The paper preset's resolutions and batch."""
    return tuple(int(r) for r in PAPER_SETTING_OPTIONS["res_spec"].split(",")), PAPER_SETTING_OPTIONS["batch"]


def kernels_estimate(n_configs: int, n_checked: int) -> float:
    """Seconds of one ``vimbench kernels`` run: its scan checks, ceilings and ``n_configs`` op timings."""
    return COST["step_s"] + n_checked * COST["check_other_s"] + n_configs * (COST["worker_s"] + COST["op_s"])


def op_configs_count(n_res: int, vim: tuple[int, int] = (0, 0), deit: tuple[int, int] = (0, 0)) -> int:
    """Kernel configurations of a ``vimbench kernels`` run over ``n_res`` resolutions: ``vim`` and ``deit``
    are (models, backends); each Vim model runs the Vim ops and each DeiT model the attention ops
    (``vimbench.count.ops.OPS``) once per backend."""
    from vimbench.count.ops import OPS
    ops = {family: sum(spec.family == family for spec in OPS.values()) for family in ("vim", "deit")}
    return n_res * (vim[0] * vim[1] * ops["vim"] + deit[0] * deit[1] * ops["deit"])


def build_steps(out: Path, present: list[str] | None = None, command: str = "vimbench gpu-check", *,
                call: Caller) -> list[Step]:
    """Every step of the check, highest priority first, writing under ``out``; ``command`` (the gpu-check
    command line) is recorded in the rows of its sweeps, which ``call`` runs."""
    present = scan_backends_present() if present is None else present
    fast = fastest_scan(present)
    attn = "eager,sdpa,efficient,cudnn"

    def kernels_call(csv, **options):
        return "kernels", {**options, "out": str(out / csv)}

    designs = ",".join(TRITON_DESIGNS)   # both Triton scan designs, compared in the summary

    def at_floor_shape(scan):  # the Vim-Ti 1248 shape, batch 64, fp32
        return kernels_call("kernels-b64-fp32.csv", models_spec=FLOOR["model"], scan_spec=scan,
                            res_spec=str(FLOOR["res"]), batch=FLOOR["batch"], dtype=FLOOR["dtype"])
    paper_csv = str(out / "scaling-paper.csv")
    wide = [kernels_call("kernels-b1-fp32.csv", models_spec="vim_tiny,vim_small,vim_base,deit_tiny",
                         scan_spec=",".join(present), attn_spec=attn, res_spec=RES, batch=1, dtype="fp32"),
            kernels_call("kernels-ref.csv", models_spec="vim_tiny", scan_spec="ref", res_spec="224", batch=1),
            *(kernels_call(f"kernels-b64-{dtype}.csv", models_spec="vim_tiny,deit_tiny", scan_spec=designs,
                           attn_spec=attn + (",flash" if dtype != "fp32" else ""), res_spec=RES, batch=64,
                           dtype=dtype) for dtype in ("fp32", "bf16"))]
    n_res, n_floor = len(RES.split(",")), op_configs_count(1, vim=(1, 1))
    wide_estimate = (kernels_estimate(op_configs_count(n_res, vim=(3, len(present)), deit=(1, 4)), len(present))
                     + kernels_estimate(op_configs_count(1, vim=(1, 1)), 0)
                     + kernels_estimate(op_configs_count(n_res, vim=(1, len(TRITON_DESIGNS)), deit=(1, 4))
                                        - len(TRITON_DESIGNS) * n_floor, 1)
                     + kernels_estimate(op_configs_count(n_res, vim=(1, len(TRITON_DESIGNS)), deit=(1, 5)), 1))

    def figures():
        return [f"vimbench plot {csv.name}: failed" for csv in sorted(out.glob("kernels-*.csv"))
                if call("plot", dict(results=str(csv), out_dir=str(out / "figures")), command) != 0]

    tests = checks.cuda_tests()
    return [
        # the preflight (vimbench.measure.preflight: does the card work at all?) runs before these, in the command
        Step("check", f"scan backends {', '.join(present)} against the reference on CUDA",
             sum(map(check_estimate, present)), lambda: checks.run_checks(out, present), correctness=True),
        *([Step("tests", "CUDA tests of the Triton scan (tests/kernels/test_scan_cuda.py)",
                COST["tests_s"], lambda: checks.run_tests(out, tests), correctness=True)] if tests else []),
        command_step("paper", f"scaling --preset paper --scan {fast}, and its report (claim check)",
                     COST["step_s"] + COST["report_s"] + scaling_estimate(paper_pairs(fast), *paper_res_batch()),
                     ("scaling", {**PAPER_SETTING_OPTIONS, "scan_spec": fast, "out": paper_csv}),
                     ("report", {"results": [paper_csv], "out_dir": str(out / "report")}), command=command, call=call),
        command_step("floor", "Triton scan against its floor at vim_tiny 1248 px (L = 6085), batch 64, fp32",
                     COST["exp2_s"] + kernels_estimate(n_floor, 1), at_floor_shape("triton"), command=command,
                     call=call, before=lambda: checks.record_facts(out)),
        command_step("designs", "the second Triton scan design (triton_pipelined) at the same shape, to compare",
                     kernels_estimate(n_floor, 1), at_floor_shape("triton_pipelined"), command=command, call=call),
        Step("backward", f"gradients of {', '.join(present)} against the reference on CUDA, then the Triton scan's "
             "backward at vim_tiny 1248 px, batch 64, fp32 and bf16: gradients, time against the forward, its floor "
             "and mamba_ssm's backward", backward_estimate(present),
             lambda: checks.run_backward(out, present)),
        command_step("kernels", "kernel sweeps: Vim-Ti/S/B and DeiT-Ti widths, 224..1248, batch 1 and 64, fp32 "
                     "and bf16", wide_estimate, *wide, command=command, call=call),
        Step("figures", "figures of the kernel sweeps (vimbench plot)", 4 * COST["plot_s"], figures),
    ]
