"""The command line: bad input is one line on stderr with exit code 2; models and flops work."""
import subprocess
import sys

import pandas as pd
import pytest

from vimbench.commands import main
from helpers import fresh_plugins, register_forward_only_scan  # noqa: F401  (fresh_plugins: a fixture)


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,msg", [
    (["flops", "--res", "1248..224"], "runs backwards"),
    (["flops", "--res", "abc"], "cannot read resolution"),
    (["flops", "--res", "8"], "smaller than the patch size"),
    (["flops", "--models", "vim_huge"], "unknown model 'vim_huge'"),
    (["flops", "--attn", "fast"], "unknown attention backend 'fast'"),
    (["flops", "--scan", "fast"], "unknown scan backend 'fast'"),
    (["flops", "--batch", "0"], "--batch must be >= 1"),
    (["flops", "--batch", "x"], "'x' is not a valid integer"),
    (["flops", "--nope"], "No such option '--nope'"),
    (["flops", "--mode", "training"], "--mode 'training': unknown"),
    (["flops", "--mode", ","], "--mode: no value given"),
    (["flops", "--grad-checkpointing"], "add train to --mode"),
    (["nope"], "No such command 'nope'"),
])
def test_bad_input_is_one_line_exit_2(argv, msg, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and msg in err and "Traceback" not in err


def test_flops_of_a_train_step_refuses_a_forward_only_scan(fresh_plugins, capsys):
    name = register_forward_only_scan()
    code, _, err = run(["flops", "--scan", name, "--mode", "train"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"--scan {name}: forward-only" in err


def test_models_lists_registry(capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    assert "vim_tiny" in out and "7,148,008" in out and "deit_tiny" in out and "5,717,416" in out


def test_flops_writes_csv(tmp_path, capsys):
    out_csv = tmp_path / "flops.csv"
    code, out, _ = run(["flops", "--models", "vim_tiny,deit_tiny", "--res", "224,1248", "--out", str(out_csv)],
                       capsys)
    assert code == 0
    df = pd.read_csv(out_csv)
    assert list(df.columns[:6]) == ["model", "family", "impl", "res", "tokens", "batch"]
    assert len(df) == 6 and set(df.tokens) == {197, 6085} and set(df.impl) == {"auto", "eager", "sdpa"}
    assert (df.flops_total == df.flops_scan + df.flops_attention + df.flops_linear + df.flops_other).all()
    assert df.command.str.startswith("vimbench flops").all() and df.torch_version.notna().all()
    before = out_csv.read_bytes()  # an existing CSV is never overwritten; --resume finds nothing left to do
    code, _, err = run(["flops", "--models", "vim_tiny", "--res", "224", "--out", str(out_csv)], capsys)
    assert code == 2 and "already holds results" in err and out_csv.read_bytes() == before
    code, _, _ = run(["flops", "--models", "vim_tiny,deit_tiny", "--res", "224,1248", "--out", str(out_csv),
                      "--resume"], capsys)
    assert code == 0 and out_csv.read_bytes() == before


def test_cli_py_from_checkout_matches_console_script():
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    a = subprocess.run([sys.executable, str(root / "cli.py"), "flops", "--res", "abc"], capture_output=True, text=True)
    assert a.returncode == 2 and a.stderr.strip() == "vimbench flops: error: --res: cannot read resolution 'abc': " \
                                                     "use N, A..B or A..B:STEP, comma-separated"


def test_flops_train_rows(tmp_path, capsys):
    out_csv = tmp_path / "flops.csv"
    code, _, _ = run(["flops", "--models", "deit_tiny", "--attn", "eager", "--res", "32", "--mode", "infer,train",
                      "--grad-checkpointing", "--out", str(out_csv)], capsys)
    assert code == 0
    df = pd.read_csv(out_csv).set_index("mode")
    assert list(df.index) == ["infer", "train"] and list(df.grad_checkpointing) == [False, True]
    assert df.loc["train", "flops_attention"] == 4 * df.loc["infer", "flops_attention"]  # fwd, recompute, 2x bwd
