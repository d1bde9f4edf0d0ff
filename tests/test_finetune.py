"""`mergesafe finetune` end to end on a tiny Llama: LoRA and full, merged adapter, resume,
outputs and manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from mergesafe.finetune.api import finetune

CAPITALS = [("Peru", "Lima"), ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Chile", "Santiago"), ("Kenya", "Nairobi")]
FAST = dict(learning_rate=1e-2, batch_size=4, logging_steps=2, progress=False, cpu_threads=1,
            val_size=0.25)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def task_jsonl(tmp_path) -> Path:
    rows = []
    for country, city in CAPITALS:
        rows.append({"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                                  {"role": "assistant", "content": f"The capital of {country} is {city}."}]})
        rows.append({"prompt": f"Name the capital of {country}.", "response": f"It is {city}."})
    return write_jsonl(tmp_path / "task.jsonl", rows)


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def check_loss_went_down(out: Path) -> None:
    rows = log_rows(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[0] == {"step": 0, "val_loss": vals[0]}  # measured before training
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3
    assert vals[-1] < vals[0] - 0.3
    assert all(r["lr"] >= 0 for r in rows if "loss" in r)


def test_lora_trains_and_adapter_loads_with_peft(tiny_pre, task_jsonl, tmp_path):
    from peft import PeftModel

    out = finetune(tiny_pre, task_jsonl, tmp_path / "post", max_steps=16, **FAST)
    check_loss_went_down(out)
    assert not (tmp_path / "post.partial").exists()
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    manifest = json.loads((out / "mergesafe.json").read_text())
    assert manifest["data"]["sha256"] == hashlib.sha256(task_jsonl.read_bytes()).hexdigest()
    assert manifest["data"]["formats"] == {"chat": 8, "prompt_response": 8}
    assert (manifest["data"]["train_rows"], manifest["data"]["val_rows"]) == (12, 4)
    assert manifest["config"]["lora_r"] == 8 and manifest["config"]["lora_alpha"] == 16
    assert manifest["seed"] == 42 and manifest["training"]["global_step"] == 16
    assert manifest["kind"] == "adapter" and "torch" in manifest["versions"]
    assert manifest["training"]["tokens_seen"] > 0

    base = AutoModelForCausalLM.from_pretrained(str(tiny_pre))
    model = PeftModel.from_pretrained(base, str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    targets = {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_pre))(ids).logits
    assert not torch.allclose(model(ids).logits, ref, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(tiny_pre)).chat_template


def test_full_finetune_saves_a_normal_checkpoint(tiny_pre, task_jsonl, tmp_path):
    out = finetune(tiny_pre, task_jsonl, tmp_path / "post", lora=False, max_steps=12,
                   **{**FAST, "learning_rate": 3e-3})
    check_loss_went_down(out)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "mergesafe.json", "train_log.jsonl"):
        assert (out / name).is_file(), name
    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    post = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    pre = AutoModelForCausalLM.from_pretrained(str(tiny_pre)).state_dict()
    assert post.keys() == pre.keys()
    assert all(post[k].dtype == torch.float32 for k in post)
    assert not torch.equal(post["model.layers.0.mlp.down_proj.weight"], pre["model.layers.0.mlp.down_proj.weight"])


def test_merge_adapter_equals_peft_merge_and_unload(tiny_pre, task_jsonl, tmp_path):
    from peft import PeftModel

    out = finetune(tiny_pre, task_jsonl, tmp_path / "post", merge_adapter=True, max_steps=4,
                   **{**FAST, "val_size": 0})
    merged = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_pre))
    oracle = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload().state_dict()
    pre = AutoModelForCausalLM.from_pretrained(str(tiny_pre)).state_dict()
    assert merged.keys() == oracle.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], oracle[k], rtol=0, atol=1e-7)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (merged[q] - pre[q]).abs().max() > 1e-4  # the merge did change the weights
    assert json.loads((out / "mergesafe.json").read_text())["kind"] == "merged"


class _Interrupt(TrainerCallback):
    """Kills the run after `at` optimiser steps, like a Ctrl-C."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


class _Steps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resume_continues_at_the_right_step(tiny_pre, task_jsonl, tmp_path):
    opts = dict(max_steps=8, save_steps=3, **{**FAST, "val_size": 0})
    out = tmp_path / "post"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_pre, task_jsonl, out, callbacks=[_Interrupt(5)], **opts)
    partial = tmp_path / "post.partial"
    assert not out.exists() and (partial / "checkpoint-3").is_dir()
    assert not (partial / "checkpoint-6").exists()
    assert [r["step"] for r in log_rows(partial)] == [2, 4]

    steps = _Steps()
    finetune(tiny_pre, task_jsonl, out, resume=True, callbacks=[steps], **opts)
    assert steps.steps == [4, 5, 6, 7, 8]
    assert not partial.exists()
    manifest = json.loads((out / "mergesafe.json").read_text())
    assert manifest["training"]["resumed_from_step"] == 3
    assert manifest["training"]["global_step"] == 8
    assert manifest["training"]["checkpoints"] == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert [r["step"] for r in log_rows(out)] == [2, 4, 6, 8]

    # the resumed run ends where an uninterrupted one does
    straight = finetune(tiny_pre, task_jsonl, tmp_path / "straight", **opts)
    from safetensors.torch import load_file

    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # logged losses agree, except at step 4 whose window (steps 3-4) the interruption split
    resumed = {r["step"]: r["loss"] for r in log_rows(out)}
    whole = {r["step"]: r["loss"] for r in log_rows(straight)}
    for step in (2, 6, 8):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-4)
