"""Training config: defaults valid, bad combinations name their flags, dataclasses <-> flags <-> files round-trip."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clip_glofnd.config import (SECTIONS, DataConfig, FndConfig, LossConfig, TrainConfig, build_parser, dump, from_flat,
                                parse_config, to_argv, to_flat)
from clip_glofnd.cli import train_command as train_main
from clip_glofnd.errors import UsageError

DATA = ["--train-data", "/data/{0..9}.tar"]


def test_section_defaults_are_valid_and_match_the_recipe_defaults() -> None:
    for cls in SECTIONS.values():
        cls()                                                         # each section's defaults validate
    cfg = parse_config(DATA)[0]
    assert cfg == TrainConfig(data=DataConfig(train_data="/data/{0..9}.tar"))
    assert (cfg.model.precision, cfg.fnd.variant, cfg.loss.name, cfg.optim.accum_freq) == ("auto", "none", "clip", 1)


def test_every_field_has_one_flag_with_help() -> None:
    parser = build_parser()
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
    assert len(flags) == len(set(flags))
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert cls.flag(f) in flags and f.metadata["help"], (name, f.name)
    for flag in ("--train-data", "--batch-size", "--lr", "--wd", "--warmup", "--precision", "--resume", "--loss",
                 "--fnd", "--fnd-alpha", "--fnd-mask-start-epoch", "--lr-tau", "--accum-freq", "--eval-every",
                 "--state-device", "--state-sharding"):
        assert flag in flags


@pytest.mark.parametrize("argv, flag", [
    (["--fnd-start-epoch", "5", "--fnd-mask-start-epoch", "3"], "--fnd-mask-start-epoch"),
    (["--fnd-alpha", "0"], "--fnd-alpha"),
    (["--fnd-alpha", "1.5"], "--fnd-alpha"),
    (["--loss", "sogclr", "--accum-freq", "2"], "--accum-freq"),
    (["--loss", "clip", "--loss-tau", "0.05"], "--loss-tau"),
    (["--batch-size", "10", "--accum-freq", "3"], "--accum-freq"),
    (["--resume", "latest"], "--name"),
    (["--loss", "infonce"], "--loss"),
    (["--precision", "fp16"], "--precision"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "x"], "--batch-size"),
    (["--no-such-flag", "1"], "--no-such-flag"),
    (["--state-device", "gpu"], "--state-device"),
    (["--state-sharding", "by-rank"], "--state-sharding"),
    (["--report-to", "wandb,mlflow"], "--report-to"),
    (["--report-to", "none,wandb"], "--report-to"),
    (["--wandb-project-name", ""], "--wandb-project-name"),
])
def test_bad_values_raise_naming_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        parse_config(DATA + argv)


def test_state_placement_flags() -> None:
    cfg = parse_config(DATA + ["--state-device", "cpu", "--state-sharding", "by-id"])[0]
    assert (cfg.state.device, cfg.state.sharding) == ("cpu", "by-id")
    assert (SECTIONS["state"]().device, SECTIONS["state"]().sharding) == ("train", "replicated")
    assert to_flat(cfg)["state_sharding"] == "by-id" and from_flat(to_flat(cfg)) == cfg


def test_train_data_is_required() -> None:
    with pytest.raises(UsageError, match="--train-data"):
        parse_config([])


def test_dataclasses_are_frozen_and_validate_on_construction() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FndConfig().alpha = 0.5                                       # type: ignore[misc]
    with pytest.raises(UsageError, match="--loss-gamma-min"):
        LossConfig(gamma_min=0.0)


CUSTOM = DATA + ["--model", "ViT-B-32", "--loss", "fastclip", "--loss-tau", "0.05", "--fnd", "glofnd",
                 "--fnd-alpha", "5e-4", "--fnd-start-epoch", "15", "--fnd-mask-start-epoch", "16", "--lock-text",
                 "--zeroshot-data", "/a", "/b", "--grad-clip-norm", "1.0", "--name", "run", "--resume", "latest",
                 "--precision", "amp_bf16", "--batch-size", "256", "--accum-freq", "1", "--tensorboard",
                 "--report-to", "wandb", "--wandb-project-name", "p", "--wandb-notes", "a note"]


def test_dataclass_argparse_round_trip() -> None:
    cfg = parse_config(CUSTOM)[0]
    assert cfg.loss.tau == 0.05 and cfg.fnd.mask_start_epoch == 16 and cfg.model.lock_text is True
    assert cfg.run.zeroshot_data == ("/a", "/b")
    assert parse_config(to_argv(cfg))[0] == cfg                       # config -> flags -> config
    assert from_flat(to_flat(cfg)) == cfg                             # config -> flat dict -> config
    assert from_flat(json.loads(json.dumps(to_flat(cfg)))) == cfg      # ... through JSON (checkpoint "config")


@pytest.mark.parametrize("argv, reporters", [
    ([], set()), (["--report-to", "none"], set()), (["--report-to", ""], set()),
    (["--report-to", "tensorboard"], {"tensorboard"}), (["--report-to", "wandb"], {"wandb"}),
    (["--report-to", "wandb,tensorboard"], {"tensorboard", "wandb"}),
    (["--report-to", "all"], {"tensorboard", "wandb"}),
    (["--tensorboard"], {"tensorboard"}), (["--tensorboard", "--report-to", "wandb"], {"tensorboard", "wandb"}),
])
def test_report_to_as_open_clip_with_the_tensorboard_alias(argv: list[str], reporters: set[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config(DATA + argv)[0]
    assert cfg.run.reporters == reporters
    assert ("--tensorboard is deprecated" in caplog.text) == ("--tensorboard" in argv)
    assert (cfg.run.wandb_project_name, cfg.run.wandb_notes) == ("clip-glofnd", None)


def test_old_run_config_with_tensorboard_key_still_loads() -> None:
    """config.yaml of runs from before --report-to: a `tensorboard` key, no `report_to`."""
    old = {k: v for k, v in to_flat(parse_config(DATA)[0]).items() if k not in ("report_to", "wandb_project_name",
                                                                               "wandb_notes")}
    assert from_flat({**old, "tensorboard": True}).run.reporters == {"tensorboard"}
    assert from_flat(old) == parse_config(DATA)[0]


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_config_file_sets_defaults_and_flags_override(suffix: str, tmp_path: Path) -> None:
    values = {"train-data": "/file/{0..1}.tar", "batch_size": 128, "fnd": "glofnd", "fnd-alpha": 0.01,
              "zeroshot-data": ["/z"], "lock-image": True}
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        import yaml
        path.write_text(yaml.safe_dump(values))
    elif suffix == ".toml":
        path.write_text("\n".join(f"{k!r} = {json.dumps(v)}".replace("'", '"') for k, v in values.items()))
    else:
        path.write_text(json.dumps(values))
    cfg = parse_config(["--config", str(path), "--batch-size", "64", "--no-lock-image"])[0]
    assert cfg.data.train_data == "/file/{0..1}.tar" and cfg.fnd.alpha == 0.01 and cfg.run.zeroshot_data == ("/z",)
    assert cfg.optim.batch_size == 64 and cfg.model.lock_image is False          # the command line wins


def test_written_config_reloads_with_config_flag(tmp_path: Path) -> None:
    """The run folder's config.yaml (config.dump) is itself a valid --config file."""
    cfg = parse_config(CUSTOM)[0]
    path = tmp_path / "config.yaml"
    path.write_text(dump(cfg))
    assert parse_config(["--config", str(path)])[0] == cfg


@pytest.mark.parametrize("content, message", [
    ({"batch-sise": 3}, "did you mean 'batch_size'"),
    ({"train-data": "x", "epochs": "many"}, "epochs: expected int"),
    ({"train-data": "x", "lock-text": "yes"}, "lock-text: expected bool"),
])
def test_bad_config_file(content: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message):
        parse_config(["--config", str(path)])


def test_dry_run_prints_the_resolved_config(digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pattern = str(digits_dir / "train" / "{00000..00011}.tar")
    assert train_main(["--train-data", pattern, "--fnd", "glofnd", "--logs", str(tmp_path), "--name", "r",
                       "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert 'fnd: "glofnd"' in out and f'train_data: "{pattern}"' in out and f"# run folder: {tmp_path}/r" in out


@pytest.mark.parametrize("flag", ["--lr", "--fnd-lr", "--fnd-alpha", "--wd", "--loss-rho", "--grad-clip-norm"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused(flag: str, value: str) -> None:
    with pytest.raises(UsageError, match=f"{flag} must be a finite number, got {value}"):
        parse_config(DATA + [f"{flag}={value}"])
