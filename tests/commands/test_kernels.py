"""`vimbench kernels`: FLOP and byte models against closed forms, the configurations, the CSV schema, resume, the
launchers (the preamble job of checks and ceilings, then the sweep) and bad input."""
import dataclasses
import math
import pickle

import pandas as pd
import pytest
import torch

from helpers import fake_slurm, needs_no_gpu, submitted  # noqa: F401 (a fixture)
from vimbench.commands import main
from vimbench.kernels.selective_scan import resolve_scan_backend
from vimbench.analysis.crossovers import kernel_crossovers, kernel_floors
from vimbench.commands.kernels import summary
from vimbench.kernels.selective_scan import compiled_cpu
from vimbench.rows.schema import KERNELS
from vimbench.measure.launchers import Plain, Submitit
from vimbench.count.ops import OPS, Geometry, model_geometry, op_cost, op_exps
from vimbench.measure.ceilings import exp_ceiling
from vimbench.measure.ops import CPU_TIMING, KernelConfig
from vimbench.rows.kernels import floor, kernel_configs
from vimbench.rows.reader import load_results, split_settings

AUTO = resolve_scan_backend("auto", "cpu")  # cpp where it builds, else the chunked cpu scan
FAST = ["--repeats", "1", "--min-time", "0", "--device", "cpu", "--threads", "1"]
b, L = 2, 10
VIM = Geometry("vim_tiny", 48, b, L, width=192, d_inner=384, d_state=16, heads=0, head_dim=0)
DEIT = Geometry("deit_tiny", 48, b, L, width=192, d_inner=0, d_state=0, heads=3, head_dim=64)


def test_geometry_is_the_models_own():
    assert model_geometry("vim_tiny", 48, b) == VIM
    assert model_geometry("deit_tiny", 48, b) == DEIT
    assert model_geometry("vim_tiny", 1248, 1).L == 6085 and model_geometry("deit_small", 224, 1).heads == 6


def test_configurations_are_the_csv_key_then_sizes_and_timing():
    """One KernelConfig per (resolution, model, op, backend, mode): its first fields are the kernels CSV's key,
    in order; the Vim model runs the three scan ops, DeiT the two attention ops; a config survives a worker's
    pickling unchanged."""
    configs = kernel_configs(["vim_tiny", "deit_tiny"], [48], {"scan": ["ref", "cpu"], "attn": ["eager"]}, b,
                             "fp32", "cpu", 1, CPU_TIMING, modes=["infer", "train"])
    assert [f.name for f in dataclasses.fields(KernelConfig)][:len(KERNELS.key)] == KERNELS.key
    assert [(c.op, c.impl, c.mode) for c in configs[:4]] == [("scan", "ref", "infer"), ("scan", "ref", "train"),
                                                             ("scan", "cpu", "infer"), ("scan", "cpu", "train")]
    assert len(configs) == 3 * 2 * 2 + 2 * 1 * 2 and {c.op for c in configs[12:]} == {"attention", "block_deit"}
    assert configs[0].geometry == VIM and configs[-1].geometry == DEIT and configs[0].device == "cpu"
    assert configs[0].timing == CPU_TIMING and pickle.loads(pickle.dumps(configs[-1])) == configs[-1]


def closed_form_flops() -> dict:
    """Forward FLOPs of one call of each op at VIM/DEIT, derived here."""
    D, E, N, H, d = 192, 384, 16, 3, 64
    R, k = math.ceil(D / 16), 4
    # one direction with D, z, delta_bias and softplus: 7 per (b, e, t, n); per (b, e, t) delta*u, bias,
    # softplus, D*u + y (2), y * silu(z) (3)
    scan = b * E * L * (7 * N + 8)
    # two directions without the gate (5 per (b, e, t)), then y_f + y_b and the shared gate (4)
    bidir = 2 * b * E * L * (7 * N + 5) + 4 * b * E * L
    mixer = (2 * b * L * D * 2 * E                        # in_proj
             + 2 * (2 * b * E * L * k)                    # the two depthwise convs
             + 2 * (2 * b * L * E * (R + 2 * N))          # x_proj, x_proj_b
             + 2 * (2 * b * L * R * E)                    # dt projections
             + bidir + 2 * b * L * E * D)                 # scans, out_proj
    attention = 4 * b * H * L * L * d
    block = 2 * b * L * D * 3 * D + attention + 2 * b * L * D * D
    return {"scan": scan, "scan_bidir": bidir, "mixer_vim": mixer, "attention": attention, "block_deit": block}


