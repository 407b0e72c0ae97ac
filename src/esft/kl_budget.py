"""A forgetting budget: KL(base ‖ model) measured during training on prompts the user names.

`--kl_budget X` with `--kl_tasks` (tasks' evaluation prompts) or `--kl_prompts FILE` (the
user's own): at the start, continuations of those prompts are sampled once from the base
model and cached (the `esft kl` machinery and cache files); once before the first update at
θ₀ + one random update-sized step (the probe, `measure(displaced=...)`), then every
`--kl_every` iterations and once halfway through the last of them, the exact per-position
KL(base ‖ current), token-weighted, is measured on them with forward passes only.
`awd_schedule.KLBudget` turns each measurement into a curvature KL/‖θ − θ₀‖², their mean so
far into a target drift (`anchor.drift_target_for_kl`) and that into a constant AWD L2 step
that reaches it at the end of the run (`anchor.l2_step_for_horizon`); the step applied is part
of the iteration's seed-log record, so replay, resume and Ray actors apply exactly it.

The base model is never held twice: its log-probabilities are computed by pointing the
trainable tensors at θ₀ (`WeightState.weights_from`), and cached when they fit in memory
(`ESFT_KL_CACHE_MB`, default 512), so a measurement then costs one forward pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esft.anchor import AnchorFile
from esft.config import ESConfig
from esft.engine import HFEngine
from esft.evaluation.kl import base_continuations, batch_kl, batch_logprobs, continuation_batches
from esft.io import read_text
from esft.params import WeightState

log = logging.getLogger(__name__)

DEFAULT_CACHE_MB = 512.0
#: Rows per scoring forward pass on the CPU. Measured on 2 cores with the embedded model
#: (24 and 48 prompts of HellaSwag, PIQA and ARC, 32 tokens): 4 rows took 14.1 s where 8
#: took 17.5 s (and 7.7 against 8.9–10.5 s), since smaller batches of length-sorted rows pad
#: less and keep the attention's working set small; 2 rows were no faster than 4. The
#: measurement is the KL budget's whole overhead, so it is worth the few lines.
CPU_SCORE_BATCH = 4


@dataclass
class KLPromptSet:
    """Tokenized prompts that measure the KL, under a name that keys their cache file."""

    name: str
    prompts: list[list[int]]


def read_prompt_file(path: str | Path) -> list[list[dict[str, str]]]:
    """Chat conversations from a prompts file: `.txt` one prompt per line; `.jsonl`/`.json`
    rows with a `prompt` field (a string, or a list of chat messages)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--kl_prompts {path}: no such file")
    text = read_text(path, "--kl_prompts")
    if "\x00" in text:
        raise ValueError(f"--kl_prompts {path}: a binary file (it holds NUL bytes), not prompts")
    if path.suffix.lower() not in (".jsonl", ".json"):
        conversations = [[{"role": "user", "content": line.strip()}] for line in text.splitlines() if line.strip()]
    else:
        from esft.tasks.custom import read_json_rows

        conversations = []
        try:
            rows = read_json_rows(path)
        except ValueError as e:
            raise ValueError(f"--kl_prompts {e}") from None
        for i, row in enumerate(rows):
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if isinstance(prompt, str) and prompt.strip():
                conversations.append([{"role": "user", "content": prompt}])
            elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
                conversations.append([dict(m) for m in prompt])
            else:
                raise ValueError(f"--kl_prompts {path}: row {i} needs a 'prompt' (a string or chat messages)")
    if not conversations:
        raise ValueError(f"--kl_prompts {path}: no prompts in it (empty, or only blank lines)")
    return conversations


#: The KL prompts of a run as chat conversations, under the names that key their cache files.
KLConversations = list[tuple[str, list[list[dict[str, str]]]]]


def kl_conversations(cfg: ESConfig) -> KLConversations:
    """The KL prompts of `--kl_tasks` (first `kl_num_prompts` evaluation examples each) and
    of `--kl_prompts` (every prompt of the file), read and checked without a model: the
    trainer calls this before it writes anything, so a bad entry leaves nothing behind."""
    from esft.tasks import get_task

    sets: KLConversations = []
    for name in [t.strip() for t in (cfg.kl_tasks or "").split(",") if t.strip()]:
        try:
            task = get_task(name, data_dir=cfg.data_dir)
            examples = task.load("test", limit=cfg.kl_num_prompts)
        except (ValueError, OSError, ImportError) as e:  # unknown task, missing data file, no hub
            raise ValueError(f"--kl_tasks {name!r}: {e}") from None
        if not examples:
            raise ValueError(f"--kl_tasks: task {name!r} has no evaluation examples")
        sets.append((name, [task.messages(e) for e in examples]))
    if cfg.kl_prompts:
        sets.append((f"prompts-{Path(cfg.kl_prompts).stem}", read_prompt_file(cfg.kl_prompts)))
    return sets


