"""Training configuration: typed, grouped dataclasses that generate the `clip-glofnd train` flags.

One frozen dataclass per concern (data, model, loss, false-negative filter, optimisation, run); each field is one flag,
named like OpenCLIP's where OpenCLIP has it (`--train-data`, `--batch-size`, `--lr`, `--wd`, `--warmup`, `--resume`,
...) and prefixed otherwise (`--loss-*`, `--fnd-*`). Values are validated when the dataclasses are built, so a bad
combination fails at parse time with the flag names in the message. `--config FILE` (YAML, JSON or TOML; keys are the
flag names without dashes) sets defaults that command-line flags override, as timm's two-stage parse; the resolved
config written to the run folder (`config.yaml`) is such a file. Stdlib only, so `clip-glofnd train --help` is fast:
torch and open_clip load only after parsing, when training starts. It describes and parses settings and runs nothing
(`cli.train_command` runs the trainer). It is longer than ~500 lines because most of it is the table of flags — one
field per flag with its help and its check — which reads best in one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from clip_glofnd.errors import UsageError

Precision = Literal["auto", "fp32", "amp", "amp_bf16"]


def _opt(default: Any, help: str, flag: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with its flag help (and an explicit flag name where it is not prefix + field name)."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


class _Section:
    """Shared machinery of the config sections: flag names and choice validation."""

    PREFIX: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""

    @classmethod
    def flag(cls, f: dataclasses.Field) -> str:
        """The command-line flag of field `f` (e.g. "--fnd-alpha")."""
        if f.metadata.get("flag"):
            return f.metadata["flag"]
        return "--" + (f"{cls.PREFIX}-" if cls.PREFIX else "") + f.name.replace("_", "-")

    def _check(self, *checks: tuple[bool, str]) -> None:
        """Raise UsageError for the first failed (ok, message) check, for a value outside a Literal's choices and for
        a non-finite float (inf / nan would pass comparisons like `lr > 0`)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices, value = _choices(hints[f.name]), getattr(self, f.name)
            if choices and value not in choices:
                raise UsageError(f"{self.flag(f)} must be one of {', '.join(map(str, choices))}; got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{self.flag(f)} must be a finite number, got {value}")
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Training data: WebDataset shards whose samples carry global ids (DESIGN.md §2)."""

    TITLE: ClassVar[str] = "data"
    train_data: str | None = _opt(None, "shard pattern, e.g. /data/cc3m/{00000..00331}.tar; '::' joins sources")
    train_num_samples: int | None = _opt(None, "samples per epoch (default: every sample once)")
    num_samples: int | None = _opt(None, "size of the per-sample state = max id + 1 (default: sizes.json beside "
                                         "the shards)")
    workers: int = _opt(4, "data loader workers per process")
    caption_key: str = _opt("txt", "caption member ('txt') or 'json:FIELD' for a field of the sample's json")
    skip_bad_samples: bool = _opt(False, "skip (count and log) unreadable samples instead of stopping")
    dataset_resampled: bool = _opt(False, "sample shards with replacement (OpenCLIP's --dataset-resampled)")
    image_dtype: Literal["auto", "float32", "uint8"] = _opt(
        "auto", "images as the loader workers send them: uint8 (normalised on the training device: a quarter of the "
                "bytes through shared memory and to the GPU; 1.4-1.6x the loader's samples/s at 224 px, "
                "benchmarks/README) or float32 (normalised in the workers); auto: uint8 on CUDA, float32 on CPU")

    def __post_init__(self) -> None:
        self._check(
            (self.train_num_samples is None or self.train_num_samples > 0,
             f"--train-num-samples must be > 0, got {self.train_num_samples}"),
            (self.num_samples is None or self.num_samples > 0, f"--num-samples must be > 0, got {self.num_samples}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (bool(self.caption_key), "--caption-key must not be empty"),
        )


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Model: an open_clip architecture, optionally initialised from an OpenCLIP checkpoint."""

    TITLE: ClassVar[str] = "model"
    model: str = _opt("RN50", "open_clip config name (RN50, ViT-B-32, ...), 'clip-tiny', or a model JSON file")
    pretrained: str | None = _opt(None, "OpenCLIP checkpoint file to start from (fine-tuning), or an OpenCLIP tag")
    lock_image: bool = _opt(False, "freeze the image tower (LiT)")
    lock_text: bool = _opt(False, "freeze the text tower")
    aug_cfg: tuple[str, ...] = _opt((), "training image augmentation as OpenCLIP's --aug-cfg (open_clip "
                                        "AugmentationCfg), e.g. scale='(1,1)' for none on square images (default: "
                                        "open_clip's, a random resized crop of scale 0.9-1)", metavar="KEY=VALUE")
    precision: Precision = _opt("auto", "auto (default: amp_bf16 on a GPU that supports bfloat16, else amp, as "
                                        "OpenCLIP's default; fp32 on CPU, where AMP fp16 is ~13x slower), fp32, amp "
                                        "(fp16 autocast + GradScaler), amp_bf16 (bf16 autocast, no scaler)")
    torch_compile: bool = _opt(False, "torch.compile the model and the filter + loss (OpenCLIP's --torch-compile)",
                               flag="--torch-compile")
    device: str | None = _opt(None, "torch device (default: cuda:LOCAL_RANK if available, else cpu)")

    def __post_init__(self) -> None:
        bad = [item for item in self.aug_cfg if "=" not in item]
        self._check((bool(self.model), "--model must not be empty"),
                    (not bad, f"--aug-cfg takes KEY=VALUE items (open_clip AugmentationCfg fields), got {bad}"))


