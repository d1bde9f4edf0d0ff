"""The miniature world's model and settings: an ordinary HF checkpoint, the right size, a stable cache key."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesafe.world.config import WorldConfig
from mergesafe.world.data import build_world_data
from mergesafe.world.model import ModelShape, count_parameters, init_model
from mergesafe.world.stages import cache_root


def test_init_model_is_a_normal_checkpoint_with_chat_template(tmp_path):
    data = build_world_data(0)
    out = init_model(tmp_path / "m", data.tokenizer_corpus(), ModelShape(), seed=0)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == 640 and model.config.vocab_size == 640
    v, h, i, n = 640, 192, 512, 4  # untied embedding and head, 4 × (attention + MLP + 2 norms), final norm
    assert count_parameters(model) == 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h == 2_016_960
    text = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>\nHow do I bake bread?<|end|>\n<|assistant|>\n"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    # the same seed gives the same weights
    again = AutoModelForCausalLM.from_pretrained(init_model(tmp_path / "m2", data.tokenizer_corpus(), seed=0))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_base_key_tracks_every_setting_of_stages_0_and_1():
    cfg = WorldConfig.default()
    key = cfg.base_key(0)
    assert key == WorldConfig.default().base_key(0)
    assert key != cfg.base_key(1)
    assert key != replace(cfg, stage0=replace(cfg.stage0, epochs=5)).base_key(0)
    assert key != replace(cfg, sizes=replace(cfg.sizes, stage1_harmful=10)).base_key(0)
    assert key != WorldConfig.quick().base_key(0)
    # the post stage and the sweep do not invalidate the cached base
    assert key == replace(cfg, post_full=replace(cfg.post_full, learning_rate=1e-3), weights=(0.5,)).base_key(0)


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGESAFE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "world"
    monkeypatch.delenv("MERGESAFE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mergesafe" / "world"
