"""Values with control characters, and values of the wrong type, on their way to an sbatch script: hypothesis puts
them in --partition, an --sbatch key or value, an --out path (its jobs folder lands in the script), or the
partition, counts and [sbatch] table of a --slurm-config file (TOML or JSON), and runs ``vimbench scaling
--launcher slurm`` against a fake Slurm (``helpers.fake_slurm``: sbatch keeps every script it is given). The rule:
exit 2, one line naming the option, no script submitted, no CSV written. Legal values pass unchanged."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import slurm_commands, submitted
from run_cli import run_cli, the_one_line
from vimbench.measure import launchers

ARGV = ["scaling", "--models", "deit_tiny", "--attn", "eager", "--res", "32", "--device", "cpu",
        "--launcher", "slurm"]
CONTROL = ["\n", "\r", "\t", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028", "\x00"]
PAYLOADS = ["", "touch PWNED", "#SBATCH --gres=gpu:8", "x"]
PLACES = ["--partition", "--sbatch key", "--sbatch value", "--out", "partition", "sbatch key", "sbatch value"]
"""Where a hostile text goes: an option, or (no leading --) a --slurm-config setting."""
WRONG_TYPES = [("time_limit", True), ("workers", False), ("gpus_per_task", True), ("time_limit", 1.5),
               ("workers", "2"), ("time_limit", None), ("partition", 5), ("partition", ["gpu"]), ("partition", ""),
               ("sbatch", {"mem": [4]}), ("sbatch", {"mem": {"a": 1}}), ("sbatch", {"exclusive": False}),
               ("sbatch", {"mem": None}), ("sbatch", {"mem": math.nan}), ("sbatch", {"mem": math.inf}),
               ("sbatch", {"": "x"}), ("sbatch", {"-x": "1"}), ("sbatch", {"a b": "1"}), ("sbatch", {"a=b": "1"})]
"""--slurm-config settings (JSON) that must be refused: bools are not ints, and only text, numbers or true
(a bare flag) reach sbatch."""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """``helpers.fake_slurm`` for the module: yields the folder of the scripts sbatch was given."""
    bin_dir, scripts = slurm_commands(tmp_path_factory.mktemp("slurm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        mp.setattr(launchers.Submitit, "poll_s", 0.05)
        yield scripts


def _toml_string(text: str) -> str:
    return '"' + "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
                         for c in text) + '"'


def _config(folder: Path, settings: dict, as_toml: bool) -> str:
    """A --slurm-config file holding ``settings`` (strings and a table of strings only, if ``as_toml``)."""
    if as_toml:
        lines = [f"{_toml_string(k)} = {_toml_string(v)}" for k, v in settings.items() if k != "sbatch"]
        table = settings.get("sbatch", {})
        lines += ["[sbatch]", *(f"{_toml_string(k)} = {_toml_string(v)}" for k, v in table.items())]
        path = folder / "slurm.toml"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = folder / "slurm.json"
        path.write_text(json.dumps(settings))
    return str(path)


def _refused(scripts: Path, folder: Path, argv: list[str], out: Path, naming: str) -> None:
    count = len(submitted(scripts))
    rc, _, err = run_cli(argv)
    line = the_one_line(err, "scaling")
    assert rc == 2 and line.startswith(f"vimbench scaling: error: {naming}"), err
    assert len(submitted(scripts)) == count and not out.exists() and not (folder / "PWNED").exists()


hostile = st.builds(lambda a, c, b: a + c + b, st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                                                     blacklist_characters="=,"), max_size=6),
                    st.sampled_from(CONTROL), st.sampled_from(PAYLOADS))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(place=st.sampled_from(PLACES), text=hostile, as_toml=st.booleans())
def test_a_control_character_on_the_way_to_sbatch_is_one_line_exit_2(slurm, place, text, as_toml):
    if place.startswith("--") and "\x00" in text:
        text = text.replace("\x00", "\n")  # a command line cannot hold NUL
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "s.csv"
        options = {"--partition": ["--partition", text], "--sbatch key": ["--sbatch", f"{text}=1"],
                   "--sbatch value": ["--sbatch", f"account={text}"], "--out": []}.get(place)
        if options is None:
            setting = {"partition": {"partition": text}, "sbatch key": {"sbatch": {text: "1"}},
                       "sbatch value": {"sbatch": {"account": text}}}[place]
            options, naming = ["--slurm-config", _config(folder, setting, as_toml)], "--slurm-config"
        else:
            naming = place.split()[0]
        if place == "--out":
            out = folder / f"s{text}.csv"
        _refused(slurm, folder, [*ARGV, *options, "--out", str(out)], out, naming)


@settings(max_examples=len(WRONG_TYPES), deadline=None, derandomize=True, database=None)
@given(setting=st.sampled_from(WRONG_TYPES))
def test_a_setting_of_the_wrong_type_is_one_line_exit_2(slurm, setting):
    name, value = setting
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = _config(folder, {name: value}, as_toml=False)
        _refused(slurm, folder, [*ARGV, "--slurm-config", config, "--out", str(folder / "s.csv")],
                 folder / "s.csv", "--slurm-config")


def test_legal_values_reach_the_script_as_given(slurm, tmp_path):
    config = _config(tmp_path, {"partition": "gpu a100", "sbatch": {"comment": "naïve run", "exclusive": True,
                                                                    "mem": 4}}, as_toml=False)
    Path(config).write_text(Path(config).read_text().replace('"mem": 4', '"mem": 4, "nice": 1.5'))
    rc, _, err = run_cli([*ARGV, "--slurm-config", config, "--sbatch", "account=a-b_c", "--out",
                          str(tmp_path / "s.csv")])
    assert rc == 0, err
    lines = submitted(slurm)[-1].splitlines()
    for line in ("#SBATCH --partition='gpu a100'", "#SBATCH --comment='naïve run'", "#SBATCH --exclusive",
                 "#SBATCH --mem=4", "#SBATCH --nice=1.5", "#SBATCH --account=a-b_c"):
        assert line in lines
