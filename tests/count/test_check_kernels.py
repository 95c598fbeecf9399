"""`vimbench check-kernels`: every launcher configuration compiles for sm_80 and sm_90 without spills."""
import csv
import json
import os

import pytest

from vimbench.commands import main
from vimbench.count.kernel_compile import specialisation
from vimbench.kernels.selective_scan.triton_kernel import kernel_configs

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles the real kernels; TRITON_INTERPRET=1 replaces them")


def test_check_kernels_compiles_both_archs_without_spills(tmp_path, capsys):
    out = tmp_path / "kernels.csv"
    assert main(["check-kernels", "--out", str(out)]) == 0
    assert "sm_90" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(kernel_configs())
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["status"] == "ok", r
        assert int(r["registers"]) > 0 and int(r["spill_bytes"]) == 0 and int(r["shared_bytes"]) >= 0


def test_check_kernels_json(capsys):
    assert main(["check-kernels", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and all(r["registers"] > 0 for r in rows)


def test_check_kernels_bad_out_is_one_line_exit_2(capsys):
    assert main(["check-kernels", "--out", "report.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vimbench check-kernels: error:") and "\n" not in err


def jit_specialisation(fn, args, constexprs, num_warps):
    """What Triton's own JIT binder makes of the launch (signature, constexprs by name, 16-divisible
    argument names), through its internals (Triton 3.4+; skipped where they differ)."""
    jit = pytest.importorskip("triton.runtime.jit")
    if not hasattr(jit, "create_function_from_signature") or not hasattr(fn, "_pack_args"):
        pytest.skip("this Triton's JIT binder has other internals")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(**args, **constexprs, num_warps=num_warps)
    _, signature, consts, attrs = fn._pack_args(backend, {"num_warps": num_warps}, bound, spec, options)
    names = list(signature)
    return (signature, {names[path[0]]: value for path, value in consts.items()},
            [names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr])


@pytest.mark.parametrize("index", range(len(kernel_configs())), ids=[c[0] for c in kernel_configs()])
def test_the_report_compiles_what_the_jit_would(index):
    """The compile report's specialisation of each launch equals the one Triton's JIT derives for it:
    G = 1 a constexpr, E and every pointer divisible by 16, L (6085) not."""
    label, fn, args, constexprs, num_warps = kernel_configs()[index]
    ours = specialisation(args, constexprs)
    assert ours == jit_specialisation(fn, args, constexprs, num_warps)
    signature, consts, divisible = ours
    assert consts["G"] == 1 and "E" in divisible and "L" not in divisible and signature["L"] == "i32"