def test_flops_match_closed_forms():
    for op, flops in closed_form_flops().items():
        assert op_cost(op, VIM if OPS[op].family == "vim" else DEIT, "fp32")["flops_total"] == flops, op


def test_train_flops_and_bytes_add_the_backward():
    """Train: the backward by convention, matmuls and convolutions 2x their forward, attention 2.5x, each scan
    direction 20 per (b, e, t, n) plus per (b, e, t) 4 (delta*u), 4 (D), 3 (softplus), 1 (bias), and 8 for a
    gate; bytes: every input read twice more and its gradient written, the output's gradient read."""
    E, N = 384, 16
    fwd = closed_form_flops()
    one, gated = b * E * L * (20 * N + 12), b * E * L * (20 * N + 20)
    bidir_bwd = 2 * one + 8 * b * E * L
    expected = {"scan": fwd["scan"] + gated, "scan_bidir": fwd["scan_bidir"] + bidir_bwd,
                "mixer_vim": 3 * (fwd["mixer_vim"] - fwd["scan_bidir"]) + fwd["scan_bidir"] + bidir_bwd,
                "attention": 3.5 * fwd["attention"],
                "block_deit": 3 * (fwd["block_deit"] - fwd["attention"]) + 3.5 * fwd["attention"]}
    for op, flops in expected.items():
        g = VIM if OPS[op].family == "vim" else DEIT
        cost = op_cost(op, g, "fp32", "train")
        assert cost["flops_total"] == flops, op
        prep = OPS[op].build(g, "ref" if g is VIM else "eager", torch.device("meta"), torch.float32)
        out = prep.run()
        inputs = sum(t.numel() * t.element_size() for t in prep.inputs)
        assert cost["bytes"] == 3 * inputs + 2 * out.numel() * out.element_size(), op


@pytest.mark.slow
def test_train_rows_time_forward_and_backward(tmp_path):
    out = tmp_path / "k.csv"
    assert main(["kernels", "--res", "32", "--scan", "cpu", "--attn", "eager", "--mode", "infer,train",
                 "--out", str(out), *FAST]) == 0
    df = pd.read_csv(out)
    assert (df.status == "ok").all() and sorted(df["mode"].value_counts()) == [5, 5]
    infer, train = (df[df["mode"] == m].set_index("op") for m in ("infer", "train"))
    assert (train.flops_total > 2 * infer.flops_total).all() and (train.bytes > 2 * infer.bytes).all()


@pytest.mark.parametrize("dtype,s", [("fp32", 4), ("bf16", 2)])
def test_bytes_match_closed_forms_and_the_tensors(dtype, s):
    E, N, D, H, d = 384, 16, 192, 3, 64
    small = 2 * E * 4 + E * N * 4                         # A, D, delta_bias in float32
    R, k = 12, 4
    mixer_params = (D * 2 * E                             # in_proj
                    + 2 * (E * k + E)                     # conv1d, conv1d_b (weight, bias)
                    + 2 * E * (R + 2 * N)                 # x_proj, x_proj_b
                    + 2 * (R * E + E)                     # dt_proj, dt_proj_b (weight, bias)
                    + 2 * E * N + 2 * E                   # A_log, A_b_log, D, D_b
                    + E * D)                              # out_proj
    expected = {"scan": 4 * b * E * L * s + 2 * b * N * L * s + small,
                "scan_bidir": 6 * b * E * L * s + 4 * b * N * L * s + 2 * small,
                "attention": 4 * b * H * L * d * s,
                "mixer_vim": 2 * b * L * D * s + mixer_params * s,
                "block_deit": 2 * b * L * D * s + (3 * D * D + 3 * D + D * D + D) * s}
    for op, nbytes in expected.items():
        g = VIM if OPS[op].family == "vim" else DEIT
        assert op_cost(op, g, dtype)["bytes"] == nbytes, op
        # the model is "each input read once, the output written once": the built tensors say the same
        prep = OPS[op].build(g, "ref" if g is VIM else "eager", torch.device("meta"), getattr(torch, {
            "fp32": "float32", "bf16": "bfloat16"}[dtype]))
        out = prep.run()
        assert sum(t.numel() * t.element_size() for t in [*prep.inputs, out]) == nbytes, op


