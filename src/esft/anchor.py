"""Anchored Weight Decay (Schweighofer et al. 2026) and the on-disk anchor θ₀.

After every ES update the distance d = θ − θ₀ is pulled back toward 0. θ₀ lives in a
safetensors file that we memory-map one tensor at a time, so the anchor never doubles
resident memory: at most one tensor's pages are mapped at once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

Penalty = Literal["none", "l2", "l1", "huber"]


class DamagedAnchorError(ValueError):
    """θ₀ on disk is unreadable, truncated or does not hold the bits it was written with."""


def _umask() -> int:
    from esft.io import _umask as umask

    return umask()


# ----------------------------------------------------------------------- penalties
def shrink(d: torch.Tensor, penalty: Penalty, step: float, huber_delta: float = 1e-3) -> torch.Tensor:
    """One AWD step on d = θ − θ₀ (in place where possible); returns the new d.

    l2:    d ← (1 − s)·d                       (the paper's decay step; s < 1)
    l1:    d ← sign(d)·max(|d| − s, 0)         (proximal soft-threshold: exact zeros)
    huber: proximal step of s·H_δ(d), H_δ quadratic for |d| ≤ δ and linear beyond:
           d/(1 + s) where |d| ≤ δ(1 + s), else d − s·δ·sign(d). Small drifts are decayed
           smoothly as with L2, large ones shrink at a bounded rate as with L1.
    """
    if penalty == "none" or step == 0:
        return d
    if penalty == "l2":
        if step >= 1:
            raise ValueError(f"l2 AWD step must be < 1 (got {step})")
        return d.mul_(1.0 - step)
    if penalty == "l1":
        return torch.nn.functional.softshrink(d, step)
    if penalty == "huber":
        inside = d.abs() <= huber_delta * (1.0 + step)
        return torch.where(inside, d / (1.0 + step), d - (step * huber_delta) * torch.sign(d))
    raise ValueError(f"unknown AWD penalty {penalty!r}; use none, l2, l1 or huber")


# ------------------------------------------------------------------- anchor file
class AnchorFile:
    """θ₀ on disk: written once with safetensors, read back tensor by tensor via mmap.

    We parse the (documented, stable) safetensors header ourselves so that each tensor
    is its own short-lived mapping; `safe_open` maps the whole file, and every page it
    touches stays in resident memory until the file is closed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            size = self.path.stat().st_size
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
            raise DamagedAnchorError(f"{self.path} is not a readable safetensors file ({e})") from None
        metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        self.recorded_checksum: str | None = metadata.get("esft_checksum")
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            raise DamagedAnchorError(f"{self.path} is truncated ({size} bytes, its header needs {self._data_start + end})")

    @staticmethod
    def write(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> AnchorFile:
        """Save fp32 copies atomically (temp file + rename), with their checksum; returns the reader."""
        from esft.io import TMP_INFIX, disk_errors
        from esft.params import tensors_checksum

        path = Path(path)
        tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
        copies = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors}
        try:
            with disk_errors(path):
                # Over the tensors in name order: the file's own order is the library's choice.
                checksum = tensors_checksum(sorted(copies.items()))
                save_file(copies, str(tmp), metadata={"esft_checksum": checksum})
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return AnchorFile(path)

    def verify(self, names: Iterable[str]) -> None:
        """Raise DamagedAnchorError unless the tensors `names` hold the bits recorded at write time.

        Files written before checksums were recorded are trusted as they are.
        """
        from esft.params import tensors_checksum

        names = list(names)
        missing = [n for n in names if n not in self._entries]
        if missing:
            raise DamagedAnchorError(f"{self.path} lacks tensors {missing[:3]}")
        if self.recorded_checksum is None:
            return
        # The checksum was taken over every tensor in the file, in name order.
        if tensors_checksum((n, self.get(n)) for n in sorted(self._entries)) != self.recorded_checksum:
            raise DamagedAnchorError(f"{self.path} does not hold the bits it was written with (checksum mismatch)")

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """θ₀[name] as fp32; on CPU a view of a private mapping freed when dropped."""
        entry = self._entries[name]
        if entry["dtype"] != "F32":
            raise ValueError(f"anchor tensors are fp32; {name} is {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            return torch.zeros(shape, dtype=torch.float32, device=device)
        # mode "c": copy-on-write, so torch gets a writable view without touching the file.
        arr = np.memmap(self.path, dtype=np.float32, mode="c", offset=self._data_start + begin, shape=shape)
        t = torch.from_numpy(arr)
        return t if torch.device(device).type == "cpu" else t.to(device)

    def iter(self, names: Iterable[str], device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        for n in names:
            yield self.get(n, device)

    def norm(self, names: Iterable[str]) -> float:
        """‖θ₀‖ in float64 over the given tensors."""
        return math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in self.iter(names)))


def anchor_and_drift(
    named_masters: Iterable[tuple[str, torch.Tensor]],
    anchor: AnchorFile,
    penalty: Penalty,
    step: float,
    huber_delta: float = 1e-3,
    devices: dict[str, torch.device] | None = None,
) -> float:
    """Apply AWD to every master in place (if any penalty) and return ‖θ − θ₀‖ (float64).

    One streamed pass does both jobs, so the per-iteration drift metric costs no extra
    read of θ₀. `devices`: where to compute each tensor, when it is not where its master is
    (a host master of a CUDA run): the tensor is copied there and back, so the arithmetic, and so every bit and
    the drift, are those of a master kept on that device (a division or a float64 norm on
    the CPU can round differently from the GPU's).
    """
    sq = 0.0
    for name, master in named_masters:
        where = master.device if devices is None else devices[name]
        work = master if where == master.device else master.to(where)
        theta0 = anchor.get(name, where)
        d = work - theta0
        if penalty != "none":
            d = shrink(d, penalty, step, huber_delta)
            torch.add(theta0, d, out=work)
            if work is not master:
                master.copy_(work)
        sq += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
        del theta0, work
    return math.sqrt(sq)


# ------------------------------------------------------------- adaptive L2 step
def expected_update_sq(coefficients: list[float] | None, learning_rate: float, population_size: int,
                       num_params: int) -> float:
    """E‖Δθ‖² of one ES update, (α/N)²·Σⱼcⱼ²·d: noise entries have unit variance and the
    seeds' directions are independent, so the squared norms add (Eq. 2's random walk)."""
    if not coefficients:
        return 0.0
    return (learning_rate / population_size) ** 2 * sum(c * c for c in coefficients) * num_params


def l2_step_for_target(drift: float, update_sq: float, target: float, max_step: float = 0.5) -> float:
    """The L2 step s that brings the drift back to `target` after the next update.

    d ← (1 − s)(d + u) with ‖d + u‖² ≈ ‖d‖² + ‖u‖² (u is nearly orthogonal to d in high
    dimension), so ‖d_new‖ = target needs s = 1 − target/√(‖d‖² + ‖u‖²); 0 while the drift
    stays under the target, at most `max_step` so one bad estimate cannot wipe the run.
    """
    if not math.isfinite(target):
        return 0.0
    expected = math.sqrt(drift * drift + update_sq)
    if expected <= target:
        return 0.0
    return min(max_step, 1.0 - target / expected)


def l2_drift_after(drift: float, update_sq: float, step: float, iterations: int) -> float:
    """The expected drift after `iterations` updates of E‖u‖² = `update_sq`, each followed by
    the L2 step s: D² ← (1 − s)²(D² + ‖u‖²), summed in closed form (a geometric series)."""
    if iterations <= 0:
        return drift
    keep = (1.0 - step) ** 2
    if keep == 1.0:
        return math.sqrt(drift * drift + iterations * update_sq)
    decay = keep**iterations
    return math.sqrt(decay * drift * drift + update_sq * keep * (1.0 - decay) / (1.0 - keep))


def l2_step_for_horizon(drift: float, update_sq: float, target: float, iterations: int,
                        max_step: float = 0.5) -> float:
    """The one L2 step s that, applied after each of the next `iterations` updates, brings
    the expected drift to `target` at their end (`l2_drift_after`).

    Spread over the horizon rather than saved for when the drift reaches the target: a
    constant s damps every update a little, as a fixed λ does, and a fixed λ ending at the
    same KL kept more of the target gain than a cap that let plain ES run until the budget
    bound (README, "Choosing the AWD strength"). 0 when plain ES stays under the target;
    `max_step` when even it cannot. The drift is monotone in s, so bisection finds it
    (to float precision, and deterministically: replay and Ray see the same step).
    """
    if not math.isfinite(target) or iterations <= 0:
        return 0.0
    if l2_drift_after(drift, update_sq, 0.0, iterations) <= target:
        return 0.0
    if l2_drift_after(drift, update_sq, max_step, iterations) >= target:
        return max_step
    low, high = 0.0, max_step
    for _ in range(60):
        mid = 0.5 * (low + high)
        if l2_drift_after(drift, update_sq, mid, iterations) > target:
            low = mid
        else:
            high = mid
    return high


def drift_target_for_kl(curvature: float, budget: float, margin: float = 0.9) -> float:
    """The drift ‖θ − θ₀‖ at which the KL would sit at margin·budget, given the curvature
    KL/‖θ − θ₀‖² (nats per token per squared unit of drift).

    Near θ₀ the KL grows like the square of the distance (its Hessian is the Fisher), so the
    curvature calibrates the scale: target = √(margin·budget/curvature). The KL budget
    passes the mean curvature of its measurements so far (`awd_schedule.KLBudget`), so each
    new measurement moves the target by its share of that mean. inf while there is no
    curvature to scale (nothing measured, or a KL of 0).
    """
    if curvature <= 0.0 or not math.isfinite(curvature):
        return math.inf
    return math.sqrt(margin * budget / curvature)
