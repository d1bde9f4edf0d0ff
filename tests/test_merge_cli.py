"""`mergesafe merge` end to end on tiny models: streamed == in-memory, LoRA inputs and outputs,
bad input (exit 2, one line, nothing written), interruption, mergekit YAML configs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_models
from cli_helpers import leftovers, run_cli
from mergesafe.checkpoint import open_adapter, open_checkpoint, read_manifest
from mergesafe.merge.engine import merge_tensor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESAFE_CACHE_DIR", str(tmp_path / "hash-cache"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {n: ck.get(n) for n in ck.names()}


def save_state(folder: Path, sd: dict[str, torch.Tensor], like: Path, **config_changes) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    cfg = json.loads((like / "config.json").read_text())
    cfg.update(config_changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ------------------------------------------------------------------ streamed == in memory

METHOD_CASES = [
    ("linear", [], 0.3),
    ("task_arithmetic", ["lambda=0.8"], 0.4),
    ("slerp", [], 0.35),
    ("ties", ["density=0.5"], 0.6),
    ("dare_linear", ["density=0.6"], 0.5),
    ("dare_ties", ["density=0.6"], 0.5),
    ("breadcrumbs", ["density=0.7", "gamma=0.05"], 0.5),
    ("breadcrumbs_ties", ["density=0.7"], 0.5),
    ("della", ["density=0.6", "epsilon=0.1"], 0.5),
    ("della_linear", ["density=0.6"], 0.5),
]


@pytest.mark.parametrize("method,params,lam", METHOD_CASES)
def test_streamed_merge_equals_merge_tensor(method, params, lam, tiny_pre, tiny_post, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["merge", "--pre", tiny_pre, "--post", tiny_post, "--method", method, "--weight", lam,
            "--seed", 5, "--out", out, "--quiet"]
    for p in params:
        args += ["--param", p]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert str(out) in stdout
    pre, post, merged = tensors(tiny_pre), tensors(tiny_post), tensors(out)
    pdict = dict(p.split("=") for p in params)
    assert set(merged) == set(pre)
    for name, t in merged.items():
        ref = merge_tensor(method, name, pre[name], [post[name]], [lam], pdict, 5)
        assert t.dtype == pre[name].dtype
        assert torch.equal(t, ref), name  # bit for bit
    m = read_manifest(out)
    assert m["method"] == method and m["seed"] == 5 and m["params"]["weights"] == [lam]
    assert set(m["inputs"]) == {"pre", "post"}
    assert all(len(h) == 64 for h in m["inputs"]["post"]["files"].values())
    assert {"total_s", "merge_s"} <= set(m["timings"])


def test_model_stock_with_anchor_and_with_two_posts(tiny_pre, tiny_post, tiny_post2, tmp_path, capsys):
    pre, post, post2 = tensors(tiny_pre), tensors(tiny_post), tensors(tiny_post2)
    out = tmp_path / "a"
    code, _, err = run_cli(["merge", "--pre", tiny_post, "--post", tiny_post2, "--anchor", tiny_pre,
                            "--method", "model_stock", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    for name, t in tensors(out).items():
        assert torch.equal(t, merge_tensor("model_stock", name, post[name], [post2[name]], [0.5], {}, 0,
                                           anchor=pre[name]))
    out = tmp_path / "b"
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", tiny_post, "--post", tiny_post2,
                            "--method", "model_stock", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    for name, t in tensors(out).items():
        assert torch.equal(t, merge_tensor("model_stock", name, pre[name], [post[name], post2[name]],
                                           [0.5, 0.5], {}, 0))


def test_several_posts_with_weights_and_output_files(tiny_pre, tiny_post, tiny_post2, tmp_path, capsys):
    out = tmp_path / "m"
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", tiny_post, "--post", tiny_post2,
                            "--method", "ties", "--weight", 0.3, "--weight", 0.5,
                            "--param", "density=0.5", "--param", "density=0.8", "--dtype", "bfloat16",
                            "--shard-size", "40KB", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    pre, post, post2 = tensors(tiny_pre), tensors(tiny_post), tensors(tiny_post2)
    merged = tensors(out)
    for name, t in merged.items():
        ref = merge_tensor("ties", name, pre[name], [post[name], post2[name]], [0.3, 0.5],
                           {"density": [0.5, 0.8]}, 0)
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref.to(torch.bfloat16))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "mergesafe.json", "model.safetensors.index.json"} <= names
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model(**ids).logits.shape[-1] == len(tok)


def test_python_api(tiny_pre, tiny_post, tmp_path):
    import mergesafe

    out = mergesafe.merge(tiny_pre, tiny_post, tmp_path / "api", method="linear", weight=0.25)
    assert out == (tmp_path / "api").absolute()
    pre, post = tensors(tiny_pre), tensors(tiny_post)
    for name, t in tensors(out).items():
        assert torch.equal(t, merge_tensor("linear", name, pre[name], [post[name]], [0.25], {}, 0))
    from mergesafe.merge import merge as merge_fn  # the package is callable too
    merge_fn(tiny_pre, [tiny_post], tmp_path / "api2", weight=[0.25])
    assert all(torch.equal(a, b) for a, b in zip(tensors(out).values(),
                                                 tensors(tmp_path / "api2").values()))


# ------------------------------------------------------------------ special inputs

@pytest.fixture(scope="module")
def vocab_post(tmp_path_factory, tiny_pre) -> Path:
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("vocab") / "post"
    model = LlamaForCausalLM.from_pretrained(str(tiny_pre))
    tok = AutoTokenizer.from_pretrained(str(tiny_pre))
    tok.add_tokens(["<tool>", "</tool>", "<calc>"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_vocabulary_growth(tiny_pre, vocab_post, tmp_path, capsys):
    out = tmp_path / "v"
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", vocab_post, "--method", "ties",
                            "--param", "density=0.5", "--weight", 0.4, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert err.count("more vocabulary rows") == 1 and "warning" in err
    pre, post, merged = tensors(tiny_pre), tensors(vocab_post), tensors(out)
    emb = "model.embed_tokens.weight"
    n = pre[emb].shape[0]
    assert merged[emb].shape[0] == n + 3 and torch.equal(merged[emb][n:], post[emb][n:])
    assert torch.equal(merged[emb], merge_tensor("ties", emb, pre[emb], [post[emb]], [0.4],
                                                 {"density": 0.5}, 0))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == n + 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<calc>" in tok.get_vocab()
    AutoModelForCausalLM.from_pretrained(str(out))(torch.tensor([[1, 2, n + 2]]))


def test_tied_embeddings(tmp_path, tiny_tokenizer, capsys):
    pre = tiny_models.make_llama(tmp_path / "tpre", tiny_tokenizer, tie=True, seed=4)
    post = tiny_models.make_post(pre, tmp_path / "tpost", seed=5)
    out = tmp_path / "tout"
    code, _, err = run_cli(["merge", "--pre", pre, "--post", post, "--weight", 0.5, "--out", out,
                            "--quiet"], capsys)
    assert code == 0, err
    merged = tensors(out)
    assert "lm_head.weight" not in merged
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_bin_input_with_allow_pickle(tmp_path, tiny_pre, tiny_post, capsys):
    post = tmp_path / "binpost"
    post.mkdir()
    torch.save(tensors(tiny_post), post / "pytorch_model.bin")
    shutil.copy(tiny_post / "config.json", post)
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", post, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--allow-pickle" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", post, "--out", tmp_path / "y",
                            "--allow-pickle", "--quiet"], capsys)
    assert code == 0, err
    ref = tmp_path / "z"
    run_cli(["merge", "--pre", tiny_pre, "--post", tiny_post, "--out", ref, "--quiet"], capsys)
    for name, t in tensors(ref).items():
        assert torch.equal(t, tensors(tmp_path / "y")[name])


# ------------------------------------------------------------------ LoRA

def peft_merged_folder(pre: Path, adapter: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(pre)), str(adapter))
    model.merge_and_unload().save_pretrained(str(out))
    return out


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_lora_post_equals_peft_merged_post(method, tiny_pre, tiny_lora, tmp_path, capsys):
    full_post = peft_merged_folder(tiny_pre, tiny_lora, tmp_path / "peft_post")
    a, b = tmp_path / "from_adapter", tmp_path / "from_full"
    for post, out in ((tiny_lora, a), (full_post, b)):
        code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", post, "--method", method,
                                "--weight", 0.6, "--param" if method == "ties" else "--quiet",
                                *(["density=0.5", "--quiet"] if method == "ties" else []),
                                "--out", out], capsys)
        assert code == 0, err
    ta, tb = tensors(a), tensors(b)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert "adapter_of" in read_manifest(a)["inputs"]["post"]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_adapter_output_equals_full_merge(method, tmp_path, tiny_pre, capsys):
    adapter = tiny_models.make_lora(tiny_pre, tmp_path / "lora", use_rslora=True,
                                    modules_to_save=["lm_head"])
    full, small = tmp_path / "full", tmp_path / "adapter_out"
    for fmt, out in (("full", full), ("adapter", small)):
        code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", adapter, "--method", method,
                                "--weight", 0.4, "--out-format", fmt, "--out", out, "--quiet"], capsys)
        assert code == 0, err
    assert (small / "adapter_model.safetensors").is_file() and not list(small.glob("model*.safetensors"))
    view = open_adapter(small, tiny_pre)
    ref = tensors(full)
    for name in ref:
        torch.testing.assert_close(view.get(name).float(), ref[name], atol=1e-6, rtol=0)
    # and with peft itself
    peft_full = tensors(peft_merged_folder(tiny_pre, small, tmp_path / "peft"))
    for name in ref:
        torch.testing.assert_close(peft_full[name], ref[name], atol=1e-6, rtol=0)
    assert read_manifest(small)["output"]["format"] == "peft-lora-adapter"


def test_adapter_output_is_refused_where_it_cannot_be_exact(tiny_pre, tiny_post, tiny_lora, tmp_path,
                                                            capsys):
    for post, method in ((tiny_lora, "ties"), (tiny_post, "linear")):
        out = tmp_path / f"x_{method}"
        code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", post, "--method", method,
                                "--out-format", "adapter", "--out", out], capsys)
        assert code == 2 and "--out-format adapter" in err and not out.exists()


# ------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_pre, tiny_post, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    post_sd = tensors(tiny_post)
    out = {}
    out["empty"] = root / "empty"
    out["empty"].mkdir()
    sd = dict(post_sd)
    del sd["model.layers.1.mlp.up_proj.weight"]
    out["missing_tensor"] = save_state(root / "missing_tensor", sd, tiny_post)
    sd = dict(post_sd)
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    out["shape"] = save_state(root / "shape", sd, tiny_post)
    out["model_type"] = save_state(root / "model_type", post_sd, tiny_post, model_type="mistral")
    out["layers"] = tiny_models.make_llama(root / "layers", tiny_tokenizer, layers=3)
    out["truncated"] = tiny_models.copy_model(tiny_post, root / "truncated")
    shard = sorted(out["truncated"].glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    out["header"] = tiny_models.copy_model(tiny_post, root / "header")
    shard = sorted(out["header"].glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    wide = tiny_models.make_llama(root / "wide", tiny_tokenizer, hidden=32, heads=2, kv_heads=1)
    out["adapter"] = tiny_models.make_lora(wide, root / "wide_lora")
    return out


BAD_CASES = [
    # (name, extra args or post key, expected text in the error line)
    ("missing path", {"post": "/nonexistent/model"}, "no such file"),
    ("no weights", {"post": "empty"}, "no model weights"),
    ("tensor missing", {"post": "missing_tensor"}, "model.layers.1.mlp.up_proj.weight"),
    ("shape mismatch", {"post": "shape"}, "model.layers.0.mlp.down_proj.weight"),
    ("model_type", {"post": "model_type"}, "architectures differ"),
    ("layer count", {"post": "layers"}, "number of layers"),
    ("truncated", {"post": "truncated"}, "truncated"),
    ("bad header", {"post": "header"}, "corrupted"),
    ("adapter does not fit", {"post": "adapter"}, "does not fit pre"),
    ("unknown method", {"args": ["--method", "frankenmerge"]}, "unknown merge method"),
    ("unknown parameter", {"args": ["--method", "ties", "--param", "temperature=2"]}, "unknown parameter"),
    ("density range", {"args": ["--method", "ties", "--param", "density=1.5"]}, "(0, 1]"),
    ("density zero", {"args": ["--method", "dare_ties", "--param", "density=0"]}, "(0, 1]"),
    ("param syntax", {"args": ["--param", "density"]}, "NAME=VALUE"),
    ("bad dtype", {"args": ["--dtype", "int8"]}, "dtype"),
]


@pytest.mark.parametrize("case,spec,text", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, spec, text, bad_inputs, tiny_pre,
                                                            tiny_post, tmp_path, capsys):
    post = spec.get("post", tiny_post)
    post = bad_inputs.get(post, post) if isinstance(post, str) else post
    out = tmp_path / "out"
    code, stdout, err = run_cli(["merge", "--pre", tiny_pre, "--post", post, "--out", out, "--quiet",
                                 *spec.get("args", [])], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergesafe: error: "), err
    assert text in lines[0]
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []
    if "post" in spec and spec["post"] in bad_inputs and case not in ("unknown method",):
        assert str(bad_inputs[spec["post"]]) in lines[0]  # names the file


def test_existing_output_is_refused_unless_overwrite(tiny_pre, tiny_post, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", tiny_post, "--out", out], capsys)
    assert code == 2 and "not empty" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", tiny_post, "--out", out,
                            "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "mergesafe.json").exists()
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", tiny_post, "--out", tiny_post,
                            "--overwrite"], capsys)
    assert code == 2 and "input" in err


def test_interrupted_merge_leaves_no_partial_output(tiny_pre, tiny_post, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import signal, sys, time
        # a shell runs background jobs with SIGINT ignored; Python then never raises
        # KeyboardInterrupt: give the child the handler a terminal user has
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from mergesafe.checkpoint import safetensors_io
        real = safetensors_io.StreamingShardWriter.write_part
        def slow(self, name, tensor, **kw):
            real(self, name, tensor, **kw)
            print("wrote", name, flush=True)
            time.sleep(0.5)
        safetensors_io.StreamingShardWriter.write_part = slow
        from mergesafe.cli.main import main
        main(["merge", "--pre", {str(tiny_pre)!r}, "--post", {str(tiny_post)!r},
              "--out", {str(out)!r}, "--quiet"])
    """)
    for sig in (signal.SIGTERM, signal.SIGINT):
        env = {**__import__("os").environ, "MERGESAFE_CACHE_DIR": str(tmp_path / "c")}
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = proc.stdout.readline()
        assert line.startswith("wrote"), proc.stderr.read()
        assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # work in progress exists
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (130, 143), err
        assert "interrupted" in err and "Traceback" not in err
        assert not out.exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------ mergekit YAML

