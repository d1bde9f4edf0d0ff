"""Validation of safetensors headers and adapter_config.json: every malformed input is one short
UserError naming the file; suspicious-but-loadable adapters give a SuspiciousAdapterWarning."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import tiny_models
import torch
from cli_helpers import expect_error, run_cli

from mergesafe.checkpoint import (
    SuspiciousAdapterWarning,
    open_adapter,
    open_checkpoint,
    read_header,
    read_tensor,
    save_file,
)
from mergesafe.errors import UserError


def _one_line(err: UserError, path: Path) -> str:
    msg = str(err)
    assert msg.splitlines() == [msg] and len(msg) <= 500, msg
    assert str(path) in msg
    return msg


# ----------------------------------------------------------------------------- headers

def _st_file(tmp_path: Path, header, data: bytes = b"", *, raw: bytes | None = None,
             length: int | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "metadata not an object": ({"__metadata__": ["format", "pt"], "t": _entry()}, "__metadata__"),
    "metadata values not strings": ({"__metadata__": {"format": 1}, "t": _entry()}, "__metadata__"),
    "entry not an object": ({"t": [1, 2]}, "expected an object"),
    "entry a string": ({"t": "F32"}, "expected an object"),
    "dtype a list": ({"t": _entry(dtype=["F32"])}, "dtype"),
    "dtype unknown": ({"t": _entry(dtype="F33")}, "dtype"),
    "dtype missing": ({"t": {"shape": [2], "data_offsets": [0, 8]}}, "lacks 'dtype'"),
    "shape float": ({"t": _entry(shape=[2.0])}, "shape"),
    "shape bool": ({"t": _entry(shape=[True, True])}, "shape"),
    "shape string": ({"t": _entry(shape=["2"])}, "shape"),
    "shape negative": ({"t": _entry(shape=[-2])}, "shape"),
    "shape not a list": ({"t": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, "shape"),
    "shape nested": ({"t": _entry(shape=[[2]])}, "shape"),
    "shape of huge rank": ({"t": _entry(shape=[1] * 65, offsets=(0, 4))}, "shape"),
    "shape absurd": ({"t": _entry(shape=[2**40, 2**40], offsets=(0, 8))}, "absurd"),
    "shape absurd with a zero": ({"t": _entry(shape=[0, 2**62, 2**62], offsets=(0, 0))}, "absurd"),
    "shape that overflows int64": ({"t": _entry(shape=[2**64], offsets=(0, 2**66))}, "absurd"),
    "offsets floats": ({"t": _entry(offsets=(0.0, 8.0))}, "data_offsets"),
    "offsets strings": ({"t": _entry(offsets=("0", "8"))}, "data_offsets"),
    "offsets bools": ({"t": _entry(shape=[1], offsets=(False, True))}, "data_offsets"),
    "offsets three": ({"t": _entry(offsets=(0, 4, 8))}, "data_offsets"),
    "offsets reversed": ({"t": _entry(offsets=(8, 0))}, "data_offsets"),
    "offsets negative": ({"t": _entry(offsets=(-8, 0))}, "data_offsets"),
    "byte count wrong": ({"t": _entry(shape=[3])}, "12"),
    "past the end": ({"t": _entry(shape=[2**30], offsets=(0, 2**32))}, "truncated"),
    "header an array": ([1, 2], "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_header_is_a_user_error(case, tmp_path):
    header, fragment = BAD_HEADERS[case]
    path = _st_file(tmp_path, header, b"\0" * 8)
    with pytest.raises(UserError) as e:
        read_header(path)
    assert fragment in _one_line(e.value, path)


@pytest.mark.parametrize("raw, fragment", [
    (b'{"t": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', "Infinity"),
    (b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN"),
    (b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, -Infinity]}}', "Infinity"),
    (b'{"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}}', "shape"),
    (b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', "digits"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "t": {}}', "duplicate"),
    (b'{"t": 1', "corrupted"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"", "corrupted"),
])
def test_malformed_header_json_is_a_user_error(raw, fragment, tmp_path):
    path = _st_file(tmp_path, None, b"\0" * 8, raw=raw)
    with pytest.raises(UserError) as e:
        read_header(path)
    assert fragment in _one_line(e.value, path)


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 100 * 2**20 + 1, 10**6])
def test_lying_header_length_is_a_user_error(length, tmp_path):
    path = _st_file(tmp_path, {"t": _entry()}, b"\0" * 8, length=length)
    with pytest.raises(UserError) as e:
        read_header(path)
    assert "header length" in _one_line(e.value, path)


def test_long_names_are_cut_in_messages(tmp_path):
    path = _st_file(tmp_path, {"x" * 10_000 + "\n": _entry(dtype=7)}, b"\0" * 8)
    with pytest.raises(UserError) as e:
        read_header(path)
    assert len(_one_line(e.value, path)) < 300


def test_valid_headers_still_read(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "empty": torch.zeros(0, 5, dtype=torch.bfloat16), "s": torch.tensor(3, dtype=torch.int64)}
    save_file(tensors, path, metadata={"k": "v"})
    infos, meta = read_header(path)
    assert meta == {"format": "pt", "k": "v"}
    for name, t in tensors.items():
        assert torch.equal(read_tensor(infos[name]), t)


# ----------------------------------------------------------------------------- adapters

@pytest.fixture()
def adapter(tmp_path, tiny_lora):
    """A copy of the tiny LoRA adapter; ``edit(**fields)`` rewrites its adapter_config.json."""
    folder = tiny_models.copy_model(tiny_lora, tmp_path / "adapter")
    base_cfg = json.loads((folder / "adapter_config.json").read_text())

    def edit(raw: str | None = None, **fields) -> Path:
        cfg = dict(base_cfg)
        for key, value in fields.items():
            if value is _DELETE:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / "adapter_config.json").write_text(raw if raw is not None else json.dumps(cfg))
        return folder

    return edit


_DELETE = object()

BAD_CONFIGS = {
    "r a word": ({"r": "four"}, "r must be a positive integer"),
    "r zero": ({"r": 0}, "r must be a positive integer"),
    "r negative": ({"r": -4}, "r must be a positive integer"),
    "r float": ({"r": 4.5}, "r must be a positive integer"),
    "r bool": ({"r": True}, "r must be a positive integer"),
    "r null": ({"r": None}, "r must be a positive integer"),
    "alpha a word": ({"lora_alpha": "eight"}, "lora_alpha must be a finite number"),
    "alpha a list": ({"lora_alpha": [8]}, "lora_alpha must be a finite number"),
    "alpha infinite": ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    "alpha nan": ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    "alpha bool": ({"lora_alpha": False}, "lora_alpha must be a finite number"),
    "rslora a word": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    "fan_in_fan_out an int": ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
    "use_dora a string": ({"use_dora": "false"}, "use_dora must be true or false"),
    "rank_pattern a list": ({"rank_pattern": [["q_proj", 4]]}, "rank_pattern must be an object"),
    "rank_pattern a word": ({"rank_pattern": {"q_proj": "four"}}, "rank_pattern['q_proj']"),
    "rank_pattern zero": ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
    "rank_pattern bad regex": ({"rank_pattern": {"(": 4}}, "not a valid regular expression"),
    "alpha_pattern a string": ({"alpha_pattern": "q_proj=8"}, "alpha_pattern must be an object"),
    "alpha_pattern infinite": ({"alpha_pattern": {"q_proj": float("inf")}}, "finite number"),
    "target_modules a number": ({"target_modules": 5}, "target_modules must be a string or a list"),
    "target_modules mixed": ({"target_modules": ["q_proj", 1]}, "target_modules must be a string"),
    "target_modules bad regex": ({"target_modules": "q_proj("}, "not a valid regular expression"),
    "modules_to_save a string": ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
    "base model a number": ({"base_model_name_or_path": 5}, "base_model_name_or_path must be"),
    "peft_type a list": ({"peft_type": ["LORA"]}, "peft_type"),
    "peft_type missing": ({"peft_type": _DELETE}, "peft_type"),
    "long value": ({"r": "x" * 5000}, "r must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_ill_typed_adapter_config_is_a_user_error(case, adapter, tiny_pre):
    fields, fragment = BAD_CONFIGS[case]
    folder = adapter(**fields)
    with pytest.raises(UserError) as e:
        open_adapter(folder, tiny_pre)
    msg = _one_line(e.value, folder / "adapter_config.json")
    assert fragment in msg and len(msg) < 300


@pytest.mark.parametrize("raw", ["[" * 100_000 + "]" * 100_000, "[1, 2]", "{", "{'r': 4}"])
def test_broken_adapter_config_json_is_a_user_error(raw, adapter, tiny_pre):
    folder = adapter(raw=raw)
    with pytest.raises(UserError) as e:
        open_adapter(folder, tiny_pre)
    _one_line(e.value, folder / "adapter_config.json")


@pytest.mark.parametrize("name", ["x" * 300, "x/" * 3000])
def test_adapter_path_too_long_is_a_user_error(name, tmp_path, tiny_pre):
    with pytest.raises(UserError) as e:
        open_adapter(tmp_path / name, tiny_pre)
    msg = str(e.value)
    assert msg.splitlines() == [msg] and len(msg) < 300, msg


def test_rank_pattern_that_disagrees_with_the_weights(adapter, tiny_pre):
    folder = adapter(rank_pattern={"q_proj": 2})
    with pytest.raises(UserError, match=r"LoRA rank 4 does not match r=2"):
        open_adapter(folder, tiny_pre)


def _suspicious(folder: Path, base) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_adapter(folder, base)
    msgs = [str(w.message) for w in caught if issubclass(w.category, SuspiciousAdapterWarning)]
    for m in msgs:
        assert m.splitlines() == [m] and len(m) <= 500 and "adapter_config.json" in m, m
    return msgs


def test_good_adapters_do_not_warn(adapter, tiny_pre):
    pre_dir = Path(tiny_pre)
    for value in (str(pre_dir), str(pre_dir) + "/", "", None, f"some-org/{pre_dir.name}",
                  f"/elsewhere/on/another/machine/{pre_dir.name}"):
        assert _suspicious(adapter(base_model_name_or_path=value), tiny_pre) == [], value
    assert _suspicious(adapter(base_model_name_or_path=_DELETE), open_checkpoint(tiny_pre)) == []


def test_a_copy_of_the_base_does_not_warn(adapter, tiny_pre, tmp_path):
    copy = tiny_models.copy_model(tiny_pre, tmp_path / "copy_of_pre")
    assert _suspicious(adapter(base_model_name_or_path=str(tiny_pre)), copy) == []
    # target_modules as peft saves them: full names, short names, a regex
    for targets in (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    r".*\.(q|k|v|o|gate|up|down)_proj", "all-linear", None,
                    # a list written for several architectures: extra names match nothing in pre
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "query_key_value", "c_attn"]):
        assert _suspicious(adapter(target_modules=targets), tiny_pre) == [], targets


def test_zero_alpha_warns(adapter, tiny_pre):
    with pytest.warns(SuspiciousAdapterWarning, match="lora_alpha is 0 for every LoRA module"):
        view = open_adapter(adapter(lora_alpha=0), tiny_pre)
    name = next(iter(view.lora_modules))
    assert torch.equal(view.get(name), open_checkpoint(tiny_pre).get(name).float())
    with pytest.warns(SuspiciousAdapterWarning, match=r"lora_alpha is 0 for 2 of 14 LoRA modules"):
        open_adapter(adapter(alpha_pattern={"q_proj": 0}), tiny_pre)


def test_target_modules_that_do_not_match_the_weights_warn(adapter, tiny_pre):
    msgs = _suspicious(adapter(target_modules=["q_proj", "v_proj"]), tiny_pre)
    assert len(msgs) == 1 and "10 LoRA module(s)" in msgs[0] and "not in target_modules" in msgs[0]
    msgs = _suspicious(adapter(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                               "up_proj", "down_proj", "lm_head"]), tiny_pre)
    assert len(msgs) == 1 and "'lm_head'" in msgs[0] and "match no LoRA module" in msgs[0]
    msgs = _suspicious(adapter(target_modules="nope"), tiny_pre)
    assert len(msgs) == 1 and "14 LoRA module(s)" in msgs[0]


def test_other_base_model_warns(adapter, tiny_pre, tiny_post, tmp_path):
    for value in ("/tmp/no/such/llama", "meta-llama/Llama-2-7b-hf", str(tiny_post),
                  "~no-such-user/llama", "/" + "x" * 300, "./x\x00y", "x/" * 3000):
        msgs = _suspicious(adapter(base_model_name_or_path=value), tiny_pre)
        assert len(msgs) == 1 and "base_model_name_or_path" in msgs[0], value
    # the pre config's own _name_or_path counts as its name
    pre = tiny_models.copy_model(tiny_pre, tmp_path / "renamed")
    cfg = json.loads((pre / "config.json").read_text())
    (pre / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "org/tiny-llama"}))
    assert _suspicious(adapter(base_model_name_or_path="org/tiny-llama"), pre) == []


def test_hf_cache_layout_counts_as_the_hub_id(adapter, tiny_pre, tmp_path):
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_pre, snap)
    assert _suspicious(adapter(base_model_name_or_path="org/tiny"), snap) == []
    assert len(_suspicious(adapter(base_model_name_or_path="org/other"), snap)) == 1


# ----------------------------------------------------------------------------- command line

def test_cli_prints_adapter_problems_on_one_line(adapter, tiny_pre, tmp_path, capsys):
    folder = adapter(lora_alpha=0, base_model_name_or_path="org/other")
    code, _, err = run_cli(["merge", "--pre", tiny_pre, "--post", folder, "--method", "linear",
                            "--weight", 0.5, "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "adapter_config.json" in line]
    assert len(lines) == 2 and all(line.startswith("mergesafe: warning: ") for line in lines), err
    folder = adapter(r="four")
    expect_error(["merge", "--pre", tiny_pre, "--post", folder, "--method", "linear",
                  "--out", tmp_path / "out2"], capsys, "adapter_config.json", "r must be")