def prompt_sets(cfg: ESConfig, engine: HFEngine, conversations: KLConversations | None = None) -> list[KLPromptSet]:
    """The KL prompts tokenized (`conversations`: as `kl_conversations` read them before)."""
    if conversations is None:
        conversations = kl_conversations(cfg)
    return [KLPromptSet(name, engine.encode(convs)) for name, convs in conversations]


class KLMonitor:
    """Exact token-weighted KL(base ‖ current weights) on fixed base-model continuations."""

    def __init__(
        self, cfg: ESConfig, state: WeightState, engine: HFEngine, anchor: AnchorFile, run_dir: str | Path,
        batch_size: int = 8, seed: int = 0, score_batch_size: int | None = None,
        conversations: KLConversations | None = None,
    ) -> None:
        """`batch_size`: rows per sampling batch (as `esft kl` samples, so cached continuations
        are the same); `score_batch_size`: rows per measurement forward pass (default
        `CPU_SCORE_BATCH` on the CPU, `batch_size` on an accelerator)."""
        self.state, self.anchor = state, anchor
        sets = prompt_sets(cfg, engine, conversations)
        prompts: list[list[int]] = []
        continuations: list[list[int]] = []
        # The continuations are the base model's: sample (or read from cache) with θ₀ in place.
        with self._base_weights():
            for s in sets:
                conts = base_continuations(
                    Path(run_dir), s.name, cfg.model, state.model, engine.tokenizer, s.prompts,
                    len(s.prompts), cfg.kl_max_tokens, seed, batch_size,
                )
                prompts += s.prompts
                continuations += conts
        self.n_prompts = len(prompts)
        self.n_tokens = sum(len(c) for c in continuations)
        if score_batch_size is None:
            score_batch_size = CPU_SCORE_BATCH if state.device.type == "cpu" else batch_size
        self.batches = continuation_batches(prompts, continuations, score_batch_size, engine.pad_id)
        self._base_lp: list[torch.Tensor] | None = None
        vocab = state.model.config.vocab_size
        bytes_needed = sum(b.targets.numel() for b in self.batches) * vocab * 4
        budget = float(os.environ.get("ESFT_KL_CACHE_MB", DEFAULT_CACHE_MB)) * 2**20
        if bytes_needed <= budget:
            with self._base_weights(), torch.inference_mode():
                self._base_lp = [batch_logprobs(state.model, b) for b in self.batches]
        log.info("KL budget: %d prompts × ≤%d base-model tokens (%d tokens)%s", self.n_prompts, cfg.kl_max_tokens,
                 self.n_tokens, "" if self._base_lp is not None else "; base log-probs recomputed per measurement")

    def _base_weights(self):
        device = self.state.device
        return self.state.weights_from(lambda name: self.anchor.get(name, device))

    def measure(self, displaced: tuple[int, float] | None = None) -> float:
        """KL(base ‖ model) in nats per continuation token, exact per position, token-weighted.

        `displaced=(seed, σ)` measures it at θ + σ·ε(seed) instead (the weights come back bitwise).
        """
        cached = self._base_lp is not None
        total = 0.0
        # With the base log-probs cached, displace once for every batch; else once per batch,
        # around the forward pass only (θ₀ takes the work buffers for the base side).
        with self._displaced(displaced if cached else None):
            for i, batch in enumerate(self.batches):
                if cached:
                    base_lp = self._base_lp[i]  # type: ignore[index]
                else:
                    with self._base_weights(), torch.inference_mode():
                        base_lp = batch_logprobs(self.state.model, batch)
                # Perturbed outside inference mode: the work buffers must stay ordinary tensors.
                with self._displaced(None if cached else displaced), torch.inference_mode():
                    model_lp = batch_logprobs(self.state.model, batch)
                    _, exact = batch_kl(batch, base_lp, model_lp)
                total += float(np.sum(exact))
        return total / self.n_tokens if self.n_tokens else 0.0

    @contextmanager
    def _displaced(self, displaced: tuple[int, float] | None) -> Iterator[None]:
        if displaced is None:
            yield
            return
        seed, sigma = displaced
        self.state.perturb(seed, +1, sigma)  # the members' noise family (iid, shared or low-rank)
        try:
            yield
        finally:
            self.state.restore()


__all__ = ["KLMonitor", "KLPromptSet", "prompt_sets", "read_prompt_file"]
