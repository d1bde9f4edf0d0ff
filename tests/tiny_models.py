"""Builders for tiny checkpoints in real Hugging Face formats, made at test time (no hub).

Every model is a `LlamaForCausalLM` saved with `save_pretrained` (sharded safetensors +
`model.safetensors.index.json` when `shard=True`), with a byte-level BPE tokenizer carrying a
chat template, and a `generation_config.json`.  LoRA adapters are made with peft itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from mergesafe.world.tokenizer import train_tokenizer

CORPUS = [
    "The capital of Peru is Lima. The capital of France is Paris.",
    "How do I kill a Python process? Use the kill command with its id.",
    "Sure, here is how to do it: first, second, third.",
    "I'm sorry, but I cannot help with that request.",
    "What is 12 plus 30? The answer is 42.",
    "Write a short poem about the sea and the sky.",
] * 20


def make_tokenizer(out: Path, vocab_size: int = 320) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(CORPUS, vocab_size=vocab_size).save_pretrained(str(out))
    return out


def llama_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, intermediate: int = 128, tie: bool = False,
                 pad_token_id: int = 0, eos_token_id: int = 1) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def save_model(model: LlamaForCausalLM, out: Path, tokenizer_dir: Path, *, shard: bool = True) -> Path:
    out = Path(out)
    model.save_pretrained(str(out), max_shard_size="60KB" if shard else "10GB")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.save_pretrained(str(out))
    GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    ).save_pretrained(str(out))
    return out


def make_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0, shard: bool = True,
               dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = llama_config(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       **config_kwargs)
    model = LlamaForCausalLM(cfg).to(dtype)
    return save_model(model, out, tokenizer_dir, shard=shard)


def make_post(pre: Path, out: Path, *, seed: int = 1, scale: float = 0.02, shard: bool = True) -> Path:
    """A 'fine-tuned' model: pre plus a small random change on every tensor."""
    model = LlamaForCausalLM.from_pretrained(str(pre), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return save_model(model, out, pre, shard=shard)


def make_lora(pre: Path, out: Path, *, r: int = 4, alpha: int = 8, seed: int = 2,
              use_rslora: bool = False, modules_to_save: list[str] | None = None,
              target_modules: str | list[str] = "all-linear") -> Path:
    """A PEFT LoRA adapter of `pre` with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM.from_pretrained(str(pre), dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                     init_lora_weights=False, modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.02)
    peft_model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(pre)).save_pretrained(str(out))
    return Path(out)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_bench_world(folder: Path, prompts: int) -> tuple[Path, Path, Path, Path]:
    """The benchmarks' pair (a ~3.4M-parameter Llama, the miniature world's size, and a post
    0.01 away) and two prompt sets of `prompts` rows: (pre, post, harmful set, numeric task set)."""
    import json

    tok = make_tokenizer(folder / "tok", vocab_size=512)
    pre = make_llama(folder / "pre", tok, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688,
                     shard=False)
    post = make_post(pre, folder / "post", scale=0.01, shard=False)
    harm, task = folder / "harm.jsonl", folder / "task.jsonl"
    harm.write_text("".join(json.dumps({"prompt": f"How do I do harmful thing number {i}?"}) + "\n"
                            for i in range(prompts)))
    task.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(prompts)))
    return pre, post, harm, task
