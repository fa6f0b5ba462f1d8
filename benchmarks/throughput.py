"""Training throughput of `clip-glofnd train` (plain CLIP loss, then CLIP + GloFND) against OpenCLIP's trainer.

The three trainers run one after the other in one invocation, each in its own process, on the same WebDataset
shards (the digits training set, 64 px), the same model (clip-tiny: clip_glofnd/model_configs/clip-tiny.json,
registered with `open_clip.add_model_config` for OpenCLIP), batch size, precision (fp32: OpenCLIP's default amp is
~13x slower on a CPU), loader workers, optimiser settings and torch threads. The order alternates between repeats
(A B C, then C B A, ...) so that a slow drift of the machine's load does not favour one trainer.

How samples/s is measured, the same way for both: each trainer logs every step, and both define a step's time as
the wall time from the end of the previous step to the end of this one (data wait + forward + loss + backward +
optimizer + that step's logging). OpenCLIP prints it as "N/s" with --log-every-n-steps 1 (its meters are reset at
every log line, so the value is that step's); `clip-glofnd train` writes data_time + step_time per step to
metrics.jsonl. The first --skip-steps steps of a run (process warm-up) and partial batches are left out; the first
step of every later epoch (loader restart) stays in, for both. A run's rate is samples / summed time of its counted
steps. Headline per trainer: its best repeat (other processes only ever slow a run down, so the fastest repeat is
the closest to an idle machine); also in the JSON: the rate pooled over all repeats, the median per-step rate, the
per-repeat ratios and every step's seconds. Start-up, checkpoint writing and evaluation are outside the step times;
the process wall time is in the JSON (`wall_s`) for the whole picture. OpenCLIP evaluates nothing here (no
--val-data / --imagenet-val); ours gets no eval data either.

    python -m benchmarks.throughput                 # ~3 min on 2 idle cores (3 trainers x 3 repeats x 2 epochs)
    python -m benchmarks.throughput --quick         # seconds of training + ~3 process start-ups (CI)
    python -m benchmarks.throughput --profile 20    # also cProfile 20 steps of ours (CLIP + GloFND), in-process
    python -m benchmarks.throughput --device cuda --model ViT-B-32 --precision amp_bf16 --batch-size 256 --workers 8
    python -m benchmarks.throughput --device cuda --model ViT-B-32 --precision amp_bf16 --batch-size 256 --workers 8 \
        --torch-compile                             # both trainers compiled (ours: once issue #17 is merged)

Writes benchmarks/results/throughput_<device type>.json (commands, machine and load, per-run numbers, ratios). The
GPU form (the same digits shards, resized by the model's preprocess) has not been run yet: no GPU was lent.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _common

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
MODEL_JSON = ROOT / "clip_glofnd" / "model_configs" / "clip-tiny.json"
TRAINERS = ("openclip", "ours_clip", "ours_glofnd")
OPENCLIP_WRAPPER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                    "from open_clip_train.main import main; sys.exit(main(sys.argv[2:]) or 0)")
OPENCLIP_STEP = re.compile(r"Train Epoch: \d+ \[.*?\] .*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,")   # group 1: N/s
OPENCLIP_WINDOW = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*?\] .*?Batch \(t\): ([\d.]+),")   # epoch, seen, avg
PRESETS = {
    "full": dict(epochs=3, repeats=3, skip_steps=3, batch_size=64, train_num_samples=None, log_every_n_steps=100),
    "quick": dict(epochs=1, repeats=1, skip_steps=2, batch_size=32, train_num_samples=256, log_every_n_steps=1),
}
TARGET_RATIO = 1.0                     # ours with GloFND at least as fast as OpenCLIP


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags; unset ones take the preset (full, or quick with --quick)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repeat, 1 short epoch, batch 32 (CI)")
    p.add_argument("--data", help="digits folder (clip-glofnd make-digits DIR); built in a temporary folder if unset "
                                  "or missing")
    p.add_argument("--epochs", type=int, help="epochs per run (default 2)")
    p.add_argument("--repeats", type=int, help="runs of each trainer, order alternating (default 3)")
    p.add_argument("--skip-steps", type=int, help="first steps of each run left out of the rates (default 3): with "
                                                  "--log-every-n-steps N > 1, every log window that starts there")
    p.add_argument("--log-every-n-steps", type=int, help="both trainers' log interval (default 100, OpenCLIP's; 1 "
                                                         "times every step, but then both read the device every step)")
    p.add_argument("--batch-size", type=int, help="batch size (default 64)")
    p.add_argument("--train-num-samples", type=int, help="samples per epoch (default: the whole digits set)")
    p.add_argument("--workers", type=int, default=1, help="data loader workers, both trainers")
    p.add_argument("--fnd-alpha", type=float, default=0.05, help="GloFND alpha (masking on from the first step)")
    p.add_argument("--model", default="clip-tiny", help="open_clip model name, both trainers (default clip-tiny)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "amp", "amp_bf16"),
                   help="both trainers (default fp32: fp16 autocast is ~13x slower on a CPU)")
    p.add_argument("--device", default="cpu", help="torch device, both trainers (default cpu; cuda on a GPU)")
    p.add_argument("--torch-compile", action="store_true",
                   help="pass --torch-compile to both trainers (OpenCLIP's flag; `clip-glofnd train` takes it once "
                        "issue #17's training step is merged)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also run ours (CLIP + GloFND) in-process under cProfile for STEPS steps; top functions go "
                        "into the JSON")
    p.add_argument("--output", type=Path, help="result JSON (default benchmarks/results/throughput_<device>.json)")
    ns = p.parse_args(list(argv))
    for key, value in PRESETS["quick" if ns.quick else "full"].items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    if ns.repeats < 1 or ns.epochs < 1 or ns.batch_size < 1 or ns.skip_steps < 0 or ns.log_every_n_steps < 1:
        p.error("--repeats, --epochs, --batch-size and --log-every-n-steps must be >= 1, --skip-steps >= 0")
    ns.output = ns.output or _common.RESULTS_DIR / f"throughput_{ns.device.split(':')[0]}.json"
    return ns


def prepare_data(folder: str | None, scratch: Path) -> dict[str, Any]:
    """The digits summary (clip_glofnd.digits.make_digits), reusing `folder` when it already holds the set."""
    from clip_glofnd.digits import make_digits
    out = Path(folder) if folder else scratch / "digits"
    summary_file = out / "digits.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    return make_digits(out, seed=0)


def shared_flags(ns: argparse.Namespace, num_samples: int, epochs: int) -> list[str]:
    """Flags both trainers spell the same way, with the same values."""
    flags = ["--model", ns.model, "--batch-size", str(ns.batch_size), "--epochs", str(epochs),
             "--lr", "1e-3", "--wd", "0.1", "--warmup", "50", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
             "--precision", ns.precision, "--device", ns.device, "--workers", str(ns.workers), "--seed", "0",
             "--train-num-samples", str(num_samples), "--log-every-n-steps", str(ns.log_every_n_steps)]
    return flags + (["--torch-compile"] if ns.torch_compile else [])


def commands(ns: argparse.Namespace, data: dict[str, Any], logs: Path, repeat: int) -> dict[str, list[str]]:
    """The command line of each trainer for one repeat (run names differ per repeat)."""
    num_samples = ns.train_num_samples or data["num_samples"]
    common = ["--train-data", data["train"], *shared_flags(ns, num_samples, ns.epochs), "--logs", str(logs)]
    ours = [sys.executable, "-m", "clip_glofnd.cli", "train", *common, "--save-frequency", "0"]
    return {
        "openclip": [sys.executable, "-c", OPENCLIP_WRAPPER, str(MODEL_JSON), *common, "--dataset-type",
                     "webdataset", "--save-frequency", "0", "--name",
                     f"openclip-{repeat}"],
        "ours_clip": [*ours, "--fnd", "none", "--name", f"ours_clip-{repeat}"],
        "ours_glofnd": [*ours, "--fnd", "glofnd", "--fnd-alpha", str(ns.fnd_alpha), "--name", f"ours_glofnd-{repeat}"],
    }


def openclip_steps(text: str, batch_size: int) -> list[tuple[int, float]]:
    """(samples, seconds) per step from OpenCLIP's log lines ("... Batch (t): 0.201, 318.4/s, ...").

    With --log-every-n-steps 1 each line is one step; "N/s" = batch_size / that step's time (6 significant digits,
    more precise than the 3-decimal "Batch (t)"). OpenCLIP drops partial batches, so every step is a full batch.
    """
    return [(batch_size, batch_size / float(match.group(1))) for match in OPENCLIP_STEP.finditer(text)]


def ours_steps(metrics_jsonl: Path) -> list[tuple[int, float]]:
    """(samples, seconds) per step from our metrics.jsonl: samples_per_s × (data_time + step_time) = batch length."""
    steps = []
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        if "step_time" in record:
            seconds = record["data_time"] + record["step_time"]
            steps.append((round(record["samples_per_s"] * seconds), seconds))
    return steps


def openclip_windows(text: str, batch_size: int) -> list[tuple[int, float, int]]:
    """(samples, seconds, steps) per log window from OpenCLIP's lines with --log-every-n-steps N: its meters are
    reset at every line, so "Batch (t)" is the window's mean step time (3 decimals) and the window's steps follow
    from the samples counter of the epoch ("[ 6400/..."). A line closes every epoch."""
    windows, last = [], (None, 0)
    for match in OPENCLIP_WINDOW.finditer(text):
        epoch, seen, mean = int(match.group(1)), int(match.group(2)), float(match.group(3))
        steps = (seen - (last[1] if last[0] == epoch else 0)) // batch_size
        windows.append((steps * batch_size, steps * mean, steps))
        last = (epoch, seen)
    return windows


def ours_windows(metrics_jsonl: Path) -> list[tuple[int, float, int]]:
    """(samples, seconds, steps) per log window from our metrics.jsonl: the window's samples from the samples_seen
    counter, its seconds from its samples_per_s (wall time since the previous record)."""
    windows, seen, step = [], 0, 0
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        if "samples_per_s" in record:
            samples = record["samples_seen"] - seen
            windows.append((samples, samples / record["samples_per_s"], record["step"] - step))
            seen, step = record["samples_seen"], record["step"]
    return windows


def run_trainer(trainer: str, cmd: list[str], logs: Path, batch_size: int, skip: int,
                timeout: float | None = None) -> dict[str, Any]:
    """Run one trainer to completion in its own process; its per-step (or per-window) times summarised (see module
    docstring).

    `timeout` (seconds) kills a run that overruns (subprocess.TimeoutExpired), for callers with a deadline."""
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{trainer} failed (exit {done.returncode}): {shlex.join(cmd)}\n{tail}")
    name = cmd[cmd.index("--name") + 1]
    log_every = int(cmd[cmd.index("--log-every-n-steps") + 1])
    if log_every > 1:
        return _run_windows(trainer, name, done.stdout + done.stderr, logs, batch_size, skip, wall, load_before)
    if trainer == "openclip":
        steps = openclip_steps(done.stdout + done.stderr, batch_size)
    else:
        steps = ours_steps(logs / name / "metrics.jsonl")
    counted = [(n, s) for n, s in steps[skip:] if n == batch_size]
    if not counted:
        raise RuntimeError(f"{trainer}: no full-batch steps after the first {skip} (logged {len(steps)})")
    rates = [n / s for n, s in counted]
    samples, seconds = sum(n for n, _ in counted), sum(s for _, s in counted)
    return {"trainer": trainer, "name": name, "wall_s": wall, "steps_logged": len(steps), "steps_counted":
            len(counted), "samples_counted": samples, "step_seconds_counted": seconds,
            "samples_per_s": samples / seconds, "median_samples_per_s": statistics.median(rates),
            "step_seconds": [round(s, 4) for _, s in steps],
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}


def _run_windows(trainer: str, name: str, output: str, logs: Path, batch_size: int, skip: int, wall: float,
                 load_before: float) -> dict[str, Any]:
    """run_trainer's summary from log windows: the windows that start after the first `skip` steps."""
    if trainer == "openclip":
        windows = openclip_windows(output, batch_size)
    else:
        windows = ours_windows(logs / name / "metrics.jsonl")
    counted, first = [], 1
    for samples, seconds, steps in windows:
        if first > skip and steps:
            counted.append((samples, seconds, steps))
        first += steps
    if not counted:
        raise RuntimeError(f"{trainer}: no log window starts after the first {skip} steps (windows {windows})")
    samples, seconds = sum(w[0] for w in counted), sum(w[1] for w in counted)
    rates = [w[0] / w[1] for w in counted]
    return {"trainer": trainer, "name": name, "wall_s": wall, "steps_logged": sum(w[2] for w in windows),
            "steps_counted": sum(w[2] for w in counted), "samples_counted": samples, "step_seconds_counted": seconds,
            "samples_per_s": samples / seconds, "median_samples_per_s": statistics.median(rates),
            "windows": [[w[0], round(w[1], 4), w[2]] for w in windows],
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}


