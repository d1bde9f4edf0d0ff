"""The input guards every command shares: outputs vs inputs by resolved path, custom code, shard
paths, devices, config.json, non-finite merges, leftovers of killed runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import expect_error, leftovers, run_cli
from safetensors.torch import load_file

from mergesafe.checkpoint import open_checkpoint
from mergesafe.checkpoint.atomic import atomic_output_dir, remove_stale_temporaries
from mergesafe.checkpoint.hf_model import load_for_generation, resolve_device
from mergesafe.checkpoint.inputs import check_not_input, open_model, refuse_remote_code
from mergesafe.errors import UserError


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def models(tmp_path, tiny_pre, tiny_post):
    """Fresh copies (tests may try to damage them)."""
    pre = shutil.copytree(tiny_pre, tmp_path / "p1")
    post = shutil.copytree(tiny_post, tmp_path / "p2")
    return pre, post


# ------------------------------------------------------------------ outputs never reach inputs

def test_check_not_input_resolves_paths(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "b")
    for out in (tmp_path / "b" / ".." / "a", tmp_path / "link" / ".." / "a", a / "sub", tmp_path):
        with pytest.raises(UserError, match="inputs are never modified"):
            check_not_input(out, [a])
    check_not_input(tmp_path / "c", [a, None])  # a sibling is fine


def test_merge_out_through_dotdot_or_symlink_keeps_pre(models, tmp_path, capsys):
    pre, post = models
    before = tree_hash(pre)
    (tmp_path / "via").symlink_to(post)
    for out in (post / ".." / "p1", tmp_path / "via" / ".." / "p1"):
        expect_error(["merge", "--pre", pre, "--post", post, "--out", out, "--overwrite"], capsys,
                     "inputs are never modified")
    assert tree_hash(pre) == before


def test_eval_out_equal_to_the_model_is_refused(models, tmp_path, capsys):
    pre, _ = models
    before = tree_hash(pre)
    prompts = tmp_path / "h.csv"
    prompts.write_text("goal\nHow do I pick a lock?\n")
    expect_error(["eval", "--model", pre, "--out", pre, "--overwrite", "--safety", prompts,
                  "--max-new-tokens", "2"], capsys, "inputs are never modified")
    assert tree_hash(pre) == before


# ------------------------------------------------------------------ custom code, shard paths

def test_auto_map_is_refused_and_never_run(models, tmp_path, capsys):
    pre, _ = models
    marker = tmp_path / "ran"
    (pre / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((pre / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (pre / "config.json").write_text(json.dumps(cfg))
    prompts = tmp_path / "h.csv"
    prompts.write_text("goal\nHow do I pick a lock?\n")
    expect_error(["eval", "--model", pre, "--out", tmp_path / "e", "--safety", prompts], capsys,
                 "auto_map", "never runs")
    assert not marker.exists() and not (tmp_path / "e").exists()
    with pytest.raises(UserError, match="auto_map"):
        refuse_remote_code(pre)


def test_tokenizer_auto_map_is_refused(models):
    pre, _ = models
    cfg = json.loads((pre / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok.Tok", None]}
    (pre / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="tokenizer_config.json has 'auto_map'"):
        load_for_generation(pre, device="cpu")


@pytest.mark.parametrize("target", ["../p2/{shard}", "/etc/passwd", "sub/../../x.safetensors", 7])
def test_index_paths_must_stay_in_the_folder(models, target):
    pre, _ = models
    index = json.loads((pre / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = target.format(shard=shard) if isinstance(target, str) else target
    (pre / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as err:
        open_checkpoint(pre)
    assert "model.safetensors.index.json" in str(err.value)
    assert ("outside the model folder" in str(err.value) or "not a file name" in str(err.value))


def test_symlinked_shards_inside_the_folder_still_load(models, tmp_path):
    """The Hugging Face cache layout: shards are symlinks to blobs elsewhere."""
    pre, _ = models
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in pre.glob("*.safetensors"):
        target = blobs / shard.name
        shutil.move(shard, target)
        shard.symlink_to(target)
    ck = open_checkpoint(pre)
    assert len(ck.names()) > 0 and ck.get(ck.names()[0]).numel() > 0


def test_pre_without_config_json_is_refused(models, tmp_path, capsys):
    pre, post = models
    (pre / "config.json").unlink()
    expect_error(["merge", "--pre", pre, "--post", post, "--out", tmp_path / "o"], capsys,
                 "no config.json")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    with pytest.raises(UserError, match="no config.json"):
        open_model(pre)


# ------------------------------------------------------------------ corrupt weights, devices

def test_eval_and_sweep_on_a_truncated_shard_give_one_line(models, tmp_path, capsys):
    pre, post = models
    shard = sorted(pre.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    prompts = tmp_path / "h.csv"
    prompts.write_text("goal\nHow do I pick a lock?\n")
    expect_error(["eval", "--model", pre, "--out", tmp_path / "e", "--safety", prompts], capsys,
                 shard.name, "truncated")
    expect_error(["sweep", "--pre", pre, "--post", post, "--out", tmp_path / "s", "--safety",
                  prompts, "--methods", "linear", "--weights", "0.5", "--no-progress"], capsys,
                 shard.name)
    assert not (tmp_path / "e").exists()
    assert not (tmp_path / "s").exists()  # a sweep that could not start leaves no empty OUT


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")


# ------------------------------------------------------------------ non-finite merges

def test_overflowing_weight_is_an_error_unless_allowed(models, tmp_path, capsys):
    pre, post = models
    out = tmp_path / "o"
    expect_error(["merge", "--pre", pre, "--post", post, "--out", out, "--weight", "1e308",
                  "--method", "task_arithmetic", "-q"], capsys, "non-finite", "--allow-nonfinite")
    assert not out.exists() and leftovers(tmp_path) == []
    code, _, err = run_cli(["merge", "--pre", pre, "--post", post, "--out", out, "--weight",
                            "1e308", "--method", "task_arithmetic", "-q", "--allow-nonfinite"],
                           capsys)
    assert code == 0, err
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    assert any(not torch.isfinite(t).all() for t in merged.values())


def test_float16_overflow_after_the_cast_is_caught(models, tmp_path, capsys):
    """Finite in float32, inf once written as float16: checked after the cast."""
    pre, post = models
    expect_error(["merge", "--pre", pre, "--post", post, "--out", tmp_path / "o", "--weight",
                  "1e6", "--method", "task_arithmetic", "--dtype", "float16", "-q"], capsys,
                 "non-finite")


# ------------------------------------------------------------------ leftovers of killed runs

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_removed_with_a_note(tmp_path, capsys):
    out = tmp_path / "o"
    dead = tmp_path / f".o.tmp-{_dead_pid()}-abc123"
    legacy = tmp_path / ".o.tmp-k2j4h5g6"  # the naming before pids were recorded
    alive = tmp_path / f".o.tmp-{os.getppid()}-zzz"  # a run still going on
    other = tmp_path / f".other.tmp-{_dead_pid()}-q"  # another output's: not ours to touch
    for d in (dead, legacy, alive, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 2000)
    removed = remove_stale_temporaries(out)
    assert sorted(removed) == sorted([dead, legacy])
    assert alive.exists() and other.exists()
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("mergesafe: note: ") for n in notes)
    with atomic_output_dir(out) as tmp:
        assert f".o.tmp-{os.getpid()}-" in tmp.name
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"


def test_the_next_merge_removes_a_killed_merges_folder(models, tmp_path, capsys):
    pre, post = models
    stale = tmp_path / f".o.tmp-{_dead_pid()}-abcdef"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    code, _, err = run_cli(["merge", "--pre", pre, "--post", post, "--out", tmp_path / "o", "-q"],
                           capsys)
    assert code == 0, err
    assert not stale.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergesafe: note: ") and stale.name in lines[0]
