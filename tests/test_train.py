"""`clip-glofnd train` end to end on the digits shards with a micro model, plus the step's parts.

Oracles: the run's own files (metrics.jsonl, checkpoints) against what the flags asked for; an uninterrupted run
against a crashed-and-resumed one (composer style); gradient accumulation against the unsplit batch.
"""
from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip_glofnd import checkpoint, cli, loop, resume, train
from clip_glofnd import step as step_module
from clip_glofnd.config import from_flat
from clip_glofnd.data import Batch
from clip_glofnd.distributed import DistInfo
from clip_glofnd.errors import UsageError
from clip_glofnd.logger import read_jsonl
from clip_glofnd.step import Parts, build_parts, train_step

ROOT = Path(__file__).resolve().parents[1]

MICRO = {"embed_dim": 16,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a 1-layer open_clip JSON config (~1.7 M parameters, mostly the token embedding)."""
    path = tmp_path_factory.mktemp("models") / "clip-micro-test.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def argv(digits: Path, model: str, logs: Path, *extra: str) -> list[str]:
    """A tiny run: 64 samples per epoch, batches of 32, no loader workers (deterministic, no process start-up)."""
    return ["train", "--train-data", str(digits / "train" / "{00000..00011}.tar"), "--train-num-samples", "64",
            "--model", model, "--batch-size", "32", "--epochs", "1", "--lr", "1e-3", "--warmup", "1",
            "--workers", "0", "--log-every-n-steps", "1", "--logs", str(logs), *extra]


@pytest.mark.parametrize("loss", ["clip", "sogclr", "fastclip"])
def test_tiny_run_with_glofnd(loss: str, digits_dir: Path, micro_model: str, tmp_path: Path) -> None:
    """One epoch runs; JSONL, config, checkpoints and λ plot appear; exactly the samples seen have learned λ / u."""
    init = ["--fnd-init", "quantile" if loss == "fastclip" else "one"]         # both starts: same contract
    rc = cli.main(argv(digits_dir, micro_model, tmp_path, "--name", "run", "--loss", loss, "--fnd", "glofnd",
                       "--fnd-alpha", "0.05", "--fnd-lr", "0.2", *init))
    assert rc == 0
    run = tmp_path / "run"
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("lr", "temperature", "filtered_img", "filtered_txt", "lam_img_p50", "lam_txt_p90", "samples_seen",
                "step_time"):
        assert key in steps[0], key
    assert steps[-1]["samples_seen"] == 64
    ckpt = torch.load(run / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert (run / "checkpoints" / "epoch_1.pt").is_file() and (run / "lambda_epoch_1.png").is_file()
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 and ckpt["config"]["loss"] == loss
    seen = ckpt["glofnd"]["img"]["steps"] > 0
    assert int(seen.sum()) == 64 and torch.equal(seen, ckpt["glofnd"]["txt"]["steps"] > 0)
    assert (ckpt["glofnd"]["img"]["lam"][seen] < 1).all() and (ckpt["glofnd"]["img"]["lam"][~seen] == 1).all()
    if loss != "clip":
        assert torch.equal(ckpt["loss"]["u_img"] > 0, seen)
        log_inv_tau = ckpt["loss"].get("log_inv_tau", torch.tensor(1 / 0.03).log())       # the loss owns τ ...
        assert float(ckpt["state_dict"]["logit_scale"]) == pytest.approx(float(log_inv_tau))  # ... open_clip sees it
        assert loss == "sogclr" or float(log_inv_tau) != pytest.approx(float(torch.tensor(1 / 0.07).log()))
    assert from_flat(json.loads(json.dumps(ckpt["config"]))).loss.name == loss


def test_oracle_filters_same_class_negatives_and_eval_joins_the_log(digits_dir: Path, micro_model: str,
                                                                    tmp_path: Path) -> None:
    """--fnd oracle removes the same-digit negatives (~1/10 of them); --zeroshot-data metrics land in the JSONL."""
    rc = cli.main(argv(digits_dir, micro_model, tmp_path, "--name", "oracle", "--fnd", "oracle",
                       "--zeroshot-data", str(digits_dir / "wds" / "digits_cls")))
    assert rc == 0
    records = read_jsonl(tmp_path / "oracle" / "metrics.jsonl")
    filtered = [r["filtered_img"] for r in records if "filtered_img" in r]
    assert all(0.02 < f < 0.25 for f in filtered), filtered
    for r in (r for r in records if "filtered_img" in r):                       # the oracle drops exactly the
        for m in ("img", "txt"):                                                # same-class negatives
            assert r[f"fn_false_{m}"] == 0 and r[f"fn_true_{m}"] == r[f"fn_present_{m}"] > 0
            assert r[f"fn_true_{m}"] == pytest.approx(r[f"filtered_{m}"] * 32 * 31)
    evals = [r for r in records if "zeroshot/digits_cls/acc1" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["zeroshot/digits_cls/acc1"] <= 1.0


class Crash(Exception):
    """Stands for a job killed right after its first checkpoint."""


RESUME_FLAGS = ["--epochs", "2", "--loss", "fastclip", "--fnd", "glofnd", "--fnd-alpha", "0.05", "--fnd-lr", "0.2"]


@pytest.fixture(scope="module")
def straight(digits_dir: Path, micro_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted reference of the resume tests: 2 epochs × 2 steps, FastCLIP-v3 + GloFND, a checkpoint after
    every step (which must not change the result); its final checkpoint and its step losses."""
    logs = tmp_path_factory.mktemp("straight")
    assert cli.main(argv(digits_dir, micro_model, logs, "--name", "straight", *RESUME_FLAGS,
                         "--save-every-n-steps", "1")) == 0
    return {"ckpt": torch.load(logs / "straight" / "checkpoints" / "epoch_latest.pt", weights_only=True),
            "losses": {r["step"]: r["loss"] for r in read_jsonl(logs / "straight" / "metrics.jsonl") if "loss" in r}}


def assert_same_run(ckpt: dict, reference: dict, what: str) -> None:
    """Bit for bit: weights, optimizer, λ/m/v/steps, u and τ; the same epoch and step."""
    assert (ckpt["epoch"], ckpt["step"]) == (reference["epoch"], reference["step"]) == (2, 4), what
    for key in ("state_dict", "loss", "glofnd", "optimizer"):
        torch.testing.assert_close(ckpt[key], reference[key], rtol=0, atol=0, msg=lambda m: f"{what}: {key}: {m}")


def crash_after_first_save(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    """Run `clip-glofnd` with `args` until its first checkpoint is written, then crash (as a killed job)."""
    save = train.save_checkpoints

    def save_then_crash(parts, state, run_dir, run=None):
        save(parts, state, run_dir, run)
        raise Crash

    monkeypatch.setattr(train, "save_checkpoints", save_then_crash)
    with pytest.raises(Crash):
        cli.main(args)
    monkeypatch.setattr(train, "save_checkpoints", save)


def test_resume_equals_uninterrupted(straight: dict, digits_dir: Path, micro_model: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """2 epochs straight == 1 epoch, crash, --resume latest, 1 epoch: same weights, optimizer, λ/m/v, u, τ."""
    crash_after_first_save(monkeypatch, argv(digits_dir, micro_model, tmp_path, "--name", "resumed", *RESUME_FLAGS))
    assert cli.main(argv(digits_dir, micro_model, tmp_path, "--name", "resumed", "--resume", "latest",
                         *RESUME_FLAGS)) == 0
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert_same_run(ckpt, straight["ckpt"], "resumed at the epoch boundary")
    assert (ckpt["glofnd"]["img"]["steps"] == 2).sum() > 0            # some samples were updated in both epochs


def _parts(micro_model: str, accum: int) -> Parts:
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    cfg = from_flat({"train_data": "x", "model": micro_model, "batch_size": 8, "accum_freq": accum, "fnd": "glofnd",
                     "fnd_alpha": 0.2})
    model = create_model(micro_model)[0]
    return build_parts(cfg, DistInfo(), model, num_samples=16)


def test_accumulation_gives_the_unsplit_gradient(micro_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--accum-freq 2 leaves the same gradients and λ as one pass over the whole batch."""
    monkeypatch.setattr(step_module, "_optimizer_step", lambda parts, finite: finite)  # keep the gradients
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 16)), torch.arange(8), None)
    grads, lams = [], []
    for accum in (1, 2):
        parts = _parts(micro_model, accum)
        train_step(batch, parts, epoch=0)
        grads.append({n: p.grad.clone() for n, p in parts.model.named_parameters() if p.grad is not None})
        lams.append(parts.fnd_img.threshold.clone())
    assert grads[0].keys() == grads[1].keys() and "logit_scale" in grads[0]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lams[1], lams[0])


@pytest.mark.parametrize("extra, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--train-data", "/nonexistent/{0..1}.tar"], "/nonexistent"),
    (["--fnd", "glofnd", "--fnd-start-epoch", "2", "--fnd-mask-start-epoch", "1"], "--fnd-mask-start-epoch"),
    (["--loss", "sogclr", "--accum-freq", "2"], "--accum-freq"),
])
def test_bad_input_is_one_line_and_exit_2(extra: list[str], message: str, digits_dir: Path, micro_model: str,
                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(argv(digits_dir, micro_model, tmp_path, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and err[-1].startswith("clip-glofnd train: error:")


def test_resume_with_another_architecture_is_refused(digits_dir: Path, micro_model: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert cli.main(argv(digits_dir, micro_model, tmp_path, "--name", "micro")) == 0
    ckpt = tmp_path / "micro" / "checkpoints" / "epoch_latest.pt"
    rc = cli.main(argv(digits_dir, "clip-tiny", tmp_path, "--name", "tiny", "--resume", str(ckpt)))
    assert rc == 2 and "model" in capsys.readouterr().err


def test_lr_schedule_matches_open_clip() -> None:
    """Warmup then cosine, as open_clip_train.scheduler.cosine_lr."""
    from open_clip_train.scheduler import cosine_lr
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reference = cosine_lr(optimizer, 0.1, 5, 50)
    for step in range(50):
        assert 0.1 * resume.lr_factor(step, 5, 50) == pytest.approx(reference(step), abs=1e-12)


# ------------------------------------------------------------------------------- 2 ranks (gloo, CPU) == 1 process
def _two_rank_entry(rank: int, model: str, port: int, out: str) -> None:
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from clip_glofnd import distributed
    dist = distributed.init_distributed("cpu")
    try:
        torch.save(_steps_state(model, dist), Path(out) / f"rank{rank}.pt")
    finally:
        distributed.cleanup(dist)


def _steps_state(model_path: str, dist: DistInfo) -> list[dict]:
    """Two FastCLIP-v3 + GloFND steps on this rank's rows of a fixed global batch of 8 (optimizer step disabled, so
    gradients compare without Adam's amplification); gradients and per-sample state after each."""
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    cfg = from_flat({"train_data": "x", "model": model_path, "batch_size": 8 // dist.world_size, "loss": "fastclip",
                     "fnd": "glofnd", "fnd_alpha": 0.3, "fnd_lr": 0.5})
    parts = build_parts(cfg, dist, create_model(model_path)[0], num_samples=12)
    parts.optimizer.step = lambda *args, **kwargs: None                               # keep weights fixed
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 400, (8, 16), generator=g)
    rows = slice(dist.rank * cfg.optim.batch_size, (dist.rank + 1) * cfg.optim.batch_size)
    out = []
    for ids in (torch.arange(8), torch.tensor([4, 5, 6, 7, 8, 9, 10, 11])):         # ids 4..7 are seen twice
        train_step(Batch(images[rows], texts[rows], ids[rows], None), parts, epoch=0)
        out.append({"grads": {n: p.grad.clone() for n, p in parts.unwrapped.named_parameters() if p.grad is not None},
                    "tau_grad": parts.loss_fn.log_inv_tau.grad.clone(), "img": dict(parts.fnd_img.state_dict()),
                    "txt": dict(parts.fnd_txt.state_dict()), "loss": dict(parts.loss_fn.state_dict())})
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_process(micro_model: str, tmp_path: Path) -> None:
    """DDP + gathers + row sync on 2 gloo ranks give the single-process gradients, λ/m/v/steps and u."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_rank_entry, args=(micro_model, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _steps_state(micro_model, DistInfo())
    for step in range(2):
        for rank in ranks:
            torch.testing.assert_close(rank[step]["grads"], single[step]["grads"], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(rank[step]["tau_grad"], single[step]["tau_grad"], rtol=1e-4, atol=1e-6)
            for key in ("img", "txt", "loss"):
                torch.testing.assert_close(rank[step][key], single[step][key], rtol=1e-5, atol=1e-6)
    assert (single[1]["img"]["steps"][4:8] == 2).all() and (single[1]["img"]["lam"][:12] < 1).all()


@pytest.mark.parametrize("precision", ["amp", "amp_bf16"])
def test_mixed_precision_step(precision: str, micro_model: str) -> None:
    """AMP steps (GradScaler for fp16) run and keep fp32 weights; the filter sees float32 similarities."""
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    cfg = from_flat({"train_data": "x", "model": micro_model, "batch_size": 8, "precision": precision,
                     "loss": "fastclip", "fnd": "glofnd", "fnd_alpha": 0.2})
    parts = build_parts(cfg, DistInfo(), create_model(micro_model)[0], num_samples=8)
    before = parts.unwrapped.visual.conv1.weight.clone()
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 16)), torch.arange(8), None)
    metrics = train_step(batch, parts, epoch=0)
    assert parts.scaler.is_enabled() == (precision == "amp")
    assert torch.isfinite(torch.tensor(metrics["loss"])) and parts.unwrapped.visual.conv1.weight.dtype == torch.float32
    assert not torch.equal(before, parts.unwrapped.visual.conv1.weight) and (parts.fnd_img.threshold[:8] < 1).all()


# ------------------------------------------------------------------------------------------- faults (issue 12)
def _state_of(parts: Parts) -> dict:
    """Everything a step may change: weights, buffers, optimizer, λ/m/v/steps, u."""
    return copy.deepcopy({"model": parts.unwrapped.state_dict(), "optimizer": parts.optimizer.state_dict(),
                          "img": parts.fnd_img.state_dict(), "txt": parts.fnd_txt.state_dict(),
                          "loss": parts.loss_fn.state_dict()})


@pytest.mark.parametrize("fault", ["nan image", "nan gradient", "inf loss"])
def test_nonfinite_step_is_skipped_and_undone(fault: str, micro_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-finite input, gradient or loss: the step reports nonfinite, and weights, optimizer, λ/m/v/steps and u
    are exactly as before it (GloFND and u had already been updated inside the step: they are put back)."""
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    cfg = from_flat({"train_data": "x", "model": micro_model, "batch_size": 8, "loss": "fastclip", "fnd": "glofnd",
                     "fnd_alpha": 0.2})
    parts = build_parts(cfg, DistInfo(), create_model(micro_model)[0], num_samples=16)
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 16)), torch.arange(8), None)
    assert train_step(batch, parts, epoch=0)["nonfinite"] == 0.0               # a normal step first
    before = _state_of(parts)
    if fault == "nan image":
        batch.images[3] = float("nan")
    elif fault == "nan gradient":
        parts.unwrapped.visual.conv1.weight.register_hook(lambda grad: grad * float("nan"))
    else:
        forward = parts.loss_fn.forward
        monkeypatch.setattr(parts.loss_fn, "forward", lambda *a, **k: (lambda out: (out[0] * float("inf"), out[1]))(
            forward(*a, **k)))
    metrics = train_step(batch, parts, epoch=0)
    assert metrics["nonfinite"] == 1.0 and math.isnan(metrics["loss"])
    torch.testing.assert_close(_state_of(parts), before, rtol=0, atol=0)


