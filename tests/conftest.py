"""Shared fixtures: threads and the embedded model (tiny settings live in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from esft.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, embedded_dir) -> Path:
    """The TINY run in-process: the result every other way of running must reproduce."""
    from helpers import TINY

    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    out = tmp_path_factory.mktemp("ref") / "run"
    ESTrainer(args=ESConfig(**TINY, output_dir=str(out))).train()
    return out


@pytest.fixture(scope="session")
def awd_run(tmp_path_factory, embedded_dir) -> Path:
    from helpers import TINY

    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    out = tmp_path_factory.mktemp("awd") / "run"
    ESTrainer(args=ESConfig(**TINY, output_dir=str(out), awd="l2", awd_lambda=10.0)).train()
    return out