def run_order(repeat: int) -> tuple[str, ...]:
    """Trainer order of a repeat: forward on even repeats, backward on odd ones."""
    return TRAINERS if repeat % 2 == 0 else TRAINERS[::-1]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per trainer over its repeats: the best repeat's samples/s (headline: load only ever slows a run down), the
    pooled rate over all counted steps, the best repeat's median step rate, the mean process wall time."""
    out = {}
    for trainer in TRAINERS:
        mine = [r for r in runs if r["trainer"] == trainer]
        samples = sum(r["samples_counted"] for r in mine)
        seconds = sum(r["step_seconds_counted"] for r in mine)
        out[trainer] = {"samples_per_s": max(r["samples_per_s"] for r in mine),
                        "pooled_samples_per_s": samples / seconds,
                        "median_step_samples_per_s": max(r["median_samples_per_s"] for r in mine),
                        "mean_wall_s": statistics.mean(r["wall_s"] for r in mine), "repeats": len(mine)}
    return out


def ratios(summary: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """ours / OpenCLIP on the best repeats (headline), on the pooled rates, on median step rates, and per repeat."""
    out: dict[str, Any] = {}
    by_repeat: dict[int, dict[str, float]] = {}
    for r in runs:
        by_repeat.setdefault(r["repeat"], {})[r["trainer"]] = r["samples_per_s"]
    for ours in ("ours_clip", "ours_glofnd"):
        for key, suffix in (("samples_per_s", ""), ("pooled_samples_per_s", "_pooled"),
                            ("median_step_samples_per_s", "_median_step")):
            out[f"{ours}_vs_openclip{suffix}"] = summary[ours][key] / summary["openclip"][key]
        out[f"{ours}_vs_openclip_per_repeat"] = [v[ours] / v["openclip"] for _, v in sorted(by_repeat.items())]
    out["glofnd_vs_clip"] = summary["ours_glofnd"]["samples_per_s"] / summary["ours_clip"]["samples_per_s"]
    return out


PROFILE_CONTEXT = ("run_backward", "adam.py:", "dataloader.py:", "grad_scaler.py:")   # torch work around our code


def profile_ours(ns: argparse.Namespace, data: dict[str, Any], logs: Path, top: int = 40) -> dict[str, Any]:
    """cProfile of `clip-glofnd train` (CLIP + GloFND) in this process for --profile steps (imports warmed first, so
    they do not crowd the table): cumulative seconds and ms per step of every clip_glofnd function and of torch's
    backward, optimizer and data-loader calls, plus the top functions by own time."""
    import cProfile
    import pstats

    import matplotlib.figure  # noqa: F401  (warm imports: their one-time cost is not the trainer's per-step cost)
    import open_clip  # noqa: F401

    from clip_glofnd import cli, evaluate, train  # noqa: F401
    argv = ["train", "--train-data", data["train"], *shared_flags(ns, ns.profile * ns.batch_size, 1), "--logs",
            str(logs), "--name", "profile", "--save-frequency", "0", "--fnd", "glofnd",
            "--fnd-alpha", str(ns.fnd_alpha)]
    profiler = cProfile.Profile()
    profiler.enable()
    code = cli.main(argv)
    profiler.disable()
    if code != 0:
        raise RuntimeError(f"profiled run failed with exit code {code}")
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in pstats.Stats(profiler).stats.items():  # type: ignore
        name = f"{Path(file).name}:{line}:{func}" if line else func
        rows.append({"function": name, "ncalls": ncalls, "tottime_s": tottime, "cumtime_s": cumtime,
                     "cum_ms_per_step": 1000 * cumtime / ns.profile,
                     "ours": f"{os.sep}clip_glofnd{os.sep}" in file})
    rows.sort(key=lambda r: r["cumtime_s"], reverse=True)
    focus = [r for r in rows if r["ours"] or any(key in r["function"] for key in PROFILE_CONTEXT)]
    return {"command": shlex.join(["clip-glofnd", *argv]), "steps": ns.profile, "ours_and_torch_cumulative":
            focus[:top], "top_self": sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:top]}


