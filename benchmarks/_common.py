"""Shared helpers of the benchmarks: timing with warm-up and median, machine description, JSON and table output."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
        fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 7,
        min_block_s: float = 0.0,
) -> dict[str, float]:
    """Seconds per call of `fn`: median (and min, inter-quartile range) over `repeats` timed blocks after `warmup`.

    A block runs `fn` `inner` times between two device syncs, with `inner` chosen from the first warm call so that a
    block lasts at least `min_block_s` (short GPU kernels are not dominated by the sync then).
    """
    return time_interleaved({"fn": fn}, device, warmup=warmup, repeats=repeats, min_block_s=min_block_s)["fn"]


def time_interleaved(
        fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 2, repeats: int = 7,
        min_block_s: float = 0.0,
) -> dict[str, dict[str, float]]:
    """`time_call` for several functions at once: each repeat times one block of every function, in an order rotated
    from repeat to repeat, so that a change of machine load hits all of them alike and their ratios stay meaningful
    on a shared machine."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        inner[name] = max(1, math.ceil(min_block_s / max(time.perf_counter() - start, 1e-9)))
    names, times = list(fns), {name: [] for name in fns}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(inner[name]):
                fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / inner[name])
    return {name: summarize(values) | {"inner": inner[name]} for name, values in times.items()}


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, min, inter-quartile range and count of a list of per-call seconds."""
    ordered = sorted(times)
    q1, q3 = (ordered[0], ordered[-1]) if len(ordered) < 4 else statistics.quantiles(ordered, n=4)[::2]
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "iqr_s": q3 - q1, "repeats": len(ordered)}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU, device, threads, versions, and the load average (shared machine?)."""
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "open_clip_version": importlib.metadata.version("open_clip_torch"),
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "loadavg_1min_start": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
    return info


def finish_info(info: dict[str, Any]) -> dict[str, Any]:
    """Add the end-of-run load average and `under_load`: other processes kept more than half the cores busy.

    The start value is the minute before the run; the end value includes this run's own threads, subtracted.
    """
    info["loadavg_1min_end"] = os.getloadavg()[0]
    others = max(info["loadavg_1min_start"], info["loadavg_1min_end"] - info["torch_threads"])
    info["under_load"] = others > 0.5 * (info["cpu_count"] or 1)
    return info


def available_memory(device: torch.device) -> int:
    """Bytes that may still be allocated on `device` (MemAvailable on CPU, free memory on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run (from the repository root)."""
    return shlex.join(["python", "-m", module, *argv])


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON (creating the folder); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str, float]]) -> str:
    """Markdown table of `rows`; columns are (key, header, format spec, scale applied before formatting)."""
    header = "| " + " | ".join(name for _, name, _, _ in columns) + " |"
    rule = "|" + "|".join("-" * (len(name) + 2) for _, name, _, _ in columns) + "|"
    cells = [[format(row[key] if scale == 1 else row[key] * scale, spec) for key, _, spec, scale in columns]
             for row in rows]
    body = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([header, rule, *body])


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out a matplotlib Figure and write it as `path` (its folder created)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at x, linear between the (x, y) points sorted by x; None outside their range (a single point: its y there)."""
    points = sorted(points)
    if not points or not points[0][0] <= x <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]


def global_quantile(sim: torch.Tensor, alpha: float) -> torch.Tensor:
    """Each row's exact (1 − α) quantile over its n − 1 negatives of a square similarity (the diagonal is the
    positive) [n]: the threshold GloFND's λ estimates."""
    n = sim.shape[0]
    return torch.nanquantile(sim.masked_fill(torch.eye(n, dtype=torch.bool), float("nan")), 1 - alpha, dim=1)
