"""Prompt building and assistant-only labels, token by token, for templates with and without
`{% generation %}` markers; data loading and format detection."""

from __future__ import annotations

import csv
import json

import pytest
from transformers import AutoTokenizer

from mergesafe.errors import UserError
from mergesafe.finetune.data import load_examples
from mergesafe.finetune.tokenize import (IGNORE, PadCollator, encode_chat, encode_text,
                                         load_tokenizer, tokenize_examples)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "The answer is 42."},
    {"role": "user", "content": "And the capital of Peru?"},
    {"role": "assistant", "content": "The capital of Peru is Lima."},
]

# Llama-3's template (no generation markers), with the tiny tokenizer's end token.
LLAMA3_LIKE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_labels_match_the_generation_mask_token_by_token(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    ids, labels = encode_chat(tok, CONVERSATION)
    oracle = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert ids == oracle["input_ids"]
    assert sum(oracle["assistant_masks"]) > 10
    for i, (tid, lab, m) in enumerate(zip(ids, labels, oracle["assistant_masks"], strict=True)):
        assert lab == (tid if m else IGNORE), f"token {i} ({tok.decode([tid])!r})"
    answer = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert answer == "The answer is 42.<|end|>The capital of Peru is Lima.<|end|>"


def test_labels_without_generation_markers(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    tok.chat_template = LLAMA3_LIKE
    msgs = CONVERSATION[1:3]
    ids, labels = encode_chat(tok, msgs)
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = tok("The answer is 42.<|end|>", add_special_tokens=False)["input_ids"]
    # prompt tokens are exactly the inference-time prompt, then the answer, all labelled
    assert ids[:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[n_prompt:] == answer_ids
    assert labels == [IGNORE] * n_prompt + answer_ids
    assert tok.decode(ids[:n_prompt]).endswith("<|end_header_id|>\n\n")


def test_text_rows_learn_every_token(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    ids, labels = encode_text(tok, "The capital of Peru is Lima.")
    assert ids == labels and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "The capital of Peru is Lima.<|end|>"


def test_truncation_is_counted_and_empty_rows_dropped(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    loaded = load_examples([
        {"prompt": "hi", "response": "The capital of Peru is Lima."},
        {"prompt": "What is 12 plus 30? " * 10, "response": "42"},   # answer cut off entirely
        {"text": "The capital of France is Paris. " * 5},
    ])
    ts = tokenize_examples(tok, loaded.examples, max_length=30, source="<data>")
    full = [len(encode_chat(tok, ex.messages)[0]) if ex.messages else len(encode_text(tok, ex.text)[0])
            for ex in loaded.examples]
    assert full[0] <= 30 < min(full[1:])
    assert (ts.truncated, ts.dropped, len(ts.rows)) == (2, 1, 2)
    assert all(len(r["input_ids"]) <= 30 for r in ts.rows)


def test_collator_pads_right_with_ignored_labels():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_formats_are_detected_per_row_and_system_prompt_added(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "c", "response": "d"},
        {"question": "e", "answer": "f"},
        {"instruction": "g", "input": "h", "output": "i"},
        {"instruction": "j", "input": "", "output": "k"},
        {"text": "plain"},
    ]
    loaded = load_examples(rows, system_prompt="SYS")
    assert loaded.formats == {"chat": 1, "prompt_response": 2, "alpaca": 2, "text": 1}
    users = [ex.messages[1]["content"] for ex in loaded.examples[:5]]
    assert users == ["a", "c", "e", "g\n\nh", "j"]
    assert all(ex.messages[0] == {"role": "system", "content": "SYS"} for ex in loaded.examples[:5])
    assert loaded.examples[5].text == "plain"

    # the same rows from JSON, CSV and a datasets folder
    (tmp_path / "d.json").write_text(json.dumps(rows[1:3]))
    assert load_examples(tmp_path / "d.json").formats == {"prompt_response": 2}
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows[3:5])
    assert [ex.messages[-1]["content"] for ex in load_examples(tmp_path / "d.csv").examples] == ["i", "k"]
    import datasets

    datasets.Dataset.from_list(rows[1:2] * 3).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(tmp_path / "ds").formats == {"prompt_response": 3}


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"foo": 1, "bar": 2}], "auto", "no recognisable columns (found: foo, bar; expected: messages"),
    ([{"prompt": "x", "response": "  "}], "auto", "row 1: empty response"),
    ([{"prompt": "x", "response": "y"}], "chat", "row 1: no recognisable columns"),
    ([{"messages": [{"role": "user", "content": "x"}]}], "auto", "row 1: no assistant message"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}],
     "auto", "row 1: empty response"),
    ([{"instruction": "x", "output": ""}], "auto", "row 1: empty response"),
    ([], "auto", "no rows"),
])
def test_bad_rows(rows, fmt, message):
    with pytest.raises(UserError) as err:
        load_examples(rows, fmt)
    assert message in str(err.value)


def test_chat_template_file_is_installed(tiny_tokenizer, tmp_path):
    (tmp_path / "t.jinja").write_text(LLAMA3_LIKE)
    tok = load_tokenizer(tiny_tokenizer, chat_template=tmp_path / "t.jinja")
    assert tok.chat_template == LLAMA3_LIKE
    raw = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    assert raw.chat_template != LLAMA3_LIKE
