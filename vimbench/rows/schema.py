"""The one schema of every CSV vimbench writes: columns, keys, units, and one name per quantity.

Four kinds of CSV, each written by one command and read by ``reader.load_results``:

    scaling  ``vimbench scaling``  one row per (model, backend, resolution, batch, dtype, device, head)
    kernels  ``vimbench kernels``  one row per (op, backend, model width, resolution, batch, dtype, device)
    flops    ``vimbench flops``    one row per (model, backend, resolution, batch, head)
    memory   ``vimbench memory``   one row per (model, backend, resolution, batch, dtype, head, card)

Every row ends with the ``ENVIRONMENT`` columns (versions, host, git commit, command). A quantity has the
same name in every kind: ``tokens`` is the sequence length the token mixer sees (cls included), ``time_ms``
the median time of one call (a batched forward, or one op), ``impl`` the backend asked for and ``kernel``
what computed it. CSVs written before these names are read through ``RENAMED``.

Units: times in ms, memory in GiB (2^30 bytes), FLOPs as counts (2 per multiply-add), rates per second.
"""
from __future__ import annotations

from dataclasses import dataclass

COLUMN_DOCS = {
    # identity
    "model": ("", "registry name (see `vimbench models`)"),
    "family": ("", "vim, deit or timm"),
    "op": ("", "kernels: scan, scan_bidir, attention, mixer_vim or block_deit"),
    "impl": ("", "backend asked for, `auto` resolved: scan backend (Vim) or attention backend (DeiT/ViT); "
                 "timm for a model that takes neither"),
    "kernel": ("", "what computed the token mixer: the scan backend, or for sdpa the kernel SDPA picked; "
                   "timm: timm's own forward"),
    "res": ("px", "square input resolution"),
    "tokens": ("", "sequence length of the token mixer, cls token included; empty for a CNN"),
    "width": ("", "kernels: the model's embed dim D"),
    "heads": ("", "kernels: attention heads H (DeiT widths)"),
    "head_dim": ("", "kernels: head dim d (DeiT widths)"),
    "d_inner": ("", "kernels: scan channels E = 2D (Vim widths)"),
    "d_state": ("", "kernels: scan state size N (Vim widths)"),
    "batch": ("images", "batch that ran (scaling: smaller than batch_requested after an OOM retry)"),
    "batch_requested": ("images", "scaling: batch asked for; 0 for --max-batch (the largest batch that fits)"),
    "dtype": ("", "fp32, fp16 or bf16 (weights and inputs)"),
    "compile": ("", "none, or the torch.compile mode (default, max-autotune; inductor backend) the call ran in"),
    "amp": ("", "none, or the torch.autocast dtype (fp16, bf16) the call ran in; weights stay in dtype"),
    "mode": ("", "infer (a forward under inference_mode) or train (forward, backward and optimizer step); CSVs "
                 "without the column: infer"),
    "grad_checkpointing": ("", "train rows: True when each block's activations were recomputed in the backward "
                               "(activation checkpointing per block, --grad-checkpointing); False for infer rows "
                               "and in CSVs without it"),
    "batch_search": ("", "scaling --max-batch: how `batch` was found, e.g. 'doubling+bisection: 37 fits, 38 does "
                         "not (12 tries)'; empty when the batch was given"),
    "compile_s": ("s", "wall time of the first call of the compiled callable (tracing, compiling, one run); "
                       "before the warm-up, never timed"),
    "graph_breaks": ("", "places where TorchDynamo ended a graph and fell back to Python (0: whole graphs)"),
    "device": ("", "cpu or cuda:N"),
    "head": ("", "True: full classifier timed; False: backbone only (forward_features)"),
    "status": ("", "ok, oom or error"),
    "error": ("", "one line: why the row is not ok, or notes on a reading that failed"),
    # time
    "time_ms": ("ms", "median time of one call (scaling: one forward, or train step, of `batch` images)"),
    "time_ms_p10": ("ms", "10th percentile of the timed calls"),
    "time_ms_p90": ("ms", "90th percentile of the timed calls"),
    "throughput_img_s": ("img/s", "batch / time_ms"),
    "time_fwd_ms": ("ms", "scaling, train rows: median time of the forward and the loss of a step; empty for infer"),
    "time_bwd_ms": ("ms", "scaling, train rows: median time of loss.backward(); empty for infer"),
    "time_opt_ms": ("ms", "scaling, train rows: median time of the SGD optimizer.step(); empty for infer"),
    "repeats": ("", "timed calls"),
    "warmup": ("", "untimed calls before them"),
    # memory
    "mem_peak_gib": ("GiB", "GPU: torch.cuda.max_memory_allocated; CPU: resident memory one call adds (train: "
                            "one step, weights and momentum buffers not included)"),
    "mem_limit_gib": ("GiB", "scaling --max-batch on CPU: a try fit when its mem_peak_gib stayed at or below this"),
    "mem_reserved_gib": ("GiB", "GPU: torch.cuda.max_memory_reserved"),
    "mem_nvml_gib": ("GiB", "GPU: NVML used memory, max during the timed loop, minus the level before"),
    "mem_pred_peak_gib": ("GiB", "predicted torch.cuda.max_memory_allocated (fake CUDA tensors, eager; train: the "
                                 "steady-state step); empty for compiled rows, train rows under autocast and a "
                                 "backend with no GPU path (cpp)"),
    "mem_pred_reserved_gib": ("GiB", "predicted torch.cuda.max_memory_reserved (caching-allocator model)"),
    "mem_pred_weights_gib": ("GiB", "predicted parameters and buffers"),
    "mem_pred_activations_gib": ("GiB", "predicted peak minus weights"),
    "mem_pred_used_gib": ("GiB", "predicted reserved + context_gib: what nvidia-smi would show"),
    "card": ("", "memory: the card the fits column is for"),
    "card_gib": ("GiB", "memory: the card's memory"),
    "context_gib": ("GiB", "memory: assumed CUDA context"),
    "fits": ("", "memory: mem_pred_used_gib <= card_gib"),
    "paper_gib": ("GiB", "memory --preset paper: the Vim paper's Fig. 1 (c) value (empty: OOM or not given)"),
    # work
    "flops_total": ("FLOPs", "one call (scaling: one forward of `batch` images)"),
    "flops_scan": ("FLOPs", "selective scans"),
    "flops_attention": ("FLOPs", "attention's QK^T and AV"),
    "flops_linear": ("FLOPs", "matmuls and convolutions"),
    "flops_other": ("FLOPs", "anything else counted"),
    "params": ("", "parameters"),
    "bytes": ("B", "kernels: minimal traffic, every input read and every output written once"),
    "gflops_s": ("GFLOP/s", "kernels: flops_total / time_ms"),
    "gbs": ("GB/s", "kernels: bytes / time_ms (10^9 B/s)"),
    "ceiling_gflops_s": ("GFLOP/s", "kernels: measured matmul rate of the device in the run's dtype"),
    "ceiling_gbs": ("GB/s", "kernels: measured copy bandwidth of the device"),
    "frac_peak_flops": ("", "kernels: gflops_s / ceiling_gflops_s"),
    "frac_peak_bw": ("", "kernels: gbs / ceiling_gbs"),
    "exps": ("", "kernels: exp(delta A) evaluations one call needs: b*E*L*N per scan direction (scan 1, scan_bidir "
                 "and mixer_vim 2), twice in train mode (the backward needs them again); 0 for attention ops"),
    "ceiling_exp_s": ("exp/s", "kernels on CPU: measured exp rate of the compiled scan's state exp over the run's "
                               "threads (best of 5, compiled_cpu.exp_floor_rate); empty where cpp does not build"),
    "floor_ms": ("ms", "kernels: the largest lower bound on time_ms from the measured ceilings: flops_total / "
                       "ceiling_gflops_s (not under amp), bytes / ceiling_gbs, exps / ceiling_exp_s"),
    "floor_kind": ("", "kernels: which bound floor_ms is: flops, bytes or exp"),
    "frac_floor": ("", "kernels: floor_ms / time_ms (1 = at the floor)"),
    # environment
    "device_name": ("", "GPU name, or the CPU model on CPU"),
    "driver_version": ("", "NVIDIA driver"),
    "cuda_version": ("", "CUDA torch was built with"),
    "torch_version": ("", ""), "triton_version": ("", ""), "timm_version": ("", ""),
    "vimbench_version": ("", ""),
    "git_commit": ("", "vimbench checkout, +dirty with local changes"),
    "cpu_model": ("", "host CPU"),
    "cpu_capability": ("", "the host's ATen CPU capability, which the compiled CPU kernels target (AVX512, AVX2, "
                           "DEFAULT, ...; ATEN_CPU_CAPABILITY honoured)"),
    "host": ("", "host name"),
    "threads": ("", "torch CPU threads"),
    "load_avg_1m": ("", "host load average while measuring (CPU timings are distorted by other work)"),
    "tf32": ("", "torch.backends.cuda.matmul.allow_tf32 while measuring: cuBLAS may run float32 matmuls in TF32"),
    "cudnn_tf32": ("", "torch.backends.cudnn.allow_tf32 while measuring: cuDNN may run float32 convolutions in TF32"),
    "cudnn_benchmark": ("", "torch.backends.cudnn.benchmark while measuring"),
    "matmul_precision": ("", "torch.get_float32_matmul_precision() while measuring: highest, high or medium"),
    "sm_clock_mhz": ("MHz", "GPU SM clock after the timed loop"),
    "temperature_c": ("C", "GPU temperature after the timed loop"),
    "power_w": ("W", "GPU power draw after the timed loop"),
    "timestamp": ("", "when the row was written (local time, ISO 8601)"),
    "command": ("", "the vimbench command line that wrote the row"),
    # where it ran (vimbench.measure.launchers)
    "launcher": ("", "plain (this machine), local (submitit jobs on it) or slurm (a submitit job array)"),
    "job_id": ("", "submitit job id (Slurm: <array id>_<index>; local: the job's process id); empty for plain"),
    "workers": ("", "configurations running at once; above 1 on a CPU they share its cores (no measurement)"),
    "cuda_visible_devices": ("", "CUDA_VISIBLE_DEVICES of the worker: which GPU cuda:N was on its host"),
}

