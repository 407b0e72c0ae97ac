"""Tiny run settings shared by the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

SHARED_DATA = Path(os.environ.get("ESFT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")

# Tiny but real: the embedded model, a few tokens, a few members, the first block only
# (noise for 3.5M instead of 135M weights keeps each iteration around a second).
TINY = dict(
    model="embedded",
    task="conciseness",
    population_size=4,
    prompts_per_step=2,
    max_new_tokens=6,
    sigma=0.05,
    learning_rate=0.02,
    max_steps=3,
    save_steps=1,
    trainable=r"model\.layers\.0\.",
    seed=7,
    num_threads=2,
    disable_tqdm=True,
)


def tiny_cli_args(**overrides) -> list[str]:
    args = []
    for k, v in {**TINY, **overrides}.items():
        if v is True:
            args.append(f"--{k}")
        elif v is False or v is None:
            continue
        else:
            args += [f"--{k}", str(v)]
    return args


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different tensor names"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {diff[:3]}"


class Tiny(torch.nn.Module):
    """Two small Linear layers (a bias, a matrix) with fixed random weights: unit tests of the ES math."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(7, 5).to(dtype)
        self.b = torch.nn.Linear(5, 3, bias=False).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def copy_run(src: Path, dst: Path, writable: tuple[str, ...] = ()) -> Path:
    """A copy of a run directory that tests may damage and resume.

    Checkpoints hold the whole model (~0.5 GB each): large files are hard links (no
    copy, no disk), except those in `writable` (paths relative to the run), which a test
    changes in place and so must not share with `src`. esft itself never writes a large
    file in place (atomic replaces make new files), so the links stay intact.
    """
    import os
    import shutil

    def copy(s: str, d: str) -> None:
        rel = str(Path(s).relative_to(src))
        if os.path.getsize(s) > (1 << 20) and rel not in writable:
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)
    return dst