def test_nan_run_stops_on_one_line_without_nan_checkpoints(digits_dir: Path, micro_model: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """The issue's --lr 1e6: steps are skipped, the run stops after --max-nonfinite-steps in a row with one line;
    every checkpoint written holds finite weights and state."""
    rc = cli.main(argv(digits_dir, micro_model, tmp_path, "--name", "nan", "--lr", "1e6", "--fnd", "glofnd",
                       "--epochs", "3", "--max-nonfinite-steps", "2", "--save-every-n-steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "2 steps in a row had a non-finite loss or gradient" in err[-1], err[-3:]
    files = list((tmp_path / "nan" / "checkpoints").glob("*.pt"))
    assert files
    for path in files:
        assert checkpoint.nonfinite_entries(torch.load(path, weights_only=True)) == [], path
    skipped = [r for r in read_jsonl(tmp_path / "nan" / "metrics.jsonl") if r.get("nonfinite")]
    assert len(skipped) >= 2 and all(r["loss"] is None for r in skipped)


def _kill_at_step(command: list[str], metrics: Path, step: int, timeout_s: float = 240.0) -> None:
    """Start `command`, SIGKILL it as soon as metrics.jsonl has a record of `step` (wherever it then is)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.is_file() and any(r.get("step", 0) >= step for r in read_jsonl(metrics)):
                break
            time.sleep(0.01)
        assert process.poll() is None, f"the run ended before step {step}: {process.stderr.read().decode()[-2000:]}"
    finally:
        process.kill()                                                              # SIGKILL
        process.wait()


def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(straight: dict, digits_dir: Path, micro_model: str,
                                                           tmp_path: Path) -> None:
    """A real `clip-glofnd train` process (one loader worker process) killed with SIGKILL at a random step, maybe
    inside a save, then --resume latest: the same weights, optimizer, λ/m/v/steps and u as the uninterrupted run,
    bit for bit; metrics.jsonl has each step once, with the same losses; no temporary file is left."""
    flags = [*RESUME_FLAGS, "--save-every-n-steps", "1", "--workers", "1"]          # 1 worker: the same data order
    step = random.SystemRandom().randint(1, 3)                                      # 4 steps in all
    _kill_at_step([sys.executable, "-m", "clip_glofnd.cli", *argv(digits_dir, micro_model, tmp_path, "--name",
                                                                   "killed", *flags)],
                  tmp_path / "killed" / "metrics.jsonl", step)
    assert cli.main(argv(digits_dir, micro_model, tmp_path, "--name", "killed", "--resume", "latest", *flags)) == 0
    assert_same_run(torch.load(tmp_path / "killed" / "checkpoints" / "epoch_latest.pt", weights_only=True),
                    straight["ckpt"], f"killed at step {step}")
    records = [r for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4], step
    assert {r["step"]: r["loss"] for r in records} == straight["losses"], step
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*"))              # no temporary file left


def test_resume_with_another_batch_size_warns_and_continues_the_lr(digits_dir: Path, micro_model: str,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Epoch 1 at batch 32 (2 steps of 4), crash, resumed at batch 16 (4 steps per epoch): a warning names the change,
    the old config.yaml is kept, a stale temporary of a killed save is removed, the lr goes on from where it was
    (position 2 of the 4-step cosine, the rest spread over 4 steps: 2, 2.5, 3, 3.5) and metrics.jsonl has each
    step once."""
    flags = ["--epochs", "2", "--lr", "1e-3", "--warmup", "1", "--name", "run"]
    crash_after_first_save(monkeypatch, argv(digits_dir, micro_model, tmp_path, *flags))
    run = tmp_path / "run"
    stale = run / "checkpoints" / ".epoch_latest.pt.tmp-4242"
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO):
        assert cli.main(argv(digits_dir, micro_model, tmp_path, *flags, "--batch-size", "16", "--resume",
                             "latest")) == 0
    assert "--batch-size 32 -> 16" in caplog.text and not stale.exists()
    kept = [p for p in run.glob("config.*.yaml")]
    assert len(kept) == 1 and "batch_size: 32" in kept[0].read_text() and "batch_size: 16" in \
        (run / "config.yaml").read_text()
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    expected = [1e-3 * resume.lr_factor(p, 1, 4) for p in (0, 1, 2, 2.5, 3, 3.5)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)


def test_unwritable_logs_folder_is_one_line_before_any_work(digits_dir: Path, micro_model: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A read-only --logs (simulated: this suite may run as root, which ignores permissions) stops at start."""
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(train, "create_model", None, raising=False)                  # not reached
    rc = cli.main(argv(digits_dir, micro_model, tmp_path / "ro", "--name", "x"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot write in" in err[0] and "Read-only file system" in err[0]


def test_duplicate_id_across_processes_is_an_error_on_every_rank(digits_dir: Path, micro_model: str) -> None:
    """The check on the gathered first-pass ids (run identically on every rank): an id trained earlier this epoch
    by another process stops the step, naming its places; repeat-pass samples are exempt."""
    from types import SimpleNamespace
    from clip_glofnd.seen import SeenIds
    cfg = from_flat({"train_data": str(digits_dir / "train" / "{00000..00011}.tar"), "model": micro_model})
    parts = SimpleNamespace(cfg=cfg, dist=DistInfo())
    run = loop.EpochRun(loader=None, schedule=None, means=None, seen_all=SeenIds(1500))
    batch = Batch(None, None, torch.tensor([5, 6, 7]), None, torch.tensor([True, True, False]))
    loop.check_across_ranks(batch, run, parts)
    loop.check_across_ranks(Batch(None, None, torch.tensor([7, 8]), None, torch.tensor([True, True])), run, parts)
    with pytest.raises(UsageError, match=r"id 6 comes twice in this epoch, on two processes: .*0000\d\.tar: sample"):
        loop.check_across_ranks(Batch(None, None, torch.tensor([9, 6]), None, torch.tensor([True, True])), run,
                                 parts)