def test_crossover_of_linear_against_quadratic():
    Ls = [100, 200, 400, 800, 1600, 3200]
    rows = [dict(op="scan", impl="cpu", kernel="cpu", tokens=x, time_ms=x / 100, mem_peak_gib=1.0) for x in Ls]
    rows += [dict(op="attention", impl="eager", kernel="eager", tokens=x, time_ms=(x / 400) ** 2, mem_peak_gib=2.0)
             for x in Ls]
    df = pd.DataFrame(rows).assign(status="ok", width=192, batch=1, dtype="fp32", device="cpu")
    [row] = kernel_crossovers(split_settings("kernels", df)[0])
    assert row["vim"] == "scan [cpu]" and row["attention"] == "attention [eager]"
    assert row["faster_from"] == "~ 1600 tokens"  # x/100 = (x/400)^2 at x = 1600
    assert row["lighter_from"].startswith("at or below 100")


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "k.csv"
    assert main(["kernels", "--res", "32", "--attn", "eager", "--out", str(out), *FAST]) == 0
    return out


def test_cli_writes_the_documented_columns(tiny_csv):
    df = pd.read_csv(tiny_csv)
    assert list(df.columns) == KERNELS.columns
    assert set(zip(df.op, df.impl, df.model)) == {("scan", AUTO, "vim_tiny"), ("scan_bidir", AUTO, "vim_tiny"),
                                                  ("mixer_vim", AUTO, "vim_tiny"), ("attention", "eager", "deit_tiny"),
                                                  ("block_deit", "eager", "deit_tiny")}
    assert (df.status == "ok").all() and (df.tokens == 5).all() and (df.res == 32).all() and (df.width == 192).all()
    assert (df.time_ms_p10 <= df.time_ms).all() and (df.time_ms <= df.time_ms_p90).all()
    assert (df.flops_total > 0).all() and (df.bytes > 0).all() and df.mem_peak_gib.notna().all()
    assert ((df.gflops_s - df.flops_total / df.time_ms / 1e6).abs() <= 1e-6 * df.gflops_s).all()
    assert ((df.frac_peak_bw - df.gbs / df.ceiling_gbs).abs() <= 1e-9 + 1e-6 * df.frac_peak_bw).all()
    assert (df.ceiling_gflops_s > 0).all() and df.torch_version.notna().all()
    assert df.command.iloc[0].startswith("vimbench kernels --res 32")
    vim, deit = df[df.model == "vim_tiny"], df[df.model == "deit_tiny"]
    assert (vim.d_state == 16).all() and vim.heads.isna().all() and (deit.heads == 3).all()


def test_cli_records_each_rows_floor(tiny_csv):
    """The CPU capability and exp rate are in every row (cpp builds here), each row's exps are its closed form,
    and its floor is the largest of its three bounds, recomputed here from the row's own columns."""
    df = pd.read_csv(tiny_csv).query("res == 32")
    assert AUTO == "cpp" and (df.cpu_capability == compiled_cpu.cpu_capability()).all()
    assert df.ceiling_exp_s.nunique() == 1 and (df.ceiling_exp_s > 1e6).all()
    directions = df.op.map({"scan": 1, "scan_bidir": 2, "mixer_vim": 2}).fillna(0)
    assert (df.exps == directions * df.batch * df.d_inner.fillna(0) * df.tokens * df.d_state.fillna(0)).all()
    bounds = pd.DataFrame({"flops": df.flops_total / df.ceiling_gflops_s / 1e6,
                           "bytes": df.bytes / df.ceiling_gbs / 1e6, "exp": df.exps / df.ceiling_exp_s * 1e3})
    assert ((df.floor_ms - bounds.max(axis=1)).abs() <= 1e-9 * df.floor_ms).all()
    assert (df.floor_kind == bounds.idxmax(axis=1)).all()
    assert ((df.frac_floor - df.floor_ms / df.time_ms).abs() <= 1e-9 * df.frac_floor).all()