ENVIRONMENT = ["device_name", "driver_version", "cuda_version", "torch_version", "triton_version", "timm_version",
               "vimbench_version", "git_commit", "cpu_model", "cpu_capability", "host", "threads", "load_avg_1m",
               "timestamp", "command"]
PRECISION = ["tf32", "cudnn_tf32", "cudnn_benchmark", "matmul_precision"]
"""torch's settings that change what float32 computes, read at measurement time (``vimbench.measure.env.precision``)."""
GPU_TELEMETRY = ["sm_clock_mhz", "temperature_c", "power_w"]
PLACEMENT = ["launcher", "job_id", "workers", "cuda_visible_devices"]
"""Measured rows (scaling, kernels) end with where they ran, after the environment (``host``)."""
FLOP_COLUMNS = ["flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other"]
MODE = "mode"
"""Every kind: what a row measures, counts or predicts, infer or train (``MODES``); each mode is its own setting."""
MODES = ("infer", "train")
GRAD_CHECKPOINTING = "grad_checkpointing"
"""scaling: activation checkpointing per block in the train step; a setting of its own (CSVs without it: False)."""
TRAIN_PHASES = ["time_fwd_ms", "time_bwd_ms", "time_opt_ms"]
REGIME = ["compile", "amp"]
"""scaling and kernels: the regime a row ran in; each regime is its own setting (CSVs without them: none)."""
COMPILE_COLUMNS = ["compile_s", "graph_breaks"]


