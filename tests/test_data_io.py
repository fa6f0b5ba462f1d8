"""The loader's transfer options: uint8 images normalised on the device give the float path's values; pinned batches
(CUDA only; refused with a warning without it); which batches are joined from two worker items."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                          # `benchmarks` lives at the repository root, not in the package
    sys.path.insert(0, str(ROOT))

from benchmarks.loader_throughput import make_synthetic  # noqa: E402
from clip_glofnd.data import Batch, make_train_loader, normalize_on_device, split_normalize  # noqa: E402
from clip_glofnd.errors import UsageError  # noqa: E402

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)   # open_clip's OpenAI values


def tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(c), sum(map(ord, c)) % 1000] for c in captions])


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 random 48 px JPEGs in shards of 9 (uneven: the last holds 4)."""
    return make_synthetic(tmp_path_factory.mktemp("jpegs"), 40, per_shard=9, size=48)


@pytest.fixture(scope="module")
def train_preprocess():
    """open_clip's training transform at 32 px: RandomResizedCrop, convert, ToTensor, Normalize."""
    import open_clip
    return open_clip.image_transform(32, is_train=True, mean=MEAN, std=STD)


def epoch(pattern: str, preprocess, **kw) -> list[Batch]:
    args = dict(preprocess=preprocess, tokenizer=tokenizer, batch_size=4, num_samples=None, workers=2)
    return list(make_train_loader(pattern, **{**args, **kw}))


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_images_normalised_on_device_equal_the_float_path(jpegs: str, train_preprocess, workers: int) -> None:
    """Same ids, captions and random crops; x / 255 then Normalize equals ToTensor then Normalize."""
    floats = epoch(jpegs, train_preprocess, workers=workers, epoch=3)
    loader = make_train_loader(jpegs, preprocess=train_preprocess, tokenizer=tokenizer, batch_size=4,
                               num_samples=None, workers=workers, epoch=3, uint8=True)
    small = list(loader)
    assert loader.mean_std == (MEAN, STD)
    assert [b.ids.tolist() for b in small] == [b.ids.tolist() for b in floats]
    for a, b in zip(small, floats):
        assert a.images.dtype == torch.uint8 and a.images.shape == b.images.shape == (len(b), 3, 32, 32)
        assert torch.equal(a.texts, b.texts)
        torch.testing.assert_close(normalize_on_device(a.images, *loader.mean_std), b.images, rtol=0, atol=1e-6)


def test_normalize_on_device_by_hand() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize_on_device(images, (0.5, 0.2, 1.0), (0.5, 0.1, 2.0))
    expected = torch.tensor([(0 - 0.5) / 0.5, (0.2 - 0.2) / 0.1, (1 - 1.0) / 2.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert images.dtype == torch.uint8                                              # the input is left as it was


def test_uint8_needs_to_tensor_then_normalize() -> None:
    def plain(image):
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float()

    with pytest.raises(UsageError, match="ends in ToTensor, Normalize"):
        split_normalize(plain)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_pin_memory_without_cuda_warns_and_gives_the_same_batches(jpegs: str, train_preprocess,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="clip_glofnd.data"):
        pinned = epoch(jpegs, train_preprocess, pin_memory=True)
    assert "pin_memory needs CUDA" in caplog.text
    plain = epoch(jpegs, train_preprocess)
    assert [b.ids.tolist() for b in pinned] == [b.ids.tolist() for b in plain]
    assert all(torch.equal(a.images, b.images) for a, b in zip(pinned, plain))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pin_memory_pins_every_batch_tensor_joined_or_not(jpegs: str, train_preprocess) -> None:
    loader = make_train_loader(jpegs, preprocess=train_preprocess, tokenizer=tokenizer, batch_size=4,
                               num_samples=None, workers=2, pin_memory=True)
    batches = list(loader)
    assert loader.joined > 0                                                      # both kinds of batch checked
    for b in batches:
        assert b.images.is_pinned() and b.texts.is_pinned() and b.ids.is_pinned()


@pytest.mark.parametrize("shards, workers, joined", [(2, 2, 1), (3, 2, 2), (3, 1, 0)])
def test_batches_are_joined_only_after_a_partial_item(tmp_path: Path, train_preprocess, shards: int, workers: int,
                                                      joined: int) -> None:
    """Workers send full batches but their last; a batch straddles two items only from a worker's partial item on.

    Shards of 9, batch 4. Two shards, two workers: 4 4 1 each, in step; only the last batch (1 + 1) is joined. Three
    shards, two workers (4 4 4 4 2 and 4 4 1): after the second worker's 1, the first worker's last 4 and 2 are out
    of step, so both batches they feed are joined. One worker: 4 x 6 then 3, nothing joined.
    """
    pattern = make_synthetic(tmp_path, 9 * shards, per_shard=9, size=40)
    loader = make_train_loader(pattern, preprocess=train_preprocess, tokenizer=tokenizer, batch_size=4,
                               num_samples=None, workers=workers)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 9 * shards and loader.joined == joined
