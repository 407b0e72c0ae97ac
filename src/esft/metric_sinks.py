"""Metric sinks for `--report_to`: metrics.jsonl always, TensorBoard or W&B on request."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from esft.io import append_jsonl

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON line per iteration and forwards scalars to the chosen sink."""

    def __init__(self, run_dir: str | Path, report_to: str = "none", config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._nonfinite: set[str] = set()
        self._tb = None
        self._wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--report_to tensorboard needs: pip install 'esft[tensorboard]'") from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ValueError("--report_to wandb needs: pip install 'esft[wandb]'") from None
            self._wandb = wandb.init(project="esft", config=config or {}, dir=str(run_dir))
        elif report_to != "none":
            raise ValueError(f"unknown report_to {report_to!r}; use none, tensorboard or wandb")

    def log(self, metrics: dict[str, Any]) -> None:
        append_jsonl(self.path, self._finite(metrics))
        step = int(metrics["iteration"])
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _finite(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """A non-finite number (a per-function std of ±1e308 rewards overflows) becomes null,
        named once in a warning: JSON has no inf, and the line must still be written."""
        out = dict(metrics)
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
                if key not in self._nonfinite:
                    self._nonfinite.add(key)
                    log.warning("metric %s is %s at iteration %s (values beyond the float range): logged as null",
                                key, value, metrics.get("iteration"))
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
