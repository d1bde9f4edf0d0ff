"""Prompt building with the model's own chat template, and assistant-only labels.

Works for any chat template, with or without ``{% generation %}`` markers: for each assistant
turn ``i`` the conversation is rendered twice, ``messages[:i]`` with ``add_generation_prompt=True``
(the prompt a model sees before it answers) and ``messages[:i+1]``; the text between the two is
that turn's answer (its content and the end-of-turn token; trailing whitespace that the template
puts after the end-of-turn token is left to the prompt).  The rendered conversation is cut at
these character boundaries and each piece is tokenized on its own, so the prompt tokens are
exactly those a model gets at inference time, and the answer tokens are those it must generate.
Labels are the token ids on answer pieces and -100 everywhere else.

Plain-text rows (``text``) are tokenized as they are, with BOS if the tokenizer adds one and EOS
appended, and carry a label on every token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesafe.checkpoint.chat_template import (
    MAX_TEMPLATE_CHARS,
    chat_template_source,
    check_chat_template,
    describe_template_error,
)
from mergesafe.errors import UserError
from mergesafe.finetune.data import Example

log = logging.getLogger(__name__)
IGNORE = -100
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model")


def read_chat_template(path: str | Path) -> str:
    """A chat template from a Jinja file, or from a JSON file with a `chat_template` key."""
    path = Path(path)
    if not path.is_file():
        raise UserError("chat template file not found", path=path)
    size = path.stat().st_size
    if size > MAX_TEMPLATE_CHARS:
        raise UserError(f"chat template file too large ({size} bytes; at most {MAX_TEMPLATE_CHARS})",
                        path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("chat template file is not UTF-8 text", path=path) from None
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError("expected a JSON object with a 'chat_template' string", path=path) from None
    if not isinstance(text, str) or not text.strip():
        raise UserError("chat template file is empty", path=path)
    return text


def load_tokenizer(model: str | Path, chat_template: str | Path | None = None,
                   need_template: bool = True):
    """The model folder's tokenizer, with `chat_template` (a file) installed when given.

    When the template is needed, it is first rendered on a short probe conversation under time and
    memory bounds (:func:`mergesafe.checkpoint.chat_template.check_chat_template`): a template that
    fails, hangs or explodes is a `UserError` naming its file.
    """
    from mergesafe.checkpoint.hf_model import load_tokenizer as load_local_tokenizer

    model = Path(model)
    if not model.is_dir():
        raise UserError("model folder not found", path=model)
    if not any((model / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError("no tokenizer in the model folder (expected tokenizer.json or "
                        "tokenizer_config.json)", path=model)
    tok = load_local_tokenizer(model)  # no custom code (auto_map refused), one line on failure
    if chat_template is not None:
        tok.chat_template = read_chat_template(chat_template)
    if need_template and not tok.chat_template:
        raise UserError("the model has no chat template (tokenizer 'chat_template'); "
                        "pass one with --chat-template FILE", path=model)
    if need_template:
        check_chat_template(tok, chat_template if chat_template is not None else chat_template_source(tok))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _render(tok, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False,
                                   add_generation_prompt=generation_prompt)


def assistant_spans(tok, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its answers."""
    full = _render(tok, messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], True)
        upto = _render(tok, messages[: i + 1], False)
        if upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= cursor:
            answer = upto[len(prompt):]
            start, end = len(prompt), len(prompt) + len(answer.rstrip())
        else:
            # A template that rewrites earlier turns: find the content itself, and take the
            # end-of-turn token with it when it follows directly.
            start = full.find(msg["content"], cursor)
            if start < 0:
                raise ValueError("assistant content not found in the rendered conversation")
            end = start + len(msg["content"])
            eos = tok.eos_token or ""
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def encode_chat(tok, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside the answers."""
    full, spans = assistant_spans(tok, messages)
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans:
        prompt_ids = _encode(tok, full[pos:start])
        answer_ids = _encode(tok, full[start:end])
        ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + answer_ids
        pos = end
    tail = _encode(tok, full[pos:])
    ids += tail
    labels += [IGNORE] * len(tail)
    return ids, labels


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a plain text: BOS (if the tokenizer adds one) + text + EOS."""
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)
    return ids, list(ids)


@dataclass
class TokenizedSet:
    """Tokenized rows plus the counts that go into the log and the manifest."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0


def tokenize_examples(tok, examples: Sequence[Example], max_length: int, source: str) -> TokenizedSet:
    """Tokenize every example; rows longer than `max_length` are cut (and counted), rows left
    with nothing to learn after the cut are dropped (and counted)."""
    out = TokenizedSet()
    for ex in examples:
        try:
            ids, labels = encode_text(tok, ex.text) if ex.text is not None else encode_chat(tok, ex.messages)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a template that rejects the conversation
            raise UserError(f"{ex.where}: the chat template cannot render this conversation "
                            f"({describe_template_error(err)})", path=source) from None
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if not any(lab != IGNORE for lab in labels[1:]):
            out.dropped += 1
            continue
        out.rows.append({"input_ids": ids, "labels": labels})
        out.tokens += len(ids)
        out.label_tokens += sum(lab != IGNORE for lab in labels[1:])
    if out.truncated:
        log.warning("%d of %d rows longer than max_length=%d were truncated (%d left with no "
                    "answer tokens and dropped)", out.truncated, len(examples), max_length, out.dropped)
    return out


class PadCollator:
    """Right-pads a batch: pad id in `input_ids`, 0 in `attention_mask`, -100 in `labels`."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
