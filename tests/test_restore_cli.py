"""The safety-restoration methods of issue 7 on the command line and through the API, on tiny
models built at test time: output VALUES against the papers' formulas computed here by hand,
the manifests, bad input (exit 2, one line, nothing written), and `finetune --ema`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TrainerCallback

import tiny_models
from cli_helpers import expect_error, leftovers, run_cli
from mergesafe.checkpoint import open_adapter, open_checkpoint, read_manifest
from mergesafe.merge.engine import is_vocab_tensor, tensor_seed
from mergesafe.merge.methods import sparsify as sp

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESAFE_CACHE_DIR", str(tmp_path / "hash-cache"))


# ------------------------------------------------------------------ helpers


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {n: ck.get(n).float() for n in ck.names()}


def projector(w_pre: torch.Tensor, w_u: torch.Tensor) -> torch.Tensor:
    """Safe LoRA's C = V Vᵀ / ‖V‖_F, V = W_pre − W_U, by hand (float64)."""
    v = (w_pre - w_u).double()
    return v @ v.T / torch.linalg.matrix_norm(v)


def cosine(C: torch.Tensor, delta: torch.Tensor) -> float:
    p = (C @ delta.double()).reshape(-1)
    d = delta.double().reshape(-1)
    return float(p @ d / (p.norm() * d.norm()))


def r5(c: float) -> float:
    """The cosine as both reference codes compare it: numpy.round(cos, 5)."""
    return float(numpy.round(c, 5))