def test_floor_is_the_largest_bound_and_needs_a_ceiling():
    row = dict(amp="none", time_ms=4.0, flops_total=2e9, bytes=1e9, exps=3e8,
               ceiling_gflops_s=1000.0, ceiling_gbs=500.0, ceiling_exp_s=1e11)
    assert floor(row) == {"floor_ms": 3.0, "floor_kind": "exp", "frac_floor": 0.75}  # 2, 2 and 3 ms
    assert floor({**row, "amp": "bf16", "exps": 0, "bytes": 5e8}) == {"floor_ms": 1.0, "floor_kind": "bytes",
                                                                     "frac_floor": 0.25}  # flops not under amp
    assert floor({**row, "ceiling_gflops_s": None, "ceiling_gbs": None, "ceiling_exp_s": None}) == {}
    assert op_exps("scan_bidir", VIM, "train") == 4 * b * 384 * L * 16 and op_exps("attention", DEIT, "infer") == 0


def test_without_the_compiled_kernels_the_exp_rate_is_missing_with_why(monkeypatch):
    monkeypatch.setattr(compiled_cpu, "available", lambda: (False, "no C++ compiler"))
    assert exp_ceiling() == {"exp_missing": "no C++ compiler"}


def test_csv_without_floors_loads_and_summarises(tiny_csv, tmp_path):
    old = tmp_path / "old.csv"
    added = ["exps", "frac_floor", "floor_ms", "floor_kind", "ceiling_exp_s", "cpu_capability"]
    pd.read_csv(tiny_csv).drop(columns=added).to_csv(old, index=False)
    _, df = load_results(old, kinds=("kernels",))
    assert kernel_floors(split_settings("kernels", df)[0]) == [] and "crossovers" in summary(old)
    assert "against its floor" in summary(tiny_csv)


def test_resume_runs_only_what_is_missing(tiny_csv):
    before = tiny_csv.read_text()
    assert main(["kernels", "--res", "32,48", "--models", "deit_tiny", "--attn", "eager", "--out", str(tiny_csv),
                 "--resume", *FAST]) == 0
    assert tiny_csv.read_text().startswith(before)
    df = pd.read_csv(tiny_csv)
    assert len(df) == 7 and set(df.res.iloc[-2:]) == {48} and set(df.op.iloc[-2:]) == {"attention", "block_deit"}


@pytest.mark.slow
def test_local_launcher_gives_the_rows_of_a_plain_run_after_one_preamble_job(tiny_csv, tmp_path):
    out = tmp_path / "local.csv"
    assert main(["kernels", "--res", "32", "--attn", "eager", "--out", str(out), "--launcher", "local",
                 "--workers", "2", *FAST]) == 0
    plain, local = pd.read_csv(tiny_csv).query("res == 32"), pd.read_csv(out)  # not the rows resume added
    key = lambda df: sorted(map(tuple, df[KERNELS.key].astype(str).values))  # noqa: E731
    assert key(local) == key(plain) and (local.status == "ok").all()
    assert (local.launcher == "local").all() and (local.workers == 2).all() and local.job_id.is_unique
    assert (plain.launcher == "plain").all() and (plain.workers == 1).all() and plain.job_id.isna().all()
    assert local.host.notna().all() and local.torch_version.notna().all()
    # one preamble job besides the five configurations' jobs (a folder each); its ceilings are in every row
    jobs = {d.name for d in (tmp_path / "local-jobs").iterdir() if d.name.isdigit()}
    assert set(local.job_id.astype(str)) < jobs and len(jobs) == len(local) + 1
    assert local.ceiling_gbs.nunique() == 1 and (local.ceiling_gbs > 0).all() and local.frac_peak_bw.notna().all()


def test_slurm_submits_the_preamble_then_the_array(tmp_path, fake_slurm, monkeypatch, capsys):
    """Under fake Slurm the preamble (the single job 4242) times out: a warning, no ceilings; the two
    configurations are one array whose tasks fail (sacct), each an error row saying where it was."""
    monkeypatch.setattr(Submitit, "poll_s", 0.1)
    out = tmp_path / "k.csv"
    assert main(["kernels", "--models", "deit_tiny", "--attn", "eager", "--res", "32", "--device", "cuda",
                 "--launcher", "slurm", "--workers", "1", "--out", str(out)]) == 0
    preamble, array = submitted(fake_slurm)
    assert "--array" not in preamble and "#SBATCH --array=0-1%1" in array.splitlines()
    assert "#SBATCH --gpus-per-node=1" in preamble.splitlines()
    err = capsys.readouterr().err
    assert "warning: the preamble job failed (slurm job 4242 ended without a row (state TIMEOUT)" in err
    df = pd.read_csv(out).sort_values("job_id")
    assert list(df.op) == ["attention", "block_deit"]  # array tasks in the order of the configurations
    assert (df.status == "error").all() and (df.launcher == "slurm").all() and (df.device == "cuda:0").all()
    assert list(df.job_id) == ["4242_0", "4242_1"] and list(df.host) == ["n1", "n2"]
    assert df.ceiling_gbs.isna().all() and df.frac_peak_bw.isna().all()


