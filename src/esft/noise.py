"""Deterministic Gaussian noise ε(seed, tensor), regenerated on demand.

Noise is a pure function (DESIGN.md, principle 3): the same (seed, tensor name, shape,
mode, device type) always gives the same fp32 values, so a run is fully described by its
seed log and the noise for the whole model is never held in memory at once.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

NoiseMode = Literal["iid", "shared"]
_SEED_MASK = (1 << 63) - 1


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed for `iid` mode, stable across processes and Python versions.

    Python's `hash()` is salted per process; a cryptographic digest is not, so Ray
    workers, replays and resumes all derive the same stream.
    """
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def fill_noise(
    out: torch.Tensor, seed: int, name: str, mode: NoiseMode = "iid"
) -> torch.Tensor:
    """Write ε(seed, name) into the fp32 tensor `out` (shape and device come from it).

    `shared` reproduces the reference code: every tensor draws from a generator seeded
    with the same seed, so tensors of one member share their leading noise values.
    """
    if out.dtype != torch.float32:
        raise TypeError("noise is always generated in float32")
    if mode not in ("iid", "shared"):
        raise ValueError(f"unknown noise_mode {mode!r}; use 'iid' or 'shared'")
    stream = seed if mode == "shared" else tensor_seed(seed, name)
    return torch.randn(out.shape, generator=_generator(stream, out.device), dtype=torch.float32, out=out)


def noise(
    seed: int, name: str, shape: tuple[int, ...] | torch.Size, device: torch.device | str = "cpu",
    mode: NoiseMode = "iid",
) -> torch.Tensor:
    """A fresh fp32 tensor holding ε(seed, name); convenient for tests and audits."""
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    return fill_noise(out, seed, name, mode)