@dataclass(frozen=True)
class Schema:
    """One kind of CSV: its ``columns`` in order, the ``key`` that identifies a configuration (what
    ``--resume`` skips when ok), the columns a reader needs (``required``), and how to detect the kind
    from a header (``marker``: columns only this kind has)."""
    kind: str
    columns: list
    key: list
    required: tuple
    marker: tuple
    setting: tuple
    """Columns whose values split a CSV into settings: curves are drawn and fitted within one setting."""


SCALING = Schema(
    "scaling",
    ["model", "family", "impl", "kernel", "res", "tokens", "batch", "batch_requested", "batch_search", "dtype", MODE,
     GRAD_CHECKPOINTING, *REGIME, "device", "head", "status", "error", "time_ms", "time_ms_p10", "time_ms_p90",
     "throughput_img_s", *TRAIN_PHASES, "repeats", "warmup", *COMPILE_COLUMNS, "mem_peak_gib", "mem_reserved_gib",
     "mem_nvml_gib", "mem_pred_peak_gib", "mem_limit_gib", *FLOP_COLUMNS, "params", *ENVIRONMENT, *PRECISION,
     *GPU_TELEMETRY,
     *PLACEMENT],
    key=["model", "impl", "res", "batch_requested", "dtype", MODE, GRAD_CHECKPOINTING, *REGIME, "device", "head"],
    required=("model", "family", "impl", "res", "tokens", "batch", "dtype", "device", "head", "status", "time_ms",
              "time_ms_p10", "time_ms_p90", "throughput_img_s", "mem_peak_gib", *FLOP_COLUMNS, "device_name"),
    marker=("throughput_img_s",),
    setting=("device", "dtype", "batch_requested", "head", MODE, GRAD_CHECKPOINTING, *REGIME),
)
KERNELS = Schema(
    "kernels",
    ["op", "impl", "kernel", "model", "width", "heads", "head_dim", "d_inner", "d_state", "tokens", "res", "batch",
     "dtype", MODE, *REGIME, "device", "status", "error", "time_ms", "time_ms_p10", "time_ms_p90", "repeats",
     *COMPILE_COLUMNS, "mem_peak_gib",
     "flops_total", "bytes", "exps", "gflops_s", "gbs", "frac_peak_flops", "frac_peak_bw", "frac_floor", "floor_ms",
     "floor_kind", "ceiling_gflops_s", "ceiling_gbs", "ceiling_exp_s", *ENVIRONMENT, *PRECISION,
     *PLACEMENT],
    key=["op", "impl", "model", "res", "batch", "dtype", MODE, *REGIME, "device"],
    required=("op", "impl", "tokens", "width", "batch", "dtype", "device", "status", "time_ms", "time_ms_p10",
              "time_ms_p90", "mem_peak_gib"),
    marker=("op",),
    setting=("device", "dtype", "batch", "width", MODE, *REGIME),
)
FLOPS = Schema(
    "flops",
    ["model", "family", "impl", "res", "tokens", "batch", "head", MODE, GRAD_CHECKPOINTING, "status", "error",
     "params", *FLOP_COLUMNS, *ENVIRONMENT],
    key=["model", "impl", "res", "batch", "head", MODE, GRAD_CHECKPOINTING],
    required=("model", "impl", "res", "tokens", "batch", "head", "status", *FLOP_COLUMNS),
    marker=(),
    setting=("batch", "head", MODE, GRAD_CHECKPOINTING),
)
MEMORY = Schema(
    "memory",
    ["model", "family", "impl", "kernel", "res", "tokens", "batch", "dtype", "head", MODE, GRAD_CHECKPOINTING,
     "status", "error", "params", "mem_pred_weights_gib", "mem_pred_activations_gib", "mem_pred_peak_gib",
     "mem_pred_reserved_gib", "mem_pred_used_gib", "card", "card_gib", "context_gib", "fits", "paper_gib",
     *ENVIRONMENT],
    key=["model", "impl", "res", "batch", "dtype", "head", MODE, GRAD_CHECKPOINTING, "card"],
    required=("model", "impl", "res", "tokens", "batch", "dtype", "head", "status", "mem_pred_peak_gib",
              "mem_pred_reserved_gib"),
    marker=("mem_pred_reserved_gib",),
    setting=("dtype", "batch", "head", MODE, GRAD_CHECKPOINTING, "card"),
)
SCHEMAS = {s.kind: s for s in (SCALING, KERNELS, FLOPS, MEMORY)}

RENAMED = {"L": "tokens", "latency_ms": "time_ms", "latency_ms_p10": "time_ms_p10", "latency_ms_p90": "time_ms_p90",
           "mem_pred_gib": "mem_pred_peak_gib", "flops": "flops_total"}
"""Old column name -> current name, for CSVs written before the names were unified."""

NUMERIC = {name for name, (unit, _) in COLUMN_DOCS.items() if unit} | {
    "tokens", "width", "heads", "head_dim", "d_inner", "d_state", "repeats", "warmup", "params", "threads",
    "load_avg_1m", "frac_peak_flops", "frac_peak_bw", "exps", "frac_floor", "workers", "graph_breaks"}
"""Columns read as numbers (empty cells become NaN)."""
BOOLEAN = ("head", "fits", GRAD_CHECKPOINTING)


def kind_of(columns) -> str | None:
    """The kind of a CSV from its (current-name) header: the first schema whose marker columns it has
    (flops, which has none of its own, when it has the FLOP columns and no other marker); None otherwise."""
    cols = set(columns)
    for schema in (SCALING, KERNELS, MEMORY):
        if set(schema.marker) <= cols:
            return schema.kind
    return "flops" if set(FLOP_COLUMNS) <= cols else None
