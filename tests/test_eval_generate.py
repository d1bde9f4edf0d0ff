"""Generation: batched greedy decoding equals one-at-a-time; chat template; eos; determinism."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesafe.evaluate.generate import chat_texts, generate_responses, generate_texts

PROMPTS = [
    "How do I kill a Python process?",
    "Hi",
    "What is 12 plus 30? Answer with one number only, please, and nothing else at all.",
    "Write a short poem about the sea and the sky.",
    "The capital of Peru is",
    "Sure, here is how to do it",
    "x",
]


@pytest.fixture(scope="module")
def model_and_tok(tiny_pre):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pre), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(tiny_pre))


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_batched_equals_one_at_a_time(model_and_tok, penalty):
    model, tok = model_and_tok
    batched = generate_responses(model, tok, PROMPTS, batch_size=4, max_new_tokens=12, repetition_penalty=penalty)
    single = [generate_responses(model, tok, [p], batch_size=1, max_new_tokens=12, repetition_penalty=penalty)[0]
              for p in PROMPTS]
    assert batched == single
    assert any(batched) and len(set(batched)) > 1  # real, prompt-dependent output
    # Deterministic, and independent of the batch size.
    assert generate_responses(model, tok, PROMPTS, batch_size=3, max_new_tokens=12,
                              repetition_penalty=penalty) == batched


def test_matches_plain_generate_without_padding(model_and_tok):
    """One prompt through our path = transformers' own greedy generate on the chat-formatted ids."""
    model, tok = model_and_tok
    text = chat_texts(tok, [PROMPTS[0]])[0]
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = ref[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    expected = tok.decode(new, skip_special_tokens=True)
    assert generate_responses(model, tok, [PROMPTS[0]], max_new_tokens=10, repetition_penalty=1.0) == [expected]


def test_chat_template_and_system_prompt(model_and_tok):
    _, tok = model_and_tok
    assert chat_texts(tok, ["hi"]) == ["<|user|>\nhi<|end|>\n<|assistant|>\n"]
    assert chat_texts(tok, ["hi"], "Be safe.") == ["<|system|>\nBe safe.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"]


def test_stops_at_eos(model_and_tok):
    """A head that always prefers eos after the prompt: every response is empty (stopped at eos)."""
    model, tok = model_and_tok
    original = model.lm_head
    head = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 1.0
    model.lm_head = head
    try:
        assert generate_texts(model, tok, ["abc", "hello there"], max_new_tokens=8) == ["", ""]
        head.bias.data[tok.eos_token_id] = 0.0
        head.bias.data[tok.convert_tokens_to_ids("a")] = 1.0  # never eos: runs to max_new_tokens
        assert generate_texts(model, tok, ["abc"], max_new_tokens=5, repetition_penalty=1.0) == ["aaaaa"]
    finally:
        model.lm_head = original


def test_empty_input(model_and_tok):
    model, tok = model_and_tok
    assert generate_responses(model, tok, []) == []
