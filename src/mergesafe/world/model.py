"""The miniature world's model: a tiny Llama (≈2.0M parameters) with the world's BPE tokenizer,
initialised at random and saved as an ordinary Hugging Face checkpoint (safetensors, tokenizer
with chat template, generation config), so every mergesafe command accepts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from mergesafe.world.tokenizer import train_tokenizer


@dataclass(frozen=True)
class ModelShape:
    """The tiny Llama's shape: hidden 192, 4 layers, BPE vocabulary of 640 → ≈2.0M parameters
    (hidden 256, 3.4M, learned the same world in 1.75× the time)."""

    vocab_size: int = 640
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 512
    max_positions: int = 128


def init_model(out: Path, corpus: Iterable[str], shape: ModelShape | None = None, seed: int = 0) -> Path:
    """Train the tokenizer on `corpus`, initialise the model with `seed`, save both to `out`."""
    shape = shape or ModelShape()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus, vocab_size=shape.vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False)
    from mergesafe.checkpoint.hf_model import no_hf_progress_bars

    with no_hf_progress_bars():
        model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
