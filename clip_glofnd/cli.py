"""`clip-glofnd` command: dispatches `clip-glofnd COMMAND [ARGS]` to the module that owns COMMAND.

Importing this module and `clip-glofnd --help` stay cheap (no torch, no open_clip): a command's module is imported
only when that command runs, and each command parses its own flags before it imports anything heavy.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

# command -> ("module:function", one-line summary); function(argv: list[str]) -> int exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("clip_glofnd.cli:train_command", "train a CLIP model on WebDataset shards, with or without GloFND"),
    "eval": ("clip_glofnd.eval_cli:main", "zero-shot classification and retrieval of a checkpoint"),
    "make-digits": ("clip_glofnd.digits:make_digits_main",
                    "write scikit-learn's handwritten digits as WebDataset shards (the embedded data set)"),
    "make-digits-minilm": ("clip_glofnd.digits_minilm:make_digits_minilm_main",
                           "the digits + a frozen MiniLM text tower recipe: a bed where false negatives matter"),
    "make-shards": ("clip_glofnd.make_shards:make_shards_main",
                    "pack a folder of images + a CSV/TSV of captions into shards"),
    "check-shards": ("clip_glofnd.check_shards:check_shards_main",
                     "count samples, id range and holes of a shard pattern"),
    "compare": ("clip_glofnd.compare:main", "finished runs side by side: accuracy, recall, the filter against labels"),
}


def usage() -> str:
    """Top-level help text."""
    width = max(map(len, COMMANDS))
    lines = ["usage: clip-glofnd COMMAND [ARGS ...]   (clip-glofnd COMMAND --help for its flags)", "",
             "CLIP training with GloFND false-negative discovery (ICML 2025, arXiv 2502.20612).", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def train_command(argv: Sequence[str]) -> int:
    """`clip-glofnd train`: parse and validate (config.py), check every path and name (preflight.py), then, unless
    --dry-run, import the trainer and run it (train.py)."""
    from clip_glofnd.config import dump, parse_config
    try:
        cfg, ns = parse_config(argv)
    except SystemExit as stop:                                            # --help
        return int(stop.code or 0)
    from clip_glofnd.preflight import check_run
    check_run(cfg)                                                        # every path and name, before any work
    if ns.dry_run:
        run_dir = Path(cfg.run.logs).absolute() / (cfg.run.name or "<date>-<model>-<loss>-<fnd>")
        sys.stdout.write(f"{dump(cfg)}# run folder: {run_dir}\n")
        return 0
    from clip_glofnd import train                                         # torch / open_clip load only now
    return train.main(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input (UsageError) prints one line and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from clip_glofnd import __version__
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"clip-glofnd: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[command][0].split(":")
    from clip_glofnd.errors import UsageError
    try:
        return int(getattr(importlib.import_module(module_name), function_name)(rest) or 0)
    except UsageError as error:
        print(f"clip-glofnd {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
