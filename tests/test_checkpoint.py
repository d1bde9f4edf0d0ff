"""checkpoint/: lazy readers, LoRA adapters, the streaming writer, atomic folders, manifests."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from mergesafe.checkpoint import (
    BackgroundHasher,
    OutEntry,
    StreamingShardWriter,
    atomic_output_dir,
    describe_input,
    open_adapter,
    open_checkpoint,
    parse_size,
    read_manifest,
    sha256_file,
    write_manifest,
)
from mergesafe.checkpoint.safetensors_io import plan_shards, read_header
from mergesafe.errors import UserError


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESAFE_CACHE_DIR", str(tmp_path / "cache"))


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()


# ----------------------------------------------------------------------------- reading

def test_sharded_checkpoint_reads_lazily_and_matches_transformers(tiny_pre):
    ck = open_checkpoint(tiny_pre)
    assert len(ck.weight_files()) >= 2
    sd = _state(tiny_pre)
    assert set(ck.names()) == set(sd)
    for name in ck.names():
        assert ck.shape(name) == tuple(sd[name].shape)
        assert ck.dtype(name) == sd[name].dtype
        assert torch.equal(ck.get(name), sd[name])
    assert ck.config["model_type"] == "llama" and ck.dir == tiny_pre.absolute()
    assert {p.name for p in ck.files()} >= {"config.json", "model.safetensors.index.json",
                                              "tokenizer.json"}


def test_single_file_and_tied_embeddings(tmp_path, tiny_tokenizer):
    folder = tiny_models.make_llama(tmp_path / "tied", tiny_tokenizer, shard=False, tie=True)
    assert (folder / "model.safetensors").is_file()
    ck = open_checkpoint(folder)
    assert "lm_head.weight" not in ck.names() and ck.tied
    assert "lm_head.weight" in ck
    assert torch.equal(ck.get("lm_head.weight"), ck.get("model.embed_tokens.weight"))
    assert ck.shape("lm_head.weight") == ck.shape("model.embed_tokens.weight")


def test_bin_weights_need_allow_pickle(tmp_path, tiny_pre):
    folder = tmp_path / "binmodel"
    folder.mkdir()
    sd = {n: open_checkpoint(tiny_pre).get(n) for n in open_checkpoint(tiny_pre).names()}
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text((tiny_pre / "config.json").read_text())
    with pytest.raises(UserError, match="allow-pickle"):
        open_checkpoint(folder)
    ck = open_checkpoint(folder, allow_pickle=True)
    assert ck.kind == "bin"
    for n, t in sd.items():
        assert torch.equal(ck.get(n), t)


def test_folder_without_weights_and_missing_path(tmp_path, tiny_lora):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model weights found") as e:
        open_checkpoint(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="adapter"):
        open_checkpoint(tiny_lora)


def _corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    tiny_models.copy_model(src, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        data = data[: len(data) - 100]
    elif how == "header":
        data[8:20] = b"not json!!!!"
    elif how == "length":
        data[0:8] = (10**9).to_bytes(8, "little")
    elif how == "extra":
        data += b"\0" * 16
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how", ["truncate", "header", "length", "extra"])
def test_corrupted_safetensors_are_refused_naming_the_file(tmp_path, tiny_pre, how):
    shard = _corrupt_copy(tiny_pre, tmp_path / "bad", how)
    with pytest.raises(UserError) as e:
        open_checkpoint(tmp_path / "bad")
    assert str(shard) in str(e.value)
    assert any(w in str(e.value) for w in ("corrupted", "truncated"))


# ----------------------------------------------------------------------------- adapters

def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return model.merge_and_unload().state_dict()


def test_adapter_view_equals_peft_merge_and_unload(tiny_pre, tiny_lora):
    view = open_adapter(tiny_lora, open_checkpoint(tiny_pre))
    ref = _peft_merged(tiny_pre, tiny_lora)
    assert view.lora_modules and set(view.names()) == set(ref)
    for name in view.names():
        assert torch.equal(view.get(name).float(), ref[name]), name


def test_adapter_rslora_and_modules_to_save(tmp_path, tiny_pre):
    adapter = tiny_models.make_lora(tiny_pre, tmp_path / "rs", r=4, alpha=8, use_rslora=True,
                                    modules_to_save=["lm_head"])
    view = open_adapter(adapter, tiny_pre)
    assert set(view.saved_modules) == {"lm_head.weight"}
    lm = next(iter(view.lora_modules.values()))
    assert lm.scale == pytest.approx(8 / 2.0)  # alpha / sqrt(r)
    ref = _peft_merged(tiny_pre, adapter)
    for name in view.names():
        assert torch.equal(view.get(name).float(), ref[name]), name


def test_adapter_that_does_not_fit_is_refused(tmp_path, tiny_pre, tiny_lora, tiny_tokenizer):
    other = tiny_models.make_llama(tmp_path / "wide", tiny_tokenizer, hidden=32, heads=2, kv_heads=1)
    with pytest.raises(UserError, match="does not fit pre"):
        open_adapter(tiny_lora, open_checkpoint(other))
    bad = tiny_models.copy_model(tiny_lora, tmp_path / "dora")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="DoRA"):
        open_adapter(bad, tiny_pre)


# ----------------------------------------------------------------------------- writing

def test_plan_shards_respects_size_and_order():
    entries = [OutEntry(f"t{i}", (10,), torch.float32) for i in range(5)]
    shards = plan_shards(entries, 100)
    assert [len(s) for s in shards] == [2, 2, 1]
    assert [e.name for s in shards for e in s] == [f"t{i}" for i in range(5)]
    big = plan_shards([OutEntry("big", (1000,), torch.float32)], 100)
    assert len(big) == 1


def test_streaming_writer_round_trip_and_transformers_load(tmp_path, tiny_pre):
    ck = open_checkpoint(tiny_pre)
    entries = [OutEntry(n, ck.shape(n), torch.bfloat16 if "layers.1" in n else ck.dtype(n))
               for n in ck.names()]
    out = tmp_path / "out"
    out.mkdir()
    w = StreamingShardWriter(out, entries, max_shard_size=30_000)
    for name in w.order:
        w.write(name, ck.get(name).to(w._planned[name].dtype))
    files = w.close()
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ck.names())
    for f in files:  # readable by the safetensors library itself
        tensors = load_file(out / f)
        for n, t in tensors.items():
            assert torch.equal(t, ck.get(n).to(t.dtype))
    (out / "config.json").write_text((tiny_pre / "config.json").read_text())
    sd = _state(out)
    for n in ck.names():
        assert torch.equal(sd[n].float(), ck.get(n).to(w._planned[n].dtype).float())


def test_writer_single_file_and_checks(tmp_path):
    out = tmp_path / "one"
    out.mkdir()
    w = StreamingShardWriter(out, [OutEntry("a", (2, 3), torch.float32),
                                   OutEntry("b", (), torch.float16)], 10**9)
    with pytest.raises(RuntimeError, match="expected tensor"):
        w.write("b", torch.zeros((), dtype=torch.float16))
    w.write("a", torch.arange(6.0).reshape(2, 3))
    with pytest.raises(RuntimeError, match="planned"):
        w.write("b", torch.zeros(1, dtype=torch.float16))
    w.write("b", torch.tensor(1.5, dtype=torch.float16))
    assert w.close() == ["model.safetensors"]
    back = load_file(out / "model.safetensors")
    assert torch.equal(back["a"], torch.arange(6.0).reshape(2, 3)) and back["b"].item() == 1.5
    infos, meta = read_header(out / "model.safetensors")
    assert meta == {"format": "pt"} and infos["a"].offset % 8 == 0


def test_reader_accepts_files_written_by_the_safetensors_library(tmp_path):
    tensors = {"x": torch.randn(3, 4), "y": torch.randint(0, 5, (7,)), "z": torch.randn(2).bfloat16()}
    folder = tmp_path / "lib"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    ck = open_checkpoint(folder)
    for n, t in tensors.items():
        assert torch.equal(ck.get(n), t)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000
    with pytest.raises(UserError):
        parse_size("lots")


# ----------------------------------------------------------------------------- atomic folders

def test_atomic_output_dir_success_and_failure(tmp_path):
    out = tmp_path / "result"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "a.txt").write_text("1")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(UserError, match="not empty"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "failed") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "failed").exists()
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "interrupted") as tmp:
            (tmp / "partial").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "c.txt").write_text("3")
    assert (empty / "c.txt").exists()


def test_sigterm_inside_atomic_output_dir_leaves_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mergesafe.checkpoint import atomic_output_dir
        with atomic_output_dir(Path({str(tmp_path / 'out')!r})) as tmp:
            (tmp / "partial").write_text("x")
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- manifests

def test_sha256_and_manifest(tmp_path, tiny_pre):
    f = tiny_pre / "config.json"
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_file(f) == sha256_file(f, cache=False)  # cache hit is the same digest
    rec = describe_input(tiny_pre)
    assert rec["files"]["config.json"] == sha256_file(f)
    hashes = BackgroundHasher([f]).result()
    assert hashes[f.absolute()] == sha256_file(f)
    out = tmp_path / "m"
    out.mkdir()
    write_manifest(out, kind="test", inputs={"pre": tiny_pre, "data": f}, method="linear",
                   params={"weight": 0.5}, seed=3, timings={"total_s": 1.23456})
    m = read_manifest(out)
    assert m["kind"] == "test" and m["seed"] == 3 and m["method"] == "linear"
    assert m["inputs"]["data"]["sha256"] == sha256_file(f)
    assert {"mergesafe", "torch", "transformers", "safetensors"} <= set(m["versions"])
    assert m["timings"]["total_s"] == 1.2346


def test_hash_cache_notices_changes(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"a" * 1000)
    first = sha256_file(f)
    time.sleep(0.01)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(time.time_ns(), time.time_ns()))
    assert sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest() != first
