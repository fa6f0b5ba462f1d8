"""The front doors stay true: fast `--help` without torch, every documented command parses, unknown commands fail.

Commands are taken from README.md (lines starting with `clip-glofnd`, continuation lines joined) and from the
scripts: each script that launches `clip-glofnd` honours DRY_RUN=1 by running its exact command with --dry-run, so
the test runs the script itself for every launcher / loss it offers.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_glofnd import cli
from clip_glofnd.cli import train_command as train_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.sh") if re.search(r"clip-glofnd|clip_glofnd\.cli",
                                                                         p.read_text()))
# environment each script needs for a dry run, and the variants it offers; {digits} = the digits data set (the dry run
# checks that every path exists), {tmp} = the test's folder
DIGITS_DATA = "{digits}/train/{00000..00011}.tar"
SCRIPT_RUNS = {
    "demo.sh": [{"OUT": "{tmp}/out"}, {"OUT": "{tmp}/out", "ORACLE": "1"}],
    "train_cc3m.sh": [{"LOSS": "fastclip", "DATA": DIGITS_DATA}, {"LOSS": "sogclr", "GPUS": "4", "DATA": DIGITS_DATA},
                      {"LAUNCH": "srun", "SLURM_NTASKS": "16", "DATA": DIGITS_DATA}],
    "train_cc12m.sh": [{"LOSS": "fastclip", "DATA": DIGITS_DATA},
                       {"LOSS": "sogclr", "LAUNCH": "srun", "SLURM_NTASKS": "32", "DATA": DIGITS_DATA}],
    "finetune_openclip.sh": [{"PRETRAINED": "{tmp}/open_clip.pt", "DATA": DIGITS_DATA},
                             {"PRETRAINED": "{tmp}/open_clip.pt", "DATA": DIGITS_DATA, "LAUNCH": "torchrun",
                              "GPUS": "2"}],
}


def script_env(env: dict[str, str], digits: Path, tmp: Path) -> dict[str, str]:
    """The process environment for a script's dry run: `env` with {digits} and {tmp} filled in, our python first."""
    (tmp / "open_clip.pt").write_bytes(b"")                         # the dry run checks the file exists, not its bytes
    for bed in ("digits", "digits_minilm"):                          # the demo's bed: the same shards
        if not (tmp / "out" / bed).exists():
            (tmp / "out").mkdir(exist_ok=True)
            (tmp / "out" / bed).symlink_to(digits)
    filled = {key: value.replace("{digits}", str(digits)).replace("{tmp}", str(tmp)) for key, value in env.items()}
    return {**os.environ, **filled, "DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def readme_commands(text: str | None = None) -> list[list[str]]:
    """`clip-glofnd ...` command lines of README.md (code blocks and inline), as argv lists without the program."""
    text = ((ROOT / "README.md").read_text() if text is None else text).replace("\\\n", " ")
    lines = re.findall(r"^\s*(?:\$\s*)?(clip-glofnd\s.*)$", text, flags=re.M)
    lines += re.findall(r"`(clip-glofnd\s[^`]*)`", text)
    commands = [shlex.split(line, comments=True)[1:] for line in dict.fromkeys(lines)]
    return [argv for argv in commands if argv and not argv[0].isupper()]              # not `clip-glofnd COMMAND`


def test_help_is_fast_and_imports_neither_torch_nor_open_clip() -> None:
    code = ("import sys, time; t = time.perf_counter(); from clip_glofnd import cli;"
            " rc = cli.main(['train', '--help']); assert rc == 0, rc;"
            " heavy = [m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules];"
            " print('HEAVY', heavy, 'SECONDS', time.perf_counter() - t)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "--fnd-mask-start-epoch" in result.stdout and "--train-data" in result.stdout
    assert "HEAVY [] SECONDS" in result.stdout
    assert wall < 2.0, f"`clip-glofnd train --help` took {wall:.2f} s"


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_bad_flag_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--train-data", "x", "--fnd", "maybe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clip-glofnd train: error:") and "--fnd" in err[0]


@pytest.mark.parametrize("argv", readme_commands() or [pytest.param([], marks=pytest.mark.skip("no commands yet"))],
                         ids=lambda argv: " ".join(argv[:2]))
def test_readme_command_parses(argv: list[str], digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    """Train commands pass --dry-run (run where demo/digits exists: it checks paths), eval commands parse with its
    parser; other commands are known."""
    assert argv and argv[0] in cli.COMMANDS, argv
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "digits").symlink_to(digits_dir)
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        assert train_main(argv[1:] + ["--dry-run"]) == 0, capsys.readouterr().err
    elif argv[0] == "eval":
        from clip_glofnd.eval_cli import build_parser
        build_parser().parse_args(argv[1:])


def test_readme_command_extraction() -> None:
    text = ('```bash\nclip-glofnd make-digits demo/digits\n$ clip-glofnd train --train-data "d/{0..1}.tar" \\\n'
            '    --fnd glofnd   # a comment\n```\nSee `clip-glofnd COMMAND --help` and `clip-glofnd train --help`.\n')
    assert readme_commands(text) == [["make-digits", "demo/digits"],
                                     ["train", "--train-data", "d/{0..1}.tar", "--fnd", "glofnd"],
                                     ["train", "--help"]]


def test_every_launching_script_is_covered() -> None:
    assert {p.name for p in SCRIPTS} <= set(SCRIPT_RUNS), "add the new script to SCRIPT_RUNS"


@pytest.mark.parametrize("script, env", [(name, env) for name, runs in SCRIPT_RUNS.items() for env in runs],
                         ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_script_command_parses_with_dry_run(script: str, env: dict[str, str], digits_dir: Path,
                                            tmp_path: Path) -> None:
    path = ROOT / "scripts" / script
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60,
                            env=script_env(env, digits_dir, tmp_path))
    assert result.returncode == 0, result.stderr
    assert re.search(r'^train_data: "', result.stdout, flags=re.M), result.stdout


def test_demo_dry_runs_every_run_it_compares(digits_dir: Path, tmp_path: Path) -> None:
    """The demo trains no filter and GloFND (and the oracle with ORACLE=1) with the same seed and recipe."""
    environ = script_env({"ORACLE": "1", "OUT": "{tmp}/out"}, digits_dir, tmp_path)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--seed", "3"], capture_output=True,
                            text=True, timeout=60, env=environ)
    assert result.returncode == 0, result.stderr
    assert re.findall(r'^fnd: "(\w+)"', result.stdout, flags=re.M) == ["none", "glofnd", "oracle"]
    assert re.findall(r"^seed: (\d+)", result.stdout, flags=re.M) == ["3", "3", "3"]
    assert re.findall(r'^logs: "(.*)"', result.stdout, flags=re.M) == [f"{tmp_path}/out/logs"] * 3


def test_scripts_resolve_paths_against_the_callers_folder(digits_dir: Path, tmp_path: Path) -> None:
    """Run from another folder: relative PRETRAINED / DATA are found there, the default LOGS=./logs is there (not in
    the checkout), and a relative path that exists only in the checkout fails the dry run, naming it."""
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    (caller / "data").symlink_to(digits_dir)
    (caller / "oc.pt").write_bytes(b"")
    env = {"PRETRAINED": "oc.pt", "DATA": "data/train/{00000..00011}.tar", "MODEL": "clip-tiny"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_openclip.sh")], cwd=caller, capture_output=True,
                            text=True, timeout=60, env=script_env(env, digits_dir, tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"# run folder: {caller}/logs/finetune-clip-tiny-glofnd" in result.stdout.replace("/./", "/")
    env["PRETRAINED"] = "tests/conftest.py"                             # a file of the checkout, not of the caller
    result = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_openclip.sh")], cwd=caller, capture_output=True,
                            text=True, timeout=60, env=script_env(env, digits_dir, tmp_path))
    assert result.returncode == 2 and "--pretrained: checkpoint tests/conftest.py not found" in result.stderr


def test_dry_run_checks_what_the_run_opens(digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--dry-run fails on one line for an unknown model, a non-finite number or a missing path (torch-free)."""
    data = ["--train-data", str(digits_dir / "train" / "{00000..00011}.tar"), "--logs", str(tmp_path), "--dry-run"]
    cases = [(["--model", "ViT-B-99"], "unknown model 'ViT-B-99'"), (["--fnd-lr", "inf"], "--fnd-lr must be a finite"),
             (["--lr", "nan"], "--lr must be a finite"), (["--zeroshot-data", str(tmp_path / "no")], "--zeroshot-data"),
             (["--retrieval-data", str(digits_dir / "wds" / "digits_cls")], "not a retrieval one"),
             (["--pretrained", str(tmp_path / "x.pt")], "--pretrained: checkpoint"),
             (["--resume", str(tmp_path / "x.pt")], "--resume"),
             (["--train-data", str(digits_dir / "train" / "{00000..00012}.tar")], "1 of 13 shards not found"),
             (["--logs", str(digits_dir / "digits.json" / "logs")], "is a file, not a folder")]
    for extra, message in cases:
        assert cli.main(["train", *data, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert cli.main(["train", *data, "--model", "ViT-B-32", "--zeroshot-data", str(digits_dir / "wds" / "digits_cls"),
                     "--retrieval-data", str(digits_dir / "wds" / "digits_ret")]) == 0


@pytest.mark.parametrize("script", list(SCRIPT_RUNS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_script_help_prints_its_header(script: str, flag: str) -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), flag], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and "Usage:" in result.stdout and not result.stdout.startswith("!")


def test_torchrun_lines_pass_our_flags_through() -> None:
    """torchrun would read our --logs as its --logs-specs ("ambiguous option"): every torchrun line says `-m --`."""
    from torch.distributed.run import get_args_parser
    lines = [line for script in SCRIPTS for line in script.read_text().splitlines()
             if re.search(r"\btorchrun\b.*-m\b", line) and not line.lstrip().startswith("#")]
    assert lines, "no torchrun launch line found in scripts/"
    assert all(" -m -- clip_glofnd.cli" in line for line in lines), lines
    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node=2", "-m", "--", "clip_glofnd.cli", "train",
                                         "--logs", "/shared/logs"])
    assert args.training_script == "clip_glofnd.cli" and args.training_script_args == ["train", "--logs", "/shared/logs"]