@dataclass(frozen=True)
class LossConfig(_Section):
    """Contrastive loss and its knobs (losses.create_loss)."""

    PREFIX: ClassVar[str] = "loss"
    TITLE: ClassVar[str] = "loss"
    name: Literal["clip", "sogclr", "fastclip"] = _opt(
        "clip", "clip (mini-batch InfoNCE, model's logit_scale), sogclr (= FastCLIP-v1, constant tau), fastclip "
                "(= FastCLIP-v3, learnable global tau)", flag="--loss")
    tau: float | None = _opt(None, "sogclr: constant tau (default 0.03); fastclip: initial tau (default 0.07)")
    gamma_min: float = _opt(0.2, "sogclr/fastclip: final inner rate gamma of the u moving averages")
    gamma_decay_epochs: int = _opt(18, "sogclr/fastclip: gamma goes from 1 to --loss-gamma-min by cosine over this "
                                       "many epochs (<= 0: constant)")
    rho: float = _opt(6.5, "fastclip: weight of the rho*tau term")
    lr_tau: float = _opt(2e-4, "fastclip: learning rate of log(1/tau) (own param group, no weight decay)",
                         flag="--lr-tau")

    def __post_init__(self) -> None:
        self._check(
            (self.tau is None or self.name != "clip",
             "--loss-tau applies to --loss sogclr/fastclip; --loss clip learns tau through the model's logit_scale"),
            (self.tau is None or 0.0 < self.tau <= 1.0, f"--loss-tau must be in (0, 1], got {self.tau}"),
            (0.0 < self.gamma_min <= 1.0, f"--loss-gamma-min must be in (0, 1], got {self.gamma_min}"),
            (self.rho >= 0.0, f"--loss-rho must be >= 0, got {self.rho}"),
            (self.lr_tau >= 0.0, f"--lr-tau must be >= 0, got {self.lr_tau}"),
        )


