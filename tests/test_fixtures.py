"""The tiny test models are real Hugging Face checkpoints."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_pre_is_sharded_and_loads(tiny_pre):
    index = json.loads((tiny_pre / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pre))
    tok = AutoTokenizer.from_pretrained(str(tiny_pre))
    assert tok.chat_template and tok.eos_token == "<|end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model(**ids)
    assert out.logits.shape[-1] == len(tok)


def test_tiny_lora_loads_with_peft(tiny_pre, tiny_lora):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(tiny_pre))
    model = PeftModel.from_pretrained(base, str(tiny_lora))
    w = model.merge_and_unload().model.layers[0].self_attn.q_proj.weight
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_pre)).model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(w, ref)
