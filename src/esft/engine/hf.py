"""Greedy batched generation with transformers, on CPU or CUDA.

On CUDA the engine asks transformers for a static KV cache, which lets `generate` compile
the decoding step (torch.compile, "reduce-overhead": CUDA graphs) where the model supports
it; prompts are moved to the device once per prompt batch and reused by every member, so
the ES loop sends nothing else to the GPU but seeds. On CPU the dynamic cache is faster and
stays the default; both are switchable (`static_cache`, `compile`) for tests and tuning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

Message = dict[str, str]


def render_chat(tokenizer, messages: list[Message]) -> str:
    """The chat-templated prompt text; a final assistant message is a prefill to continue.

    ES generation, evaluation and the GRPO baseline all render prompts here, so the three
    see the same text.
    """
    prefill = ""
    if messages and messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"]
        messages = messages[:-1]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prefill


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # generated tokens, the end-of-sequence token included when produced


class HFEngine:
    """Turns chat conversations into greedy completions, in length-sorted batches.

    Prompts are tokenized once (`encode`) and reused for every population member of an
    iteration: only the weights differ between members, never the inputs. `copies=M` in
    `generate_ids` repeats each prompt batch for M members, member-major, for the batched
    population forward (`esft.batched`).
    """

    def __init__(
        self, model, tokenizer, max_new_tokens: int = 1024, batch_size: int = 32,
        static_cache: bool | None = None, compile: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        # None: decided by the device at generation time (on for CUDA, off for CPU).
        self.static_cache = static_cache
        self.compile = compile
        self._inputs: dict[tuple[tuple[int, ...], ...], tuple[torch.Tensor, torch.Tensor]] = {}
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_text(self, messages: list[Message]) -> str:
        """The chat-templated prompt; a final assistant message is a prefill to continue."""
        return render_chat(self.tokenizer, messages)

    def encode(self, conversations: list[list[Message]]) -> list[list[int]]:
        texts = [self.prompt_text(m) for m in conversations]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _batch_inputs(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask of a prompt batch, on the model's device (cached).

        Every member of an iteration generates for the same batches, so they are built
        and sent to the device once, not once per member.
        """
        key = tuple(tuple(p) for p in batch)
        hit = self._inputs.get(key)
        if hit is not None and hit[0].device == self.device:
            return hit
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        if len(self._inputs) >= 64:  # prompt subsets change per iteration; keep it small
            self._inputs.clear()
        self._inputs[key] = (ids.to(self.device), mask.to(self.device))
        return self._inputs[key]

    def generation_options(self, batched: bool = False) -> dict:
        """Extra `generate` arguments: static cache and compiled decoding (CUDA by default).

        A batched population pass (`batched=True`) keeps the static cache but is not
        compiled: its patched modules swap tensors per member, which torch.compile would
        either break on or re-trace for every pass.
        """
        cuda = self.device.type == "cuda"
        static = cuda if self.static_cache is None else self.static_cache
        compiled = static and not batched and (cuda if self.compile is None else self.compile)
        opts: dict = {}
        if static:
            opts["cache_implementation"] = "static"
            # transformers compiles the decoding step by itself for a static cache on CUDA;
            # `compile=False` keeps a static cache without it.
            opts["disable_compile"] = not compiled
        return opts

    def _generate(self, batched: bool, **kwargs) -> torch.Tensor:
        opts = self.generation_options(batched)
        try:
            return self.model.generate(**kwargs, **opts)
        except Exception as e:
            # Compiled decoding is an optimisation: if it fails on some model, say so once
            # and keep generating without it rather than stopping the run.
            if not opts.get("cache_implementation") or opts.get("disable_compile"):
                raise
            log.warning("compiled static-cache generation failed (%s); continuing without compile", e)
            self.compile = False
            return self.model.generate(**kwargs, **self.generation_options(batched))

    @torch.inference_mode()
    def generate_ids(
        self, prompts: list[list[int]], max_new_tokens: int | None = None, copies: int = 1
    ) -> list[Generation]:
        """Greedy completions for tokenized prompts, returned in the input order.

        With `copies=M` every prompt batch is repeated M times, member-major (rows
        [m·B, (m+1)·B) belong to member m), and the result holds M·len(prompts)
        completions: member m's are `out[m·len(prompts) : (m+1)·len(prompts)]`. Member m
        sees exactly the batch (padding included) a single-member call would.
        """
        max_new = max_new_tokens or self.max_new_tokens
        n = len(prompts)
        # Sorting by length keeps similar prompts together and cuts padding work.
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        out: list[Generation | None] = [None] * (n * copies)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = self._batch_inputs([prompts[i] for i in idx])
            width = ids.shape[1]
            if copies > 1:
                ids, mask = ids.repeat(copies, 1), mask.repeat(copies, 1)
            gen = self._generate(
                copies > 1,
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
            )
            new = gen[:, width:].tolist()
            for row, toks in enumerate(new):
                member, i = divmod(row, len(idx))
                n_tok = len(toks)
                for j, t in enumerate(toks):
                    if t in self.eos_ids:
                        n_tok = j + 1
                        break
                text = self.tokenizer.decode(toks[:n_tok], skip_special_tokens=True)
                out[member * n + idx[i]] = Generation(text=text, num_tokens=n_tok)
        return [g for g in out if g is not None]

    def generate(self, conversations: list[list[Message]], max_new_tokens: int | None = None) -> list[Generation]:
        return self.generate_ids(self.encode(conversations), max_new_tokens)