@dataclass(frozen=True)
class FndConfig(_Section):
    """False-negative filter for image anchors and for text anchors (glofnd.GloFND)."""

    PREFIX: ClassVar[str] = "fnd"
    TITLE: ClassVar[str] = "false-negative filter"
    variant: Literal["none", "glofnd", "fnd", "oracle"] = _opt(
        "none", "none, glofnd (learned per-sample thresholds), fnd (mini-batch quantile baseline), oracle (same "
                "class label = false negative; needs labels in the shards)", flag="--fnd")
    alpha: float = _opt(1e-3, "target fraction of negatives filtered per anchor; the paper's 1e-3 at a global batch "
                              "of 1,024 is about one per anchor per batch, the most similar, where precision is high "
                              "(at alpha 0.1 on the digits bed a third of what is filtered is a true negative); the "
                              "digits bed's recipe is 0.02 at batch 32: benchmarks/README 'The alpha sweep'")
    lr: float = _opt(0.05, "Adam step size of the thresholds lambda")
    start_epoch: int = _opt(0, "lambda starts learning at this epoch")
    mask_start_epoch: int | None = _opt(None, "negatives are filtered from this epoch on (default: --fnd-start-epoch)")
    init: Literal["one", "quantile"] = _opt(
        "one", "starting lambda: one (default, the paper's lambda = 1: nothing filtered until Adam walks it down) or "
               "quantile (a sample's first visit sets lambda to its mini-batch (1 - alpha) quantile, then Adam: for "
               "a model whose similarities change slowly, e.g. fine-tuning with --state-warmup-epochs); README "
               "'Python API' gives the evidence; pretraining the digits bed at alpha 0.02, lambda = 1 gains over no "
               "filter and the warm start does not (benchmarks/README)")
    bias_correction: Literal["sample", "epoch"] = _opt(
        "sample", "Adam bias correction of lambda by the sample's own number of steps, or by the absolute epoch "
                  "t = epoch + 1 (the authors' code)")

    def __post_init__(self) -> None:
        mask_start = self.start_epoch if self.mask_start_epoch is None else self.mask_start_epoch
        self._check(
            (0.0 < self.alpha < 1.0, f"--fnd-alpha must be in (0, 1), got {self.alpha}"),
            (self.lr > 0.0, f"--fnd-lr must be > 0, got {self.lr}"),
            (self.start_epoch >= 0, f"--fnd-start-epoch must be >= 0, got {self.start_epoch}"),
            (mask_start >= self.start_epoch, f"--fnd-mask-start-epoch ({mask_start}) must be >= --fnd-start-epoch "
                                             f"({self.start_epoch}): masking needs learned thresholds"),
        )


@dataclass(frozen=True)
class OptimConfig(_Section):
    """Optimisation: AdamW (no weight decay on gains, biases, logit_scale), cosine lr with linear warmup in steps."""

    TITLE: ClassVar[str] = "optimisation"
    batch_size: int = _opt(64, "batch size per process")
    epochs: int = _opt(32, "number of epochs")
    lr: float = _opt(5e-4, "peak learning rate")
    wd: float = _opt(0.2, "weight decay")
    warmup: int = _opt(10000, "linear warmup steps")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.98, "AdamW beta2")
    eps: float = _opt(1e-6, "AdamW epsilon")
    grad_clip_norm: float | None = _opt(None, "clip the gradient norm to this value")
    accum_freq: int = _opt(1, "accumulate gradients over this many micro-batches per step (--loss clip only)")
    state_warmup_epochs: int = _opt(0, "before epoch 1, this many forward-only passes of the frozen model (eval mode, "
                                       "no optimizer step) fill GloFND's lambda and SogCLR/FastCLIP's u; for "
                                       "fine-tuning (TuneCLIP); not counted in --epochs")
    max_nonfinite_steps: int = _opt(5, "a step with a non-finite loss or gradient is skipped (as AMP's GradScaler "
                                       "does); stop after this many in a row")

    def __post_init__(self) -> None:
        self._check(
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.lr >= 0.0, f"--lr must be >= 0, got {self.lr}"),
            (self.wd >= 0.0, f"--wd must be >= 0, got {self.wd}"),
            (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "--beta1 and --beta2 must be in [0, 1)"),
            (self.eps > 0.0, f"--eps must be > 0, got {self.eps}"),
            (self.grad_clip_norm is None or self.grad_clip_norm > 0,
             f"--grad-clip-norm must be > 0, got {self.grad_clip_norm}"),
            (self.accum_freq >= 1, f"--accum-freq must be >= 1, got {self.accum_freq}"),
            (self.state_warmup_epochs >= 0, f"--state-warmup-epochs must be >= 0, got {self.state_warmup_epochs}"),
            (self.max_nonfinite_steps >= 1, f"--max-nonfinite-steps must be >= 1, got {self.max_nonfinite_steps}"),
            (self.batch_size % self.accum_freq == 0,
             f"--batch-size ({self.batch_size}) must be a multiple of --accum-freq ({self.accum_freq})"),
        )


