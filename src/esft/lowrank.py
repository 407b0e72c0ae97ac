"""Low-rank ES noise (EGGROLL, arXiv 2511.16652): ε = A·Bᵀ/√r for every 2-D weight.

With `--noise_rank r` a member's perturbation of a matrix W (out × in) is the rank-r
product ε = A·Bᵀ/√r, A (out × r) and B (in × r) standard Gaussian, drawn from the same
per-tensor stream the full-rank noise uses (so still a pure function of seed, tensor name,
shape, mode and device type: DESIGN.md, principle 3). Each entry of ε has variance 1, as in
full-rank ES, so σ and α keep their meaning. Tensors that are not matrices (norm scales,
biases) keep ordinary full Gaussian noise: they are tiny, and a rank-r "vector" would be a
single direction.

Why: a batch of members then shares the base matmul, x(W + σε)ᵀ = xWᵀ + (σ/√r)(xB)Aᵀ, so M
members cost one large matmul plus M thin ones (`esft.batched`), and the update
Σⱼ cⱼ·εⱼ = A_cat·diag(c)·B_catᵀ/√r is one matmul per tensor, with no full matrix per member.

Tied embeddings are one tensor with one (A, B): the lookup of token t adds row t of
(σ/√r)·A·Bᵀ, the output head multiplies by the same perturbed matrix.
"""

from __future__ import annotations

import math

import torch

from esft.noise import NoiseMode, fill_noise


def is_lowrank(shape: tuple[int, ...] | torch.Size, rank: int | None) -> bool:
    """Whether a tensor of `shape` gets low-rank noise (matrices only, when a rank is set)."""
    return rank is not None and len(shape) == 2


def factor_shape(shape: tuple[int, ...] | torch.Size, rank: int) -> tuple[int, int]:
    """Shape of the stacked factors [A; B] of a (out × in) matrix: (out + in) × r."""
    out, inp = shape
    return (out + inp, rank)


def fill_factors(
    buf: torch.Tensor, seed: int, name: str, out_features: int, mode: NoiseMode = "iid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw [A; B] into the fp32 buffer `buf` ((out + in) × r); return the views (A, B).

    A and B come from one Gaussian draw of the tensor's stream (A the first `out` rows), so
    replay, Ray workers and the batched forward all rebuild the same factors.
    """
    fill_noise(buf, seed, name, mode)
    return buf[:out_features], buf[out_features:]


def factors(
    seed: int, name: str, shape: tuple[int, ...] | torch.Size, rank: int,
    device: torch.device | str = "cpu", mode: NoiseMode = "iid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh fp32 (A, B) of tensor `name` for `seed`; convenient for tests and audits."""
    buf = torch.empty(factor_shape(shape, rank), dtype=torch.float32, device=device)
    return fill_factors(buf, seed, name, shape[0], mode)


def scale(rank: int) -> float:
    """1/√r: keeps every entry of A·Bᵀ/√r at unit variance."""
    return 1.0 / math.sqrt(rank)


def lowrank_noise(
    seed: int, name: str, shape: tuple[int, ...] | torch.Size, rank: int,
    device: torch.device | str = "cpu", mode: NoiseMode = "iid",
) -> torch.Tensor:
    """The full matrix ε = A·Bᵀ/√r (tests and audits only: training never forms it)."""
    a, b = factors(seed, name, shape, rank, device, mode)
    return (a @ b.T) * scale(rank)


def combined_update(
    out: torch.Tensor, seeds: list[int], coefficients: list[float], name: str, rank: int,
    mode: NoiseMode = "iid", scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """out ← Σⱼ cⱼ·Aⱼ·Bⱼᵀ/√r as one matmul A_cat·diag(c/√r)·B_catᵀ (fp32, shape of `out`).

    The factors of all seeds sit side by side in an (out + in) × (N·r) buffer; the sum over
    seeds and ranks is then the inner dimension of one matmul, so no full matrix per member
    is ever formed. `WeightState` runs it on its single-threaded noise pool, so the
    reduction order, and with it every bit of the result, does not depend on the number of
    torch threads of the process (tested: replay with 1 thread equals training with 2).
    """
    n_out = out.shape[0]
    rows = n_out + out.shape[1]
    need = len(seeds) * rows * rank
    if scratch is None or scratch.numel() < need:
        scratch = torch.empty(need, dtype=torch.float32, device=out.device)
    # One contiguous (out + in) × r block per seed: the same draw as `fill_factors` anywhere else.
    blocks = scratch[:need].view(len(seeds), rows, rank)
    for j, seed in enumerate(seeds):
        fill_factors(blocks[j], seed, name, n_out, mode)
    weights = torch.tensor(
        [c * scale(rank) for c in coefficients for _ in range(rank)], dtype=torch.float32, device=out.device
    )
    # A_cat·diag(c/√r) (out × N·r) and B_cat (in × N·r): small copies, seed-major columns.
    a = blocks[:, :n_out].permute(1, 0, 2).reshape(n_out, -1) * weights
    b = blocks[:, n_out:].permute(1, 0, 2).reshape(rows - n_out, -1)
    return torch.mm(a, b.T, out=out)
