"""The claim logic of a scaling report: verdicts on the paper's Fig. 1 ratios, expected exponents and their
reading, on constructed sweeps with known ratios."""
from helpers_csv import scaling_frame

from vimbench.analysis.claims import claim_check, expected_exponent, reading, verdict
from vimbench.analysis.fit import PowerLawFit
from vimbench.rows.reader import load_results, split_settings


def _checks(tmp_path, frame):
    frame.to_csv(tmp_path / "r.csv", index=False)
    (s,) = split_settings(*load_results(tmp_path / "r.csv"))
    return {k: {r["claim"]: r for r in rows} for k, rows in claim_check(s).items()}


def test_claim_verdicts_on_constructed_ratios(tmp_path):
    # Vim/DeiT FPS: 1.0 at 512 (paper 1.0), 1.5 at 640 (paper 1.10: off by 1.37x), 2.19*1.2 at 1024 (within 1.25x);
    # memory: 0.728 at 512 (paper 0.728), twice the paper's at 1024.
    c = _checks(tmp_path, scaling_frame(speed={512: 1.0, 640: 1.5, 1024: 81.3 / 37.2 * 1.2},
                                        memory={512: 0.728, 1024: 2 * 8.13 / 40.09}))
    eager, fused = c["eager"], c["fused"]
    assert eager["Vim/DeiT FPS at 512"]["verdict"] == "reproduced"
    assert eager["Vim/DeiT FPS at 640"]["verdict"] == "not reproduced (same direction, different size)"
    assert eager["Vim/DeiT FPS at 1024"]["verdict"] == "reproduced"
    assert eager["Vim/DeiT FPS at 738"]["verdict"] == "not reproduced (opposite direction)"  # Vim 0.57x there
    assert eager["Vim/DeiT memory at 512"]["measured"] == "0.728 (mem_nvml_gib)"
    assert eager["Vim/DeiT memory at 512"]["verdict"] == "reproduced"
    assert eager["Vim/DeiT memory at 1024"]["verdict"] == "not reproduced (same direction, different size)"
    # deit eager is OOM at 1248: the OOM claim holds, the 2.8x and 86.8% cannot be measured
    assert eager["DeiT OOM at 1248"]["verdict"] == "reproduced"
    assert eager["Vim/DeiT FPS at 1248"]["verdict"] == "not measurable here (DeiT oom)"
    assert eager["Vim/DeiT memory at 1248"]["verdict"] == "not measurable here (DeiT oom)"
    # fused-attention DeiT runs at 1248: OOM not reproduced, the ratios are measured
    assert fused["DeiT OOM at 1248"]["verdict"] == "not reproduced (DeiT fits)"
    assert fused["Vim/DeiT FPS at 1248"]["res"] == "1248 (sdpa)"
    assert fused["Vim/DeiT FPS at 1248"]["verdict"].startswith("not reproduced")


def test_resolution_outside_the_sweep_and_patch_grid_matching(tmp_path):
    frame = scaling_frame(speed={1024: 81.3 / 37.2})
    frame = frame[frame["res"] != 640]
    frame.loc[frame["res"] == 738, ["res"]] = 736  # same 46 x 46 patch grid as the paper's 738
    c = _checks(tmp_path, frame)["eager"]
    assert c["Vim/DeiT FPS at 640"]["verdict"] == "not measurable here (resolution not in the sweep)"
    assert c["Vim/DeiT FPS at 738"]["res"] == "736 (eager)" and c["Vim/DeiT FPS at 738"]["measured"]
    assert c["Vim/DeiT FPS at 1024"]["verdict"] == "reproduced"


def test_oom_then_smaller_batch_counts_as_oom_and_blocks_the_memory_ratio(tmp_path):
    frame = scaling_frame(speed={1024: 81.3 / 37.2})
    frame["batch_requested"] = frame["batch"]
    frame.loc[(frame["res"] == 1024) & (frame["impl"] == "eager"), "batch"] = 32
    c = _checks(tmp_path, frame)["eager"]
    assert c["Vim/DeiT FPS at 1024"]["res"] == "1024 (eager, batch 32)"
    assert c["Vim/DeiT memory at 1024"]["verdict"] == "not measurable here (Vim ran at batch 64, DeiT at 32)"


def test_cpu_run_is_measured_but_not_judged(tmp_path):
    c = _checks(tmp_path, scaling_frame(device="cpu"))["eager"]
    assert c["Vim/DeiT FPS at 512"]["measured"]
    assert c["Vim/DeiT FPS at 512"]["verdict"] == "not measurable here (CPU run)"


def test_verdict_tolerance_and_expectations():
    assert verdict(2.8, 2.8 * 1.24) == verdict(2.8, 2.8 / 1.24) == "reproduced"
    assert verdict(2.8, 2.8 * 1.26) == "not reproduced (same direction, different size)"
    assert verdict(2.8, 0.9) == "not reproduced (opposite direction)"
    assert expected_exponent("deit", "flash", "memory") == 1 and expected_exponent("deit", "eager", "memory") == 2
    assert expected_exponent("vim", "triton", "time") == 1 and expected_exponent("timm", "x", "time") is None
    whole, upper = PowerLawFit(1.2, 1.1, 1.3, 1, 7), PowerLawFit(1.5, 1.3, 1.7, 1, 4)
    assert reading(2.0, whole, upper).startswith("heading toward 2")
    assert reading(1.0, PowerLawFit(1.02, 0.97, 1.07, 1, 7), None) == "consistent with 1 (whole sweep)"
    two_points = PowerLawFit(3.0, float("nan"), float("nan"), 1, 2)  # not used: the whole sweep is judged
    assert reading(1.0, PowerLawFit(0.8, 0.75, 0.85, 1, 4), two_points) == "below the expected 1 (whole sweep k=0.80)"
    assert reading(2.0, PowerLawFit(0.0, -2.5, 2.5, 1, 4), None).startswith("too noisy to judge")