@dataclass(frozen=True)
class RunConfig(_Section):
    """Run folder, logging, checkpoints, evaluation during training, seed."""

    TITLE: ClassVar[str] = "run"
    logs: str = _opt("./logs", "where run folders go (<logs>/<name>/)")
    name: str | None = _opt(None, "run name (default: date-model-loss-fnd)")
    resume: str | None = _opt(None, "'latest' (this run's last checkpoint, if any) or a checkpoint path")
    save_frequency: int = _opt(1, "write checkpoints/epoch_N.pt every N epochs (0: only epoch_latest.pt)")
    save_every_n_steps: int = _opt(0, "also refresh epoch_latest.pt every N steps inside an epoch, with the data "
                                      "position: --resume latest continues exactly from there (0: epoch ends only)")
    zeroshot_data: tuple[str, ...] = _opt((), "CLIP_benchmark-layout classification sets evaluated during training")
    retrieval_data: tuple[str, ...] = _opt((), "CLIP_benchmark-layout retrieval sets evaluated during training")
    eval_suite: str | None = _opt(None, "benchmark suite evaluated during training, as `clip-glofnd eval --suite` "
                                        "(packaged name or YAML file); its group means go to metrics.jsonl")
    eval_dataset_root: tuple[str, ...] = _opt((), "where --eval-suite's data sets are (patterns as `clip-glofnd eval "
                                                  "--dataset-root`)")
    eval_every: int = _opt(1, "evaluate every N epochs (and after the last) when eval data are given")
    log_every_n_steps: int = _opt(100, "write a metrics.jsonl line (and --report-to's points) every N steps and at "
                                       "each epoch's last step, the only steps that read metrics from the device "
                                       "(as OpenCLIP)")
    report_to: str = _opt("none", "also report to: a comma list of tensorboard, wandb, all (both) or none, as "
                                  "OpenCLIP's --report-to; each needs its extra: pip install -e '.[wandb]'",
                          metavar="tensorboard,wandb|all|none")
    wandb_project_name: str = _opt("clip-glofnd", "W&B project of the run (--report-to wandb)")
    wandb_notes: str | None = _opt(None, "W&B notes of the run (--report-to wandb)")
    tensorboard: bool = _opt(False, "deprecated: --report-to tensorboard")
    seed: int = _opt(0, "random seed")

    def __post_init__(self) -> None:
        self._check(
            (self.name is None or (bool(self.name) and "/" not in self.name), f"--name must be a folder name, got "
                                                                               f"{self.name!r}"),
            (self.save_frequency >= 0, f"--save-frequency must be >= 0, got {self.save_frequency}"),
            (self.save_every_n_steps >= 0, f"--save-every-n-steps must be >= 0, got {self.save_every_n_steps}"),
            (self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}"),
            (self.eval_suite is None or bool(self.eval_suite), "--eval-suite must name a suite"),
            (not self.eval_dataset_root or self.eval_suite is not None, "--eval-dataset-root needs --eval-suite"),
            (self.log_every_n_steps >= 1, f"--log-every-n-steps must be >= 1, got {self.log_every_n_steps}"),
            (self.resume is None or bool(self.resume), "--resume must be 'latest' or a checkpoint path"),
            (not set(_items(self.report_to)) - set(REPORT_TO), f"--report-to takes a comma list of "
                                                                f"{', '.join(REPORT_TO)}; got {self.report_to!r}"),
            (not ({"none", "all"} & set(_items(self.report_to))) or len(_items(self.report_to)) == 1,
             f"--report-to {self.report_to}: none and all stand alone"),
            (bool(self.wandb_project_name), "--wandb-project-name must not be empty"),
        )

    @property
    def reporters(self) -> frozenset[str]:
        """Where the run reports besides metrics.jsonl: a subset of {"tensorboard", "wandb"} (--tensorboard, the
        deprecated alias, adds tensorboard)."""
        items = set(_items(self.report_to)) | ({"tensorboard"} if self.tensorboard else set())
        return frozenset(REPORTERS if "all" in items else items - {"none"})


REPORTERS = ("tensorboard", "wandb")
REPORT_TO = (*REPORTERS, "all", "none")              # OpenCLIP's --report-to names, and none


def _items(value: str) -> list[str]:
    """The items of a comma list ("wandb, tensorboard" -> ["wandb", "tensorboard"]); "" is none."""
    return [item.strip() for item in value.split(",") if item.strip()] or ["none"]