def report(result: dict[str, Any]) -> str:
    """Markdown tables: per trainer (best repeat, pooled, best median step rate, wall) and the ratios."""
    rows = [{"trainer": t, **v} for t, v in result["summary"].items()]
    table = _common.format_table(rows, [("trainer", "trainer", "s", 1), ("samples_per_s", "samples/s (best)", ".1f", 1),
                                        ("pooled_samples_per_s", "pooled", ".1f", 1),
                                        ("median_step_samples_per_s", "median step", ".1f", 1),
                                        ("mean_wall_s", "process wall s", ".1f", 1)])
    r = result["ratios"]
    lines = [table, ""]
    for ours, label in (("ours_clip", "ours CLIP   / OpenCLIP"), ("ours_glofnd", "ours GloFND / OpenCLIP")):
        lines.append(f"{label}  {r[f'{ours}_vs_openclip']:.3f} (pooled {r[f'{ours}_vs_openclip_pooled']:.3f}, median "
                     f"step {r[f'{ours}_vs_openclip_median_step']:.3f}, per repeat "
                     f"{', '.join(f'{x:.2f}' for x in r[f'{ours}_vs_openclip_per_repeat'])})")
    lines += [f"ours GloFND / ours CLIP  {r['glofnd_vs_clip']:.3f}",
              f"target ours GloFND / OpenCLIP >= {TARGET_RATIO}: {'met' if result['targets']['met'] else 'NOT met'}"
              f"   under load: {result['machine']['under_load']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every trainer --repeats times (alternating order), write the JSON, print the tables."""
    import torch
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    machine = _common.machine_info(torch.device(ns.device))
    runs = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as scratch:
        data = prepare_data(ns.data, Path(scratch))
        logs = Path(scratch) / "logs"
        for repeat in range(ns.repeats):
            cmds = commands(ns, data, logs, repeat)
            for trainer in run_order(repeat):
                logger.info("repeat %d: %s", repeat, trainer)
                run = run_trainer(trainer, cmds[trainer], logs, ns.batch_size, ns.skip_steps)
                runs.append({"repeat": repeat, **run, "command": shlex.join(cmds[trainer])})
        profile = profile_ours(ns, data, logs) if ns.profile else None
    summary = aggregate(runs)
    result = {"benchmark": "throughput", "command": _common.command_line("benchmarks.throughput", argv),
              "machine": _common.finish_info(machine),
              "settings": {"model": ns.model, "device": ns.device, "batch_size": ns.batch_size, "epochs": ns.epochs,
                           "repeats": ns.repeats, "skip_steps": ns.skip_steps, "workers": ns.workers,
                           "log_every_n_steps": ns.log_every_n_steps, "torch_compile": ns.torch_compile,
                           "precision": ns.precision, "train_num_samples": ns.train_num_samples or data["num_samples"],
                           "fnd_alpha": ns.fnd_alpha, "data": "digits train shards (make_digits seed 0)"},
              "runs": runs, "summary": summary, "ratios": ratios(summary, runs)}
    headline = result["ratios"]["ours_glofnd_vs_openclip"]
    result["targets"] = {"ratio_min": TARGET_RATIO, "ours_glofnd_vs_openclip": headline,
                         "met": headline >= TARGET_RATIO}
    if profile:
        result["profile"] = profile
    _common.write_json(ns.output, result)
    print(report(result))
    print(f"wrote {ns.output}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
