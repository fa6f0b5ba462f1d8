"""Shared fixtures: seeded RNGs, few threads (CI has 2 cores)."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory):
    """The digits data set (clip_glofnd.digits.make_digits, seed 0), built once per session (~2 s).

    Layout: train/{00000..00011}.tar (1,500 samples, ids 0..1499) + train/sizes.json; wds/digits_cls and
    wds/digits_ret (297 held-out images, CLIP_benchmark layout); digits.json = the summary make_digits returns.
    """
    from clip_glofnd.digits import make_digits
    out = tmp_path_factory.mktemp("digits")
    make_digits(out, seed=0)
    return out


def join_or_kill(context: torch.multiprocessing.ProcessContext, timeout_s: float, what: str) -> None:
    """Wait for spawned ranks (a failed rank raises); kill them all and fail the test if they outlive `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish within {timeout_s:.0f} s (a rank hangs)")