@dataclass(frozen=True)
class StateConfig(_Section):
    """Placement of the per-sample state: λ, Adam moments and u, 40 B per sample (clip_glofnd/state.py)."""

    PREFIX: ClassVar[str] = "state"
    TITLE: ClassVar[str] = "per-sample state"
    device: Literal["train", "cpu"] = _opt(
        "train", "train (the training device) or cpu (host memory: only the batch's rows go to the device each step)")
    sharding: Literal["replicated", "by-id"] = _opt(
        "replicated", "replicated (every rank holds all n rows; one all-gather of the written rows per step) or by-id "
                      "(rank r holds ids = r mod W, n/W rows; per step a fixed-size all-to-all fetches the batch's rows "
                      "and the all-gather writes them back; at world size 1 its one shard holds every row)")

    def __post_init__(self) -> None:
        self._check()


SECTIONS: dict[str, type[_Section]] = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig,
                                       "fnd": FndConfig, "optim": OptimConfig, "run": RunConfig,
                                       "state": StateConfig}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `clip-glofnd train` needs; checks between sections happen here."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fnd: FndConfig = field(default_factory=FndConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    state: StateConfig = field(default_factory=StateConfig)

    def __post_init__(self) -> None:
        if self.optim.accum_freq > 1 and self.loss.name != "clip":
            raise UsageError(
                f"--accum-freq {self.optim.accum_freq} needs --loss clip: {self.loss.name} updates its per-sample u "
                f"inside the loss, which every accumulation pass would repeat; raise --batch-size or add GPUs instead")
        if self.optim.state_warmup_epochs and self.fnd.variant != "glofnd" and self.loss.name == "clip":
            raise UsageError(f"--state-warmup-epochs fills GloFND's lambda (--fnd glofnd) and the u of --loss "
                             f"sogclr/fastclip; with --fnd {self.fnd.variant} and --loss clip there is nothing to fill")
        if self.run.resume == "latest" and self.run.name is None:
            raise UsageError("--resume latest needs --name (the run whose checkpoints/epoch_latest.pt to continue)")
        if self.data.train_data is None:
            raise UsageError("--train-data is required (a shard pattern such as /data/cc3m/{00000..00331}.tar)")


# ---------------------------------------------------------------------------------------------------------- flags
def _base_type(hint: Any) -> Any:
    """`int | None` -> int; other hints unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _choices(hint: Any) -> tuple | None:
    """The values of a Literal hint (possibly optional), else None."""
    base = _base_type(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _fields() -> list[tuple[str, type[_Section], dataclasses.Field, Any]]:
    """(section name, section class, field, type hint) of every flag, in --help order."""
    out = []
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [(name, cls, f, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


def _key(cls: type[_Section], f: dataclasses.Field) -> str:
    """Config-file key and argparse dest of a field: its flag without dashes, '_' for '-' (e.g. fnd_alpha)."""
    return cls.flag(f)[2:].replace("-", "_")


def _add_argument(group: argparse._ArgumentGroup, cls: type[_Section], f: dataclasses.Field, hint: Any) -> None:
    """One flag from one dataclass field: Literal -> choices, bool -> --x/--no-x, tuple -> nargs='+'."""
    base, choices = _base_type(hint), _choices(hint)
    text = f.metadata["help"]
    if "default" not in text and f.default not in (None, False, ()):
        text += f" (default: {f.default})"
    kwargs: dict[str, Any] = {"dest": _key(cls, f), "default": argparse.SUPPRESS, "help": text}
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif choices:
        kwargs.update(choices=choices, metavar="|".join(choices))
    elif typing.get_origin(base) is tuple:
        kwargs.update(nargs="+", metavar=f.metadata.get("metavar") or "DIR")
    else:
        kwargs.update(type=base, metavar=f.metadata.get("metavar") or base.__name__.upper())
    group.add_argument(cls.flag(f), **kwargs)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are UsageError (the CLI prints one line and exits 2) instead of sys.exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The `clip-glofnd train` parser: one argument group per config section, plus --config and --dry-run."""
    parser = _Parser(prog="clip-glofnd train", description="Train CLIP on WebDataset shards, with GloFND "
                     "false-negative filtering (flags named like OpenCLIP's where OpenCLIP has them).")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON/TOML file of flag values (keys: flag names "
                        "without dashes); command-line flags override it")
    parser.add_argument("--dry-run", action="store_true", help="parse and validate (flags, model name, and that every "
                        "path the run opens exists), print the config, do not train")
    groups = {name: parser.add_argument_group(cls.TITLE or name, (cls.__doc__ or "").splitlines()[0])
              for name, cls in SECTIONS.items()}
    for name, cls, f, hint in _fields():
        _add_argument(groups[name], cls, f, hint)
    return parser