def is_layer(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and not is_vocab_tensor(name)


# ------------------------------------------------------------------ inputs built at test time

@pytest.fixture(scope="module")
def unaligned(tmp_path_factory, tiny_pre) -> Path:
    """The 'unaligned base' of pre: pre minus a random alignment update on every tensor."""
    return tiny_models.make_post(tiny_pre, tmp_path_factory.mktemp("unaligned") / "model", seed=21,
                                 scale=0.05)


@pytest.fixture(scope="module")
def safety_adapter(tmp_path_factory, tiny_pre) -> Path:
    return tiny_models.make_lora(tiny_pre, tmp_path_factory.mktemp("safety") / "adapter", seed=5)


@pytest.fixture(scope="module")
def harmful(tmp_path_factory, tiny_pre) -> Path:
    return tiny_models.make_post(tiny_pre, tmp_path_factory.mktemp("harmful") / "model", seed=31)


def lora_deltas(adapter: Path, pre: Path) -> dict[str, torch.Tensor]:
    view = open_adapter(adapter, open_checkpoint(pre))
    return {n: view.delta(n) for n in view.lora_modules}


# ------------------------------------------------------------------ Safe LoRA

def test_safe_lora_top_k_on_a_lora_post(tiny_pre, tiny_lora, unaligned, tmp_path, capsys):
    out = tmp_path / "safe"
    code, stdout, err = run_cli(["merge", "--method", "safe_lora", "--pre", tiny_pre, "--post",
                                 tiny_lora, "--unaligned", unaligned, "--param", "top_k=5",
                                 "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert str(out) in stdout
    pre, u, got = tensors(tiny_pre), tensors(unaligned), tensors(out)
    deltas = lora_deltas(tiny_lora, tiny_pre)
    cos = {n: cosine(projector(pre[n], u[n]), d) for n, d in deltas.items()}
    lowest = sorted(cos, key=lambda n: (r5(cos[n]), n))[:5]
    assert set(got) == set(pre)
    for name, t in got.items():
        if name in lowest:
            want = pre[name] + (projector(pre[name], u[name]) @ deltas[name].double()).float()
        elif name in deltas:
            want = pre[name] + deltas[name]
        else:
            want = pre[name]
        torch.testing.assert_close(t, want, **TOL, msg=name)
    m = read_manifest(out)
    assert m["method"] == "safe_lora" and m["kind"] == "merge"
    assert set(m["inputs"]) == {"pre", "post", "unaligned"}
    assert all(len(h) == 64 for h in m["inputs"]["unaligned"]["files"].values())
    info = m["safe_lora"]
    assert info["selection"] == {"top_k": 5} and info["selected"] == sorted(lowest)
    assert set(info["cosines"]) == set(deltas) and info["layers"] == len(deltas) == 14
    for n, c in cos.items():
        assert info["cosines"][n] == pytest.approx(c, abs=1e-6)
    assert info["zero_alignment"] == []
    # a normal model folder: config and tokenizer copied, loadable by transformers
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))


def test_safe_lora_threshold_on_a_full_post_through_the_api(tiny_pre, tiny_post, unaligned,
                                                            tmp_path):
    import mergesafe

    pre, u, post = tensors(tiny_pre), tensors(unaligned), tensors(tiny_post)
    deltas = {n: post[n] - pre[n] for n in pre if is_layer(n, pre[n])}
    cos = {n: cosine(projector(pre[n], u[n]), d) for n, d in deltas.items()}
    middle = sorted(cos, key=cos.get)[len(cos) // 2]
    threshold = r5(cos[middle])  # about half the layers below, one exactly at it
    out = mergesafe.merge(tiny_pre, tiny_post, tmp_path / "safe", method="safe_lora",
                          params={"threshold": threshold}, unaligned=unaligned)
    below = {n for n, c in cos.items() if r5(c) <= threshold}  # <= as the reference
    assert middle in below and 0 < len(below) < len(cos)
    got = tensors(out)
    for name, t in got.items():
        if name in below:
            want = pre[name] + (projector(pre[name], u[name]) @ deltas[name].double()).float()
        else:
            want = post[name]  # pre + ΔW: norms, embeddings and the layers above the threshold
        torch.testing.assert_close(t, want, **TOL, msg=name)
    info = read_manifest(out)["safe_lora"]
    assert info["selection"] == {"threshold": threshold} and set(info["selected"]) == below


ZERO_V = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def unaligned_zero_v(tmp_path_factory, tiny_pre, unaligned) -> Path:
    """`unaligned` with one LoRA-target layer equal to pre's: V = W_pre − W_U is zero there."""
    folder = tiny_models.copy_model(unaligned, tmp_path_factory.mktemp("zero_v") / "model")
    value = open_checkpoint(tiny_pre).get(ZERO_V)
    for f in folder.glob("*.safetensors"):
        sd = load_file(str(f))
        if ZERO_V in sd:
            sd[ZERO_V] = value.clone()
            save_file(sd, str(f), metadata={"format": "pt"})
    assert torch.equal(open_checkpoint(folder).get(ZERO_V), value)
    return folder


def test_safe_lora_never_projects_a_layer_without_alignment_change(tiny_pre, tiny_lora,
                                                                   unaligned_zero_v, tmp_path):
    import mergesafe

    pre, u = tensors(tiny_pre), tensors(unaligned_zero_v)
    deltas = lora_deltas(tiny_lora, tiny_pre)
    assert ZERO_V in deltas and torch.equal(pre[ZERO_V], u[ZERO_V])
    # top_k above the number of layers: every layer is projected but the zero-V one
    out = mergesafe.merge(tiny_pre, tiny_lora, tmp_path / "safe", method="safe_lora",
                          params={"top_k": 100}, unaligned=unaligned_zero_v)
    got = tensors(out)
    for name in deltas:
        if name == ZERO_V:
            want = pre[name] + deltas[name]  # kept: pre + ΔW, not C·ΔW = 0
        else:
            want = pre[name] + (projector(pre[name], u[name]) @ deltas[name].double()).float()
        torch.testing.assert_close(got[name], want, **TOL, msg=name)
    assert not torch.allclose(got[ZERO_V], pre[ZERO_V])
    info = read_manifest(out)["safe_lora"]
    assert info["cosines"][ZERO_V] is None and info["zero_alignment"] == [ZERO_V]
    assert set(info["selected"]) == set(deltas) - {ZERO_V} and info["layers"] == len(deltas)
    # a threshold above every cosine does not select it either
    out2 = mergesafe.merge(tiny_pre, tiny_lora, tmp_path / "safe2", method="safe_lora",
                           params={"threshold": 1.0}, unaligned=unaligned_zero_v)
    assert set(read_manifest(out2)["safe_lora"]["selected"]) == set(deltas) - {ZERO_V}
    torch.testing.assert_close(tensors(out2)[ZERO_V], pre[ZERO_V] + deltas[ZERO_V], **TOL)


# ------------------------------------------------------------------ SafeMERGE

def test_safemerge_blends_the_full_updates_below_the_threshold(tiny_pre, tiny_lora, unaligned,
                                                               safety_adapter, tmp_path, capsys):
    pre, u = tensors(tiny_pre), tensors(unaligned)
    task, safe = lora_deltas(tiny_lora, tiny_pre), lora_deltas(safety_adapter, tiny_pre)
    cos = {n: cosine(projector(pre[n], u[n]), d) for n, d in task.items()}
    middle = sorted(cos, key=cos.get)[len(cos) // 2]
    threshold = r5(cos[middle])
    out = tmp_path / "sm"
    code, _, err = run_cli(["merge", "--method", "safemerge", "--pre", tiny_pre, "--post", tiny_lora,
                            "--safety-adapter", safety_adapter, "--unaligned", unaligned,
                            "--param", f"threshold={threshold!r}", "--param", "task_weight=0.7",
                            "--param", "safety_weight=0.3", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    blended = {n for n, c in cos.items() if r5(c) < threshold}  # strict, as SafeMERGE's code
    assert middle not in blended and 0 < len(blended) < len(cos)
    for name, t in tensors(out).items():
        if name in blended:
            want = pre[name] + 0.7 * task[name] + 0.3 * safe[name]
        elif name in task:
            want = pre[name] + task[name]
        else:
            want = pre[name]
        torch.testing.assert_close(t, want, **TOL, msg=name)
    m = read_manifest(out)
    assert m["params"] == {"threshold": threshold, "task_weight": 0.7, "safety_weight": 0.3}
    assert set(m["safemerge"]["merged"]) == blended
    assert set(m["safemerge"]["cosines"]) == set(task)
    for n, c in cos.items():
        assert m["safemerge"]["cosines"][n] == pytest.approx(c, abs=1e-6)
    assert m["safemerge"]["zero_alignment"] == []
    assert set(m["inputs"]) == {"pre", "post", "unaligned", "safety_adapter"}


def test_safemerge_blends_a_layer_without_alignment_change(tiny_pre, tiny_lora, unaligned_zero_v,
                                                          safety_adapter, tmp_path):
    """SafeMERGE's code gives a zero V the projection C = 0, hence cosine 0 < threshold: the
    layer is blended (its cosine is recorded as null)."""
    import mergesafe

    pre = tensors(tiny_pre)
    task, safe = lora_deltas(tiny_lora, tiny_pre), lora_deltas(safety_adapter, tiny_pre)
    out = mergesafe.merge(tiny_pre, tiny_lora, tmp_path / "sm", method="safemerge",
                          params={"threshold": 0.0}, unaligned=unaligned_zero_v,
                          safety_adapter=safety_adapter)
    got = tensors(out)
    for name in task:  # threshold 0: no cosine is below it, the zero-V layer is blended
        want = (pre[name] + 0.8 * task[name] + 0.2 * safe[name] if name == ZERO_V
                else pre[name] + task[name])
        torch.testing.assert_close(got[name], want, **TOL, msg=name)
    info = read_manifest(out)["safemerge"]
    assert info["merged"] == [ZERO_V] and info["zero_alignment"] == [ZERO_V]
    assert info["cosines"][ZERO_V] is None and len(info["cosines"]) == len(task)


# ------------------------------------------------------------------ RESTA

def test_resta_adds_the_scaled_safety_vector(tiny_pre, tiny_post, harmful, tmp_path, capsys):
    out = tmp_path / "resta"
    code, _, err = run_cli(["merge", "--method", "resta", "--pre", tiny_pre, "--post", tiny_post,
                            "--harmful", harmful, "--param", "gamma=0.7", "--out", out, "--quiet"],
                           capsys)
    assert code == 0, err
    pre, post, harm = tensors(tiny_pre), tensors(tiny_post), tensors(harmful)
    for name, t in tensors(out).items():
        want = pre[name] + (post[name] - pre[name]) + 0.7 * (pre[name] - harm[name])
        torch.testing.assert_close(t, want, **TOL, msg=name)
    m = read_manifest(out)
    assert m["method"] == "resta" and m["params"] == {"gamma": 0.7, "density": None}
    assert set(m["inputs"]) == {"pre", "post", "harmful"}


def test_resta_with_dare_is_seeded_per_tensor(tiny_pre, tiny_lora, harmful, tmp_path, capsys):
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"r{i}"
        code, _, err = run_cli(["merge", "--method", "resta", "--pre", tiny_pre, "--post", tiny_lora,
                                "--harmful", harmful, "--param", "density=0.5", "--seed", seed,
                                "--out", out, "--quiet"], capsys)
        assert code == 0, err
        outs.append(tensors(out))
    pre, harm = tensors(tiny_pre), tensors(harmful)
    post = {n: t.float() for n, t in
            ((n, open_adapter(tiny_lora, open_checkpoint(tiny_pre)).get(n)) for n in pre)}
    q = "model.layers.0.self_attn.q_proj.weight"
    for name, t in outs[0].items():
        tau = post[name] - pre[name]
        gen = torch.Generator().manual_seed(tensor_seed(3, name))
        kept = sp.bernoulli(tau, 0.5, "density", gen)  # DARE: keep w.p. 0.5, divide by 0.5
        want = pre[name] + kept + 0.5 * (pre[name] - harm[name])
        torch.testing.assert_close(t, want, **TOL, msg=name)
        torch.testing.assert_close(outs[1][name], t, rtol=0, atol=0)  # same seed, same bits
    tau = post[q] - pre[q]
    kept = outs[0][q] - pre[q] - 0.5 * (pre[q] - harm[q])
    dropped = kept.abs() < 1e-7
    assert 0.3 < dropped.float().mean() < 0.7  # about half the entries were dropped
    torch.testing.assert_close(kept[~dropped], 2 * tau[~dropped], rtol=1e-4, atol=1e-6)
    assert not torch.equal(outs[2][q], outs[0][q])  # another seed, another mask


# ------------------------------------------------------------------ LoX (harden)

def lox_by_hand(w_pre: torch.Tensor, w_u: torch.Tensor, k: int, a: float) -> torch.Tensor:
    d = (w_pre - w_u).double()
    if d.dim() != 2 or k == 0 or k >= min(d.shape):
        return (w_pre.double() + a * d).float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (w_pre.double() + a * (u[:, :k] @ torch.diag(s[:k]) @ vh[:k])).float()


@pytest.mark.parametrize("rank", [2, 0])
def test_harden_is_the_lox_formula(rank, tiny_pre, unaligned, tmp_path, capsys):
    out = tmp_path / "hard"
    code, stdout, err = run_cli(["harden", "--pre", tiny_pre, "--unaligned", unaligned, "--rank",
                                 rank, "--coef", 0.5, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert str(out) in stdout
    pre, u, got = tensors(tiny_pre), tensors(unaligned), tensors(out)
    assert set(got) == set(pre)
    for name, t in got.items():
        torch.testing.assert_close(t, lox_by_hand(pre[name], u[name], rank, 0.5), rtol=1e-4,
                                   atol=2e-6, msg=name)
    q = "model.layers.1.mlp.down_proj.weight"
    if rank == 2:  # the change is exactly rank 2
        assert torch.linalg.matrix_rank(got[q] - pre[q], atol=1e-5) == 2
    m = read_manifest(out)
    assert m["kind"] == "harden" and m["method"] == "lox"
    assert m["params"] == {"rank": rank, "coef": 0.5}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    AutoModelForCausalLM.from_pretrained(str(out))


def test_harden_python_api(tiny_pre, unaligned, tmp_path):
    from mergesafe.restore.harden import harden

    out = harden(tiny_pre, unaligned, tmp_path / "h", rank=1, coef=-0.25, dtype="bfloat16")
    ck = open_checkpoint(out)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert ck.dtype(name) == torch.bfloat16
    pre, u = tensors(tiny_pre), tensors(unaligned)
    torch.testing.assert_close(ck.get(name).float(),
                               lox_by_hand(pre[name], u[name], 1, -0.25).bfloat16().float(),
                               rtol=8e-3, atol=1e-5)  # a bf16 rounding may flip


# ------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_pre, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    other_shape = tiny_models.make_llama(root / "wide", tiny_tokenizer, seed=3, intermediate=96)
    renamed = tiny_models.copy_model(tiny_pre, root / "renamed")
    for f in renamed.glob("*.safetensors"):
        sd = load_file(str(f))
        key = "model.layers.0.mlp.up_proj.weight"
        if key in sd:
            sd["model.layers.0.mlp.upper_proj.weight"] = sd.pop(key)
            save_file(sd, str(f), metadata={"format": "pt"})
            index = renamed / "model.safetensors.index.json"
            data = json.loads(index.read_text())
            data["weight_map"]["model.layers.0.mlp.upper_proj.weight"] = data["weight_map"].pop(key)
            index.write_text(json.dumps(data))
    return {"wide": other_shape, "renamed": renamed, "missing": root / "does-not-exist"}


BAD = [
    # (case, extra args, fragments of the one error line)
    ("no unaligned", ["--method", "safe_lora", "--post", "{lora}"], ["safe_lora needs --unaligned"]),
    ("no safety adapter", ["--method", "safemerge", "--post", "{lora}", "--unaligned", "{unaligned}"],
     ["safemerge needs --safety-adapter"]),
    ("no harmful", ["--method", "resta", "--post", "{post}"], ["resta needs --harmful"]),
    ("unknown param", ["--method", "safe_lora", "--post", "{lora}", "--unaligned", "{unaligned}",
                       "--param", "topk=3"],
     ["unknown parameter 'topk' for method safe_lora", "top_k, threshold"]),
    ("top_k and threshold", ["--method", "safe_lora", "--post", "{lora}", "--unaligned",
                             "{unaligned}", "--param", "top_k=3", "--param", "threshold=0.5"],
     ["top_k or --param threshold"]),
    ("bad top_k", ["--method", "safe_lora", "--post", "{lora}", "--unaligned", "{unaligned}",
                   "--param", "top_k=2.5"], ["'top_k'", "integer"]),
    ("bad density", ["--method", "resta", "--post", "{post}", "--harmful", "{harmful}",
                     "--param", "density=1.5"], ["'density'", "(0, 1]"]),
    ("shape mismatch", ["--method", "safe_lora", "--post", "{lora}", "--unaligned", "{wide}"],
     ["{wide}", "shape mismatch", "mlp"]),
    ("harmful with other names", ["--method", "resta", "--post", "{post}", "--harmful", "{renamed}"],
     ["{renamed}", "model.layers.0.mlp.up_proj.weight", "missing"]),
    ("missing harmful", ["--method", "resta", "--post", "{post}", "--harmful", "{missing}"],
     ["{missing}", "no such file"]),
    ("adapter as unaligned", ["--method", "safe_lora", "--post", "{lora}", "--unaligned", "{lora}"],
     ["{lora}", "--unaligned must be a full model"]),
    ("weight", ["--method", "resta", "--post", "{post}", "--harmful", "{harmful}", "--weight", "0.5"],
     ["resta has no --weight"]),
    ("extra input for linear", ["--method", "linear", "--post", "{post}", "--unaligned",
                                "{unaligned}"], ["--unaligned is only used by"]),
    ("extra input for resta", ["--method", "resta", "--post", "{post}", "--harmful", "{harmful}",
                               "--unaligned", "{unaligned}"], ["--unaligned is not used by resta"]),
    ("two posts", ["--method", "resta", "--post", "{post}", "--post", "{post}", "--harmful",
                   "{harmful}"], ["exactly one --post"]),
]


@pytest.mark.parametrize("case,extra,fragments", BAD, ids=[c[0] for c in BAD])
def test_bad_merge_input_exits_2_with_one_line_and_writes_nothing(
        case, extra, fragments, bad_inputs, tiny_pre, tiny_post, tiny_lora, unaligned, harmful,
        tmp_path, capsys):
    paths = {"lora": tiny_lora, "post": tiny_post, "unaligned": unaligned, "harmful": harmful,
             **bad_inputs}
    fill = lambda s: str(s).format(**{k: str(v) for k, v in paths.items()})  # noqa: E731
    out = tmp_path / "out"
    expect_error(["merge", "--pre", tiny_pre, *map(fill, extra), "--out", out, "--quiet"], capsys,
                 *map(fill, fragments))
    assert not out.exists() and leftovers(tmp_path) == []


BAD_HARDEN = [
    ("no unaligned", ["--rank", "1", "--coef", "1"], ["harden needs --unaligned"]),
    ("no rank", ["--unaligned", "{unaligned}", "--coef", "1"], ["harden needs --rank"]),
    ("negative rank", ["--unaligned", "{unaligned}", "--rank", "-1", "--coef", "1"], ["--rank", ">= 0"]),
    ("infinite coef", ["--unaligned", "{unaligned}", "--rank", "1", "--coef", "inf"], ["--coef", "finite"]),
    ("shape mismatch", ["--unaligned", "{wide}", "--rank", "1", "--coef", "1"],
     ["{wide}", "shape mismatch"]),
    ("adapter", ["--unaligned", "{lora}", "--rank", "1", "--coef", "1"], ["{lora}", "not a PEFT adapter"]),
]


@pytest.mark.parametrize("case,extra,fragments", BAD_HARDEN, ids=[c[0] for c in BAD_HARDEN])
def test_bad_harden_input(case, extra, fragments, bad_inputs, tiny_pre, tiny_lora, unaligned,
                          tmp_path, capsys):
    paths = {"lora": tiny_lora, "unaligned": unaligned, **bad_inputs}
    fill = lambda s: str(s).format(**{k: str(v) for k, v in paths.items()})  # noqa: E731
    out = tmp_path / "out"
    expect_error(["harden", "--pre", tiny_pre, *map(fill, extra), "--out", out, "--quiet"], capsys,
                 *map(fill, fragments))
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(tiny_pre, tiny_post, harmful, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["merge", "--method", "resta", "--pre", tiny_pre, "--post", tiny_post, "--harmful",
            harmful, "--out", out, "--quiet"]
    expect_error(args, capsys, str(out), "--overwrite")
    assert (out / "keep.txt").is_file()
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "mergesafe.json").is_file()


# ------------------------------------------------------------------ finetune --ema

ROWS = [{"prompt": f"What is the capital of {c}?", "response": f"The capital of {c} is {city}."}
        for c, city in [("Peru", "Lima"), ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome")]]
FAST = dict(learning_rate=1e-2, batch_size=4, progress=False, cpu_threads=1, val_size=0,
            warmup_ratio=0.0, logging_steps=1)


@pytest.fixture
def task(tmp_path) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in tensors(folder).items()}


def test_finetune_ema_zero_is_the_final_model_on_the_command_line(tiny_pre, task, tmp_path, capsys):
    out = tmp_path / "post"
    code, _, err = run_cli(["finetune", "--model", tiny_pre, "--data", task, "--out", out, "--full",
                            "--max-steps", 2, "--ema", 0.0, "--lr", 1e-2, "--warmup-ratio", 0,
                            "--val-size", 0, "--batch-size", 4, "--cpu-threads", 1,
                            "--no-progress"], capsys)
    assert code == 0, err
    assert "EMA model" in err
    final, ema = model_tensors(out), model_tensors(out / "ema")
    assert final.keys() == ema.keys()
    for k in final:
        torch.testing.assert_close(ema[k], final[k], rtol=0, atol=0)
    assert (out / "ema" / "config.json").is_file() and (out / "ema" / "tokenizer.json").is_file()
    m = json.loads((out / "mergesafe.json").read_text())
    assert m["config"]["ema"] == 0.0 and m["ema"] == {"beta": 0.0, "path": "ema", "steps": 2}
    assert json.loads((out / "ema" / "mergesafe.json").read_text())["ema"]["steps"] == 2
    assert not (tmp_path / "post.partial").exists()


def test_finetune_ema_recursion_over_two_steps_full(tiny_pre, task, tmp_path):
    import mergesafe

    out = mergesafe.finetune(tiny_pre, task, tmp_path / "post", lora=False, max_steps=2,
                             save_steps=1, ema=0.9, **FAST)
    pre = model_tensors(tiny_pre)
    step1 = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    ema1 = load_file(str(out / "checkpoint-1" / "ema_state.safetensors"))
    final, ema = model_tensors(out), model_tensors(out / "ema")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(final[q], pre[q])
    for k in pre:
        want1 = 0.9 * pre[k] + 0.1 * step1[k]  # θ̄_1 = β·θ_pre + (1−β)·θ_1
        torch.testing.assert_close(ema1[k], want1, **TOL, msg=k)
        torch.testing.assert_close(ema[k], 0.9 * want1 + 0.1 * final[k], **TOL, msg=k)


class _Capture(TrainerCallback):
    """The trained parameters at the start of training (peft's initial A and B = 0)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.init = {n.replace(".default", ""): p.detach().clone()
                     for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_ema_lora_is_an_adapter_of_the_averaged_factors(tiny_pre, task, tmp_path):
    import mergesafe

    cap = _Capture()
    out = mergesafe.finetune(tiny_pre, task, tmp_path / "post", max_steps=1, ema=0.75,
                             callbacks=[cap], **FAST)
    final = load_file(str(out / "adapter_model.safetensors"))
    ema = load_file(str(out / "ema" / "adapter_model.safetensors"))
    assert ema.keys() == final.keys() and set(final) == set(cap.init)
    assert (out / "ema" / "adapter_config.json").is_file()
    for k in final:
        torch.testing.assert_close(ema[k], 0.75 * cap.init[k] + 0.25 * final[k], **TOL, msg=k)
        if "lora_B" in k:
            assert not cap.init[k].any()  # B starts at 0, so B̄ = (1 − β)·B_1
    # the EMA adapter is usable by the merge engine like any adapter
    view = open_adapter(out / "ema", open_checkpoint(tiny_pre))
    assert len(view.lora_modules) == 14


def test_finetune_ema_with_merge_adapter_writes_full_weights(tiny_pre, task, tmp_path):
    import mergesafe

    out = mergesafe.finetune(tiny_pre, task, tmp_path / "post", max_steps=2, ema=0.0,
                             merge_adapter=True, **FAST)
    final, ema = model_tensors(out), model_tensors(out / "ema")
    assert final.keys() == ema.keys()
    for k in final:
        torch.testing.assert_close(ema[k], final[k], rtol=0, atol=1e-6, msg=k)
    assert (out / "ema" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "ema" / "mergesafe.json").read_text())["kind"] == "merged"
    assert not any(p.name.startswith(".") for p in out.iterdir())


class _Interrupt(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_finetune_ema_resumes_and_refuses_a_checkpoint_without_ema(tiny_pre, task, tmp_path):
    import mergesafe
    from mergesafe.errors import UserError

    opts = dict(lora=False, max_steps=3, save_steps=1, ema=0.8, **FAST)
    out = tmp_path / "post"
    with pytest.raises(KeyboardInterrupt):
        mergesafe.finetune(tiny_pre, task, out, callbacks=[_Interrupt(2)], **opts)
    assert (tmp_path / "post.partial" / "checkpoint-1" / "ema_state.safetensors").is_file()
    mergesafe.finetune(tiny_pre, task, out, resume=True, **opts)
    straight = mergesafe.finetune(tiny_pre, task, tmp_path / "straight", **opts)
    a, b = model_tensors(out / "ema"), model_tensors(straight / "ema")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)

    plain = tmp_path / "plain"
    no_ema = {**opts, "ema": None}
    with pytest.raises(KeyboardInterrupt):
        mergesafe.finetune(tiny_pre, task, plain, callbacks=[_Interrupt(2)], **no_ema)
    with pytest.raises(UserError, match="no EMA state"):
        mergesafe.finetune(tiny_pre, task, plain, resume=True, **opts)
    assert not plain.exists()


def test_finetune_ema_out_of_range_is_one_line(tiny_pre, task, tmp_path, capsys):
    out = tmp_path / "post"
    expect_error(["finetune", "--model", tiny_pre, "--data", task, "--out", out, "--ema", 1.5],
                 capsys, "ema")
    assert not out.exists() and not (tmp_path / "post.partial").exists()
