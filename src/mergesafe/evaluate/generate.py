"""Generation backends.

`transformers` (default): batched greedy (or sampled) decoding through `model.generate` with left padding and
the KV cache.  Prompts are sorted by token length (longest first) so that each batch holds
prompts of similar length — little padding, and an out-of-memory error shows up on the first
batch — and the responses are put back in input order.  Decoding stops at the eos token(s) of the
tokenizer and of the model's generation config.  Greedy decoding is deterministic: the same model
and prompts give the same responses whatever the batch size (up to float rounding).

Sampled decoding (`Sampling`: temperature, top-p, top-k; task sets only) runs under a forked
torch RNG seeded with `Sampling.seed`, so the same seed, model, prompts and batch size give the
same samples, and the caller's global RNG state is left as it was.  Filters apply in
transformers' order: temperature, then top-k, then top-p (nucleus, Holtzman et al. 2020).

`vllm`: the same prompts (these token ids) and decoding through vLLM, in `vllm_engine.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from mergesafe.checkpoint.chat_template import (
    chat_template_source,
    check_chat_template,
    describe_template_error,
)
from mergesafe.errors import UserError

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: softmax(logits / temperature), top-k and top-p filters, seeded."""

    temperature: float
    top_p: float = 1.0
    top_k: int | None = None
    seed: int = 0


def sampling_of(config: Any) -> Sampling | None:
    """The task sets' `Sampling` of an `EvalConfig`; None (greedy) when its temperature is 0."""
    if not config.temperature:
        return None
    return Sampling(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                    seed=config.seed)


def chat_texts(tokenizer, prompts: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Each prompt as one user turn through the tokenizer's chat template, ready for the reply.

    A template that rejects the system role gets the system prompt in front of the user turn;
    a tokenizer without a chat template gets the prompt as plain text (after its BOS token, if any;
    texts are tokenized without adding special tokens, since chat templates write their own).

    The template is first rendered on a probe conversation under time and memory bounds
    (:func:`mergesafe.checkpoint.chat_template.check_chat_template`, once per template); a template
    that fails there or on a prompt is a `UserError` naming the tokenizer's template file.
    """
    if not getattr(tokenizer, "chat_template", None):
        prefix = (tokenizer.bos_token or "") + (f"{system_prompt}\n\n" if system_prompt else "")
        return [prefix + p for p in prompts]
    source = chat_template_source(tokenizer)
    check_chat_template(tokenizer, source)
    out = []
    for i, p in enumerate(prompts, start=1):
        messages = [{"role": "user", "content": p}]
        if system_prompt:
            try:
                out.append(tokenizer.apply_chat_template(
                    [{"role": "system", "content": system_prompt}, *messages],
                    tokenize=False, add_generation_prompt=True))
                continue
            except Exception:  # e.g. Gemma: "System role not supported"
                messages = [{"role": "user", "content": f"{system_prompt}\n\n{p}"}]
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except Exception as err:  # noqa: BLE001 - a template that rejects this prompt
            raise UserError(f"prompt {i} of {len(prompts)}: the chat template cannot render it "
                            f"({describe_template_error(err)})", path=source) from None
    return out


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids both backends feed: rendered texts tokenized without special tokens (the
    chat template wrote its own BOS, if any)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _eos_ids(model, tokenizer) -> list[int]:
    return eos_token_ids(getattr(model, "generation_config", None), tokenizer)


def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """The ids decoding stops at: the generation config's eos id(s), then the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i not in ids:
                ids.append(int(i))
    return ids


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def generate_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                   max_new_tokens: int = 512, repetition_penalty: float = 1.0,
                   progress: Progress | None = None, sampling: Sampling | None = None) -> list[str]:
    """Greedy (or, with `sampling`, sampled) continuations of already-formatted `texts`, batched
    with left padding.

    Returns the decoded new tokens (special tokens removed), in the order of `texts`.
    """
    if not texts:
        return []
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    decoding: dict[str, Any] = {"do_sample": False}
    if sampling is not None:  # top_k=0 switches transformers' default top-k of 50 off
        decoding = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                    "top_k": sampling.top_k or 0}
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, num_beams=1, **decoding,
        repetition_penalty=repetition_penalty, eos_token_id=eos or None, pad_token_id=pad,
    )
    device = _device(model)
    if sampling is None:
        return _generate(model, tokenizer, texts, gen_cfg, batch_size, eos, pad, device, progress)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(sampling.seed)
        return _generate(model, tokenizer, texts, gen_cfg, batch_size, eos, pad, device, progress)


def _generate(model, tokenizer, texts: Sequence[str], gen_cfg: GenerationConfig, batch_size: int,
              eos: list[int], pad: int, device: torch.device, progress: Progress | None) -> list[str]:
    encoded = encode_texts(tokenizer, texts)
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    results: list[str | None] = [None] * len(texts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = encoded[i]
                    if seq:
                        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                        mask[row, width - len(seq):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg)
                new = out[:, width:].tolist()
                for row, i in enumerate(idx):
                    results[i] = tokenizer.decode(_cut(new[row], eos, pad), skip_special_tokens=True)
                if progress is not None:
                    progress(len(idx))
    finally:
        model.train(was_training)
    return [r if r is not None else "" for r in results]


def _cut(tokens: list[int], eos: list[int], pad: int) -> list[int]:
    """New tokens up to (not including) the first eos; generate pads finished rows after it."""
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j]
    return tokens


def generate_responses(model, tokenizer, prompts: Sequence[str], *, system_prompt: str | None = None,
                       batch_size: int = 32, max_new_tokens: int = 512,
                       repetition_penalty: float = 1.2, progress: Progress | None = None,
                       sampling: Sampling | None = None) -> list[str]:
    """Chat responses of `model` to `prompts` (chat template, batched; greedy unless `sampling`)."""
    return generate_texts(model, tokenizer, chat_texts(tokenizer, prompts, system_prompt),
                          batch_size=batch_size, max_new_tokens=max_new_tokens,
                          repetition_penalty=repetition_penalty, progress=progress, sampling=sampling)