# ------------------------------------------------------------------------------------------- flat dict <-> config
def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    """A config-file value checked (and converted) to the field's type; UsageError naming `origin` and `key`."""
    base = _base_type(hint)
    if value is None and base is not hint:
        return None
    if typing.get_origin(base) is tuple:
        items = value.split() if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return tuple(items)
    elif typing.get_origin(base) is Literal or base is str:
        if isinstance(value, str):
            return value
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif base is int and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    want = getattr(base, "__name__", str(base))
    raise UsageError(f"{origin}: {key.replace('_', '-')}: expected {want}, got {value!r}")


def from_flat(values: dict[str, Any], origin: str = "config") -> TrainConfig:
    """TrainConfig from {flag name without dashes: value} (missing keys take defaults; unknown keys fail)."""
    fields = {_key(cls, f): (name, f, hint) for name, cls, f, hint in _fields()}
    unknown = [k for k in values if k.replace("-", "_") not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0].replace("-", "_"), fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"{origin}: unknown key {unknown[0]!r}{hint}")
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        name, f, hint = fields[key.replace("-", "_")]
        per_section[name][f.name] = _coerce(key, value, hint, origin)
    return TrainConfig(**{name: cls(**per_section[name]) for name, cls in SECTIONS.items()})


def to_flat(cfg: TrainConfig) -> dict[str, Any]:
    """{flag name without dashes: value}, plain python types (tuples as lists): the run folder's config.yaml and the
    checkpoint's "config"."""
    out: dict[str, Any] = {}
    for name, cls, f, _ in _fields():
        value = getattr(getattr(cfg, name), f.name)
        out[_key(cls, f)] = list(value) if isinstance(value, tuple) else value
    return out


def flat_defaults() -> dict[str, Any]:
    """{flag name without dashes: default} of every flag, as to_flat writes them: what a flat config that lacks a key
    (one written before the flag existed) means by it."""
    return {_key(cls, f): list(f.default) if isinstance(f.default, tuple) else f.default for _, cls, f, _ in _fields()}


def to_argv(cfg: TrainConfig) -> list[str]:
    """Command-line flags that reproduce `cfg` (only values that differ from the defaults)."""
    argv: list[str] = []
    for name, cls, f, hint in _fields():
        value, flag = getattr(getattr(cfg, name), f.name), cls.flag(f)
        if value == f.default:
            continue
        if _base_type(hint) is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    return argv


def load_config_file(path: str) -> dict[str, Any]:
    """Flat mapping from a YAML (.yaml/.yml), JSON or TOML file; UsageError if unreadable or not a mapping."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml                                                   # only when a YAML file is given
            values = yaml.safe_load(text) or {}
        elif file.suffix == ".toml":
            import tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except Exception as error:                                            # parser errors differ per format
        raise UsageError(f"--config {path}: cannot parse: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    return values


def parse_config(argv: Sequence[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, namespace) from command-line flags over an optional --config file over the defaults."""
    ns = build_parser().parse_args(list(argv))
    values = load_config_file(ns.config) if ns.config else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    cli = {k: v for k, v in vars(ns).items() if k not in ("config", "dry_run")}
    for key, value in cli.items():                                        # CLI values are typed already
        values[key] = tuple(value) if isinstance(value, list) else value
    if values.get("tensorboard") is True:
        logging.getLogger(__name__).warning("--tensorboard is deprecated and will be removed: use --report-to "
                                            "tensorboard (or all, for TensorBoard and W&B)")
    return from_flat(values, origin=ns.config or "flags"), ns


def dump(cfg: TrainConfig) -> str:
    """The flat config as YAML-compatible JSON lines (readable, and loadable again with --config)."""
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in to_flat(cfg).items()) + "\n"


def undump(text: str) -> dict[str, Any]:
    """The flat values of a `dump` text (a run folder's config.yaml) without YAML; ValueError on a line that is not
    `key: <json>`."""
    return {key: json.loads(value) for key, value in (line.split(": ", 1) for line in text.splitlines() if line)}