def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_config_linear_equals_pair_merge(tiny_pre, tiny_post, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yml", {
        "merge_method": "linear",
        "models": [{"model": str(tiny_pre), "parameters": {"weight": 0.7}},
                   {"model": str(tiny_post), "parameters": {"weight": 0.3}}],
        "dtype": "float32",
    })
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["merge", "--config", cfg, "--out", a, "--quiet"], capsys)[0] == 0
    assert run_cli(["merge", "--pre", tiny_pre, "--post", tiny_post, "--weight", 0.3, "--out", b,
                    "--quiet"], capsys)[0] == 0
    ta, tb = tensors(a), tensors(b)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    assert read_manifest(a)["config"]["merge_method"] == "linear"


def test_config_gradients_and_filters(tiny_pre, tiny_post, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "g.yml", {
        "merge_method": "task_arithmetic", "base_model": str(tiny_pre),
        "models": [{"model": str(tiny_post),
                    "parameters": {"weight": [{"filter": "self_attn", "value": [0.0, 1.0]},
                                              {"value": 0.5}]}}],
        "out_dtype": "bfloat16",
    })
    out = tmp_path / "g"
    code, _, err = run_cli(["merge", "--config", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    pre, post, merged = tensors(tiny_pre), tensors(tiny_post), tensors(out)
    for name, t in merged.items():
        if "self_attn" in name:
            w = 0.0 if ".layers.0." in name else 1.0  # 2 layers: t = 0, 1
        else:
            w = 0.5
        ref = merge_tensor("task_arithmetic", name, pre[name], [post[name]], [w], {}, 0)
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref.to(torch.bfloat16)), name


def test_config_lora_reference_and_relative_paths(tiny_pre, tiny_lora, tmp_path, capsys):
    shutil.copytree(tiny_pre, tmp_path / "pre")
    shutil.copytree(tiny_lora, tmp_path / "lora")
    cfg = write_yaml(tmp_path / "l.yml", {
        "merge_method": "task_arithmetic", "base_model": "pre",
        "models": [{"model": "pre+lora", "parameters": {"weight": 0.5}}],
    })
    out = tmp_path / "l"
    code, _, err = run_cli(["merge", "--config", cfg, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    ref = tmp_path / "ref"
    run_cli(["merge", "--pre", tiny_pre, "--post", tiny_lora, "--method", "task_arithmetic",
             "--weight", 0.5, "--out", ref, "--quiet"], capsys)
    a, b = tensors(out), tensors(ref)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("data,text", [
    ({"slices": [], "merge_method": "linear"}, "slices"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "tokenizer": {"source": "union"}},
     "tokenizer"),
    ({"merge_method": "ties", "models": [{"model": "M", "parameters": {"weight": 1, "temp": 2}}],
      "base_model": "M"}, "unknown parameter 'temp'"),
    ({"merge_method": "nope", "models": [{"model": "M"}]}, "unknown merge method"),
    ({"merge_method": "ties", "models": [{"model": "M", "parameters": {"weight": 1}}]}, "base_model"),
    ({"merge_method": "task_arithmetic", "base_model": "M",
      "models": [{"model": "M"}, {"model": "P"}]}, "weight"),
])
def test_bad_configs(data, text, tiny_pre, tiny_post, tmp_path, capsys):
    def subst(v):
        if isinstance(v, dict):
            return {k: subst(x) for k, x in v.items()}
        if isinstance(v, list):
            return [subst(x) for x in v]
        return {"M": str(tiny_pre), "P": str(tiny_post)}.get(v, v) if isinstance(v, str) else v
    cfg = write_yaml(tmp_path / "bad.yml", subst(data))
    out = tmp_path / "o"
    code, _, err = run_cli(["merge", "--config", cfg, "--out", out], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and text in err
    assert not out.exists()


def test_config_cannot_be_combined_with_pair_options(tiny_pre, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yml", {"merge_method": "linear", "models": [{"model": str(tiny_pre)}]})
    code, _, err = run_cli(["merge", "--config", cfg, "--pre", tiny_pre, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--pre" in err


# ------------------------------------------------------------------ pipeline details

@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("pipeline", [{}, {"MERGESAFE_NO_PREFETCH": "1", "MERGESAFE_SYNC_WRITE": "1"}])
def test_row_blocks_give_identical_tensors(method, pipeline, tiny_pre, tiny_post, tmp_path,
                                           monkeypatch):
    """Elementwise merges stream big tensors in row blocks: same bits as whole tensors."""
    import mergesafe.stream.tensor_map as stream
    from mergesafe.merge.api import merge

    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 1000)
    for k, v in pipeline.items():
        monkeypatch.setenv(k, v)
    plan_items = []
    real = stream._work_items
    monkeypatch.setattr(stream, "_work_items", lambda *a: plan_items.extend(real(*a)) or plan_items)
    out = merge(tiny_pre, tiny_post, tmp_path / "o", method=method, weight=0.35, dtype="bfloat16",
                shard_size="30KB")
    assert any(rows is not None for _, rows in plan_items)
    pre, post = tensors(tiny_pre), tensors(tiny_post)
    for name, t in tensors(out).items():
        ref = merge_tensor(method, name, pre[name], [post[name]], [0.35], {}, 0)
        assert torch.equal(t, ref.to(torch.bfloat16)), name


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3, "rescale": True}), ("dare_ties", {"density": 0.5}),
    ("della", {"density": 0.5}), ("slerp", {}), ("breadcrumbs", {"density": 0.5, "rescale": True}),
])
def test_merge_tensor_does_not_depend_on_thread_count(method, params):
    """The sweep merges in a process with many threads, the stream with few: same bits."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(700, 1100, generator=gen)
    post = pre + 0.1 * torch.randn(700, 1100, generator=gen)
    post2 = pre + 0.1 * torch.randn(700, 1100, generator=gen)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            results.append(merge_tensor(method, "w", pre, [post], [0.4], params, 3))
            results.append(merge_tensor("model_stock", "w", pre, [post, post2], [0.5, 0.5], {}, 3))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


def test_half_precision_inputs_read_in_blocks(tiny_pre, tiny_post, tmp_path, monkeypatch):
    """Big bf16 inputs are converted to float32 block by block; big results are written one at
    a time: same bits as merge_tensor on the float32 values."""
    import mergesafe.stream.tensor_map as stream
    from mergesafe.merge.api import merge

    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(stream, "PREFETCH_ELEMENTS", 5000)
    folders = {}
    for label, src in (("pre", tiny_pre), ("post", tiny_post)):
        folders[label] = save_state(tmp_path / label, {k: v.bfloat16() for k, v in tensors(src).items()},
                                    src, dtype="bfloat16")
    out = merge(folders["pre"], folders["post"], tmp_path / "o", method="ties", weight=0.7,
                params={"density": 0.4})
    pre, post = tensors(folders["pre"]), tensors(folders["post"])
    for name, t in tensors(out).items():
        ref = merge_tensor("ties", name, pre[name].float(), [post[name].float()], [0.7],
                           {"density": 0.4}, 0)
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref.bfloat16()), name