def test_a_failed_preamble_job_leaves_no_ceilings_and_the_scans_untimed(tmp_path, monkeypatch, capsys):
    """The preamble's job ends without a result (as a pre-empted Slurm job does): the attention ops are still
    timed, without ceilings; the scan backend, unchecked, gets error rows and no timing."""
    monkeypatch.setattr(Plain, "run_job", lambda self, fn, cfg, jobs_dir: {
        "status": "error", "error": "slurm job 7 ended without a row (state PREEMPTED)"})
    out = tmp_path / "k.csv"
    assert main(["kernels", "--res", "32", "--attn", "eager", "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "warning: the preamble job failed (slurm job 7 ended without a row (state PREEMPTED)); " \
           "frac_peak_* and the floors left empty" in err
    df = pd.read_csv(out)
    deit, vim = df[df.model == "deit_tiny"], df[df.model == "vim_tiny"]
    assert (deit.status == "ok").all() and (deit.time_ms > 0).all() and len(deit) == 2
    assert deit.ceiling_gbs.isna().all() and deit.frac_peak_bw.isna().all() and deit.frac_peak_flops.isna().all()
    assert (vim.status == "error").all() and vim.time_ms.isna().all() and set(vim.impl) == {AUTO} and len(vim) == 3
    assert vim.repeats.isna().all()  # an untimed row has no timed calls, whatever the configuration asked for
    assert vim.error.str.startswith("correctness not checked: the preamble job failed (slurm job 7").all()


@pytest.mark.parametrize("args,msg", [
    # CPU refusals are asked for on --device cpu: under the default auto, a GPU host would run them
    (["--attn", "efficient", "--device", "cpu"], "--attn efficient"), (["--attn", "fast"], "unknown attention backend"),
    (["--scan", "triton", "--device", "cpu"], "--scan triton"),
    (["--models", "timm:vit_tiny_patch16_224"], "Vim and DeiT"),
    (["--models", "nope"], "unknown model"), (["--res", "1248..224"], "runs backwards"),
    (["--batch", "0"], "--batch must be >= 1"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=needs_no_gpu),
    (["--resume"], "--resume needs --out"),
    (["--compile", "fast"], "--compile 'fast': unknown"), (["--amp", "fp8"], "--amp 'fp8': unknown"),
    (["--mode", "fit"], "--mode 'fit': unknown"), (["--mode", "train", "--grad-checkpointing"], "not to single ops"),
    (["--grad-checkpointing"], "add train to --mode"),
    (["--launcher", "slurm"], "sbatch and srun are not on PATH"), (["--launcher", "nope"], "'--launcher'"),
    (["--workers", "2"], "needs --launcher"),
    pytest.param(["--device", "cuda:all"], "cuda:all: no CUDA GPU", marks=needs_no_gpu),
    pytest.param(["--device", "cuda:0,cuda:1"], "no GPU cuda:0", marks=needs_no_gpu),
])
def test_bad_input_exits_2_with_one_line(args, msg, capsys, tmp_path):
    out = [] if "--resume" in args else ["--out", str(tmp_path / "x.csv")]
    assert main(["kernels", *out, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and msg in err
    assert not (tmp_path / "x.csv").exists()


def test_matched_times_at_common_lengths():
    """scan 1e-4 L ms against attention 1e-7 L^2 ms (OOM at the largest L): one row per common ok length."""
    from helpers_csv import kernel_frame
    from vimbench.analysis.crossovers import matched_times
    (s,) = split_settings("kernels", kernel_frame().assign(mode="train"))
    rows = matched_times(s)
    assert [r["tokens"] for r in rows] == [256, 1024, 4096]
    assert rows[0]["vim"] == "scan [triton]" and rows[0]["attention"] == "attention [eager]"
    assert [r["ratio"] for r in rows] == pytest.approx([1e3 / L for L in (256, 1024, 4096)])
