"""Greedy batched generation with transformers, on CPU or CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Message = dict[str, str]


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # generated tokens, the end-of-sequence token included when produced


class HFEngine:
    """Turns chat conversations into greedy completions, in length-sorted batches.

    Prompts are tokenized once (`encode`) and reused for every population member of an
    iteration: only the weights differ between members, never the inputs.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 1024, batch_size: int = 32) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
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
        prefill = ""
        if messages and messages[-1]["role"] == "assistant":
            prefill = messages[-1]["content"]
            messages = messages[:-1]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def encode(self, conversations: list[list[Message]]) -> list[list[int]]:
        texts = [self.prompt_text(m) for m in conversations]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> list[Generation]:
        """Greedy completions for tokenized prompts, returned in the input order."""
        max_new = max_new_tokens or self.max_new_tokens
        # Sorting by length keeps similar prompts together and cuts padding work.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [prompts[i] for i in idx]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(batch):
                ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p) :] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
            )
            new = gen[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                n = len(toks)
                for j, t in enumerate(toks):
                    if t in self.eos_ids:
                        n = j + 1
                        break
                text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
                out[i] = Generation(text=text, num_tokens=n)
        return [g for g in out if g is not None]

    def generate(self, conversations: list[list[Message]], max_new_tokens: int | None = None) -> list[Generation]:
        return self.generate_ids(self.encode(conversations), max_new_tokens)
