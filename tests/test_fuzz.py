"""Fuzz tests (Hypothesis) for every parser of user input.

Targets: the safetensors header parser (``read_header``), the shard index (``open_checkpoint`` on a
folder with a generated ``model.safetensors.index.json``), ``adapter_config.json`` (``open_adapter``
on the tiny base model), mergekit YAML (``build_config_plan``) and prompt files
(``load_prompt_file``).  The property is the same for all of them: the call succeeds or raises
:class:`UserError`, never any other exception, and every ``UserError`` message is one line of at
most ``MAX_MESSAGE`` characters.  (The index target also checks that a checkpoint that opens reads
no shard outside its folder; the adapter target checks that every ``SuspiciousAdapterWarning`` is
one short line as well.)

Bounds: the cases run in a subprocess (this file run as a script) whose address space is limited
to what it holds after start-up plus 1 GiB (``RLIMIT_AS``), whose peak resident memory must stay
under 1 GiB, and where every case has ``CASE_SECONDS`` (an interval timer plus Hypothesis'
``deadline``).  Reproducible: ``derandomize=True``, no example database (``database=None``),
Hypothesis' storage directory in a temporary folder, never in the repository.

``test_fuzz_fast`` runs a few dozen cases per target (seconds); ``test_fuzz_slow`` (marked
``slow``) runs ``SLOW`` cases, at least 10,000 in total.  To run one target by hand::

    python tests/test_fuzz.py --pre PRE --lora LORA --workspace /tmp/ws --out /tmp/r.json yaml=200
"""

from __future__ import annotations

import argparse
import collections
import csv
import importlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mergesafe.merge.registry import METHODS

TARGETS = ("header", "index", "adapter", "yaml", "prompts")
FAST = {"header": 60, "index": 30, "adapter": 30, "yaml": 40, "prompts": 40}
SLOW = {"header": 2500, "index": 1500, "adapter": 2000, "yaml": 2000, "prompts": 2000}
SLOW_TOTAL = 10_000
MAX_MESSAGE = 500
CASE_SECONDS = 10
EXTRA_MEMORY = 1 << 30  # address space a case may add on top of the started runner
MAX_RSS = 1 << 30  # peak resident memory of the whole runner
assert sum(SLOW.values()) >= SLOW_TOTAL


# =============================================================================================
# pytest side: run the targets in a bounded subprocess, one check per target
# =============================================================================================

def _run_fuzz(counts: dict[str, int], workspace: Path, pre: Path, lora: Path,
              timeout: float) -> dict:
    out = workspace / "results.json"
    env = dict(os.environ, HYPOTHESIS_STORAGE_DIRECTORY=str(workspace / ".hypothesis"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--workspace", str(workspace),
           "--pre", str(pre), "--lora", str(lora), "--out", str(out),
           *(f"{t}={n}" for t, n in counts.items())]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        died = None if proc.returncode == 0 else (
            f"fuzz runner exited {proc.returncode}: {(proc.stderr or '')[-3000:]}")
    except subprocess.TimeoutExpired as err:
        died = f"fuzz runner timed out after {timeout:.0f} s: {str(err.stderr or '')[-2000:]}"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["_seconds"] = time.monotonic() - start
    for target in counts:
        results.setdefault(target, {"ok": False, "cases": 0, "error": died or "no result"})
    return results


def _check(results: dict, target: str, wanted: int) -> None:
    res = results[target]
    assert res["ok"], f"fuzz target {target!r} failed after {res['cases']} cases:\n{res['error']}"
    assert res["cases"] >= wanted, res
    assert res["maxrss"] <= MAX_RSS, f"{target}: peak RSS {res['maxrss'] / 2**20:.0f} MiB"
    assert res["slowest"] <= CASE_SECONDS, res


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory, tiny_pre, tiny_lora) -> dict:
    return _run_fuzz(FAST, tmp_path_factory.mktemp("fuzz_fast"), tiny_pre, tiny_lora, timeout=600)


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory, tiny_pre, tiny_lora) -> dict:
    return _run_fuzz(SLOW, tmp_path_factory.mktemp("fuzz_slow"), tiny_pre, tiny_lora, timeout=900)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_fast(target, fast_results):
    _check(fast_results, target, FAST[target])


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_slow(target, slow_results):
    _check(slow_results, target, SLOW[target])


@pytest.mark.slow
def test_fuzz_slow_runs_at_least_10000_cases(slow_results):
    total = sum(slow_results[t]["cases"] for t in TARGETS)
    assert total >= SLOW_TOTAL, {t: slow_results[t]["cases"] for t in TARGETS}


# =============================================================================================
# strategies (module level; cheap to build, used only by the runner)
# =============================================================================================

# A fixed alphabet (ASCII, controls, Latin-1, line and paragraph separators, BOM, CJK, astral,
# combining): as varied as the parsers care about, and no Unicode tables to build at start-up.
ALPHABET = ("abcxyzABCXYZ0123456789 _-./\\:,;'\"[]{}()*+?|&!%#@<>=~^$`"
            "\x00\x01\x08\t\n\x0b\x0c\r\x1b\x1c\x7f\x85\xa0\xe9\xff"
            "\u0301\u2028\u2029\ufeff\ufffd\u4e2d\U0001d518\U0001f600")


def chars(max_size: int) -> st.SearchStrategy[str]:
    return st.text(ALPHABET, max_size=max_size)


def rare(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n + 1`` draws (``st.integers(0, n) == 0`` is far likelier: Hypothesis
    favours small integers)."""
    return st.sampled_from([False] * n + [True])


HUGE_INTS = st.sampled_from([2**31, 2**32 + 1, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                             2**64 + 8, 10**30, 10**300, -1, -(2**63), -(10**30)])
FLOATS = st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 4.0, 1e308, 5e-324, 0.5, -2.5,
                          1e16]) | st.floats(allow_nan=True, allow_infinity=True)
WORDS = st.sampled_from(["", "a", "x", "prompt", "model", "value", "filter", "dtype", "shape",
                         "weight", "r", "LORA", "F32", "\n", "\x00", "é", "\u2028", "𝔘"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), HUGE_INTS, FLOATS, WORDS,
                    chars(max_size=8))
JUNK = st.recursive(SCALARS, lambda ch: st.lists(ch, max_size=3)
                    | st.dictionaries(WORDS | chars(max_size=4), ch, max_size=3), max_leaves=6)
INSERTS = st.sampled_from([
    "Infinity", "-Infinity", "NaN", "1e400", "-0", "1" * 5000, "9" * 400, "[" * 3000, "{" * 50,
    '"', "\\", "\\ud800", "\x00", "\n", "\r\n", "\u2028", ",", ":", "}", "]", '"a": 1, "a": 2',
    "&a [*a]", "*b", "!!python/object/apply:os.system ['true']", "? x", "- - -", "%YAML 1.1\n",
    "---\n", "...\n", "\t", "#", "\ufeff", ".inf", ".nan", "0x1F", "1_000", "<<: *a",
]) | chars(max_size=8)


@st.composite
def mutated(draw, text: str) -> str:
    """Text-level damage to a serialized document: insertions, cuts, replacements."""
    for _ in range(draw(st.sampled_from([0, 1, 2]))):
        kind = draw(st.sampled_from(["insert", "cut", "replace"]))
        pos = draw(st.integers(0, len(text)))
        if kind == "insert":
            text = text[:pos] + draw(INSERTS) + text[pos:]
        elif kind == "cut":
            text = text[:pos]
        else:
            text = text[:pos] + draw(INSERTS) + text[pos + draw(st.integers(1, 5)):]
    return text


@st.composite
def encoded(draw, text: str) -> bytes:
    """``text`` as bytes: UTF-8 mostly, sometimes another encoding or with invalid bytes."""
    enc = draw(st.sampled_from(["utf-8"] * 16 + ["utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    raw = text.encode(enc, "replace")
    if draw(rare(7)):
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80",
                                                b"\x00"]) | st.binary(max_size=4)) + raw[pos:]
    return raw


# ---- safetensors headers --------------------------------------------------------------------

ST_TAGS = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}
SHAPE_JUNK = st.one_of(
    st.lists(st.integers(-3, 10) | HUGE_INTS | FLOATS | st.booleans() | st.none()
             | chars(max_size=3) | st.lists(st.integers(0, 3), max_size=2), max_size=5),
    st.lists(st.sampled_from([2**32, 2**40, 2**62, 10**30, 0]), min_size=1, max_size=200),
    st.lists(st.integers(0, 2), min_size=60, max_size=300),
    JUNK)
OFFSETS_JUNK = st.one_of(
    st.lists(st.integers(-3, 2000) | HUGE_INTS | FLOATS | st.booleans() | chars(max_size=3),
             max_size=3),
    st.tuples(st.integers(0, 100), HUGE_INTS).map(list),
    JUNK)
DTYPE_JUNK = st.sampled_from(ST_TAGS + ["F8_E4M3", "U64", "f32", "float32", "", "C64", "STR"]) | JUNK


@st.composite
def safetensors_files(draw) -> bytes:
    if draw(rare(9)):
        return draw(st.binary(max_size=200))
    header: dict = {}
    offset = 0
    for _ in range(draw(st.sampled_from([0, 1, 2, 3, 4]))):
        tag = draw(st.sampled_from(ST_TAGS))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nbytes = math.prod(shape) * ITEMSIZE[tag]
        name = draw(st.sampled_from(["w", "model.embed_tokens.weight", "__metadata__x", ""])
                    | chars(max_size=10))
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data_len = offset
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.just({"format": "pt"}) | JUNK)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "drop", "extra", "big"]))
        if op == "extra" or not names:
            header[draw(chars(max_size=8))] = draw(JUNK)
            continue
        entry = header[draw(st.sampled_from(names))]
        if not isinstance(entry, dict):
            continue
        if op == "dtype":
            entry["dtype"] = draw(DTYPE_JUNK)
        elif op == "shape":
            entry["shape"] = draw(SHAPE_JUNK)
        elif op == "offsets":
            entry["data_offsets"] = draw(OFFSETS_JUNK)
        elif op == "entry":
            header[draw(st.sampled_from(names))] = draw(JUNK)
        elif op == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        else:  # a huge tensor whose byte count is right but does not fit the file
            dim = draw(HUGE_INTS.filter(lambda v: v > 0))
            entry.update(shape=[dim], data_offsets=[0, dim * ITEMSIZE.get(entry["dtype"], 1)]
                         if isinstance(entry.get("dtype"), str) else [0, dim])
    text = json.dumps(header, allow_nan=True, ensure_ascii=draw(st.booleans()))
    if draw(rare(3)):
        text = draw(mutated(text))
    raw = draw(encoded(text))
    pad = draw(st.integers(0, 8))
    n = len(raw) + pad
    lie = draw(st.sampled_from(["exact"] * 6 + ["delta", "huge"]))
    if lie == "delta":
        n = max(0, n + draw(st.integers(-16, 16)))
    elif lie == "huge":
        n = draw(st.sampled_from([2**64 - 1, 2**63, 2**32, 100 * 1024 * 1024 + 1, 0]))
    data = bytes(max(0, data_len + draw(st.sampled_from([0] * 12 + [-4, -1, 1, 8]))))
    return struct.pack("<Q", n) + raw + b" " * pad + data


# ---- shard index ----------------------------------------------------------------------------

SHARD_NAMES = st.sampled_from([
    "a.safetensors", "b.safetensors", "sub/c.safetensors", "./a.safetensors", "sub//c.safetensors",
    "sub/../a.safetensors", "../outside.safetensors", "@OUTSIDE@", "@INSIDE@", "/etc/passwd",
    "/dev/zero", "/proc/self/status", "", ".", "..", "sub", "~/a.safetensors", "a.safetensors\x00",
    "x" * 300, "a/" * 3000, "missing.safetensors", "A.SAFETENSORS", "a.safetensors ",
    "config.json", "model.safetensors.index.json", "a.safetensors/", "\\a.safetensors",
])
TENSOR_NAMES = st.sampled_from(["x", "y", "z", "w", "lm_head.weight", ""]) | chars(max_size=6)
CONFIGS = st.sampled_from([None, b"{}", b'{"tie_word_embeddings": true}', b"[]", b"{",
                           b'{"text_config": {"tie_word_embeddings": "no"}}', b"\xff\xfe"])


@st.composite
def index_cases(draw) -> tuple[bytes, bytes | None, bool]:
    mode = draw(st.sampled_from(["index"] * 8 + ["junk", "bytes"]))
    if mode == "bytes":
        raw = draw(st.binary(max_size=200))
    else:
        if mode == "junk":
            index = draw(JUNK)
        else:
            wm = draw(st.dictionaries(TENSOR_NAMES, SHARD_NAMES | JUNK, max_size=5))
            index = {"metadata": draw(st.just({"total_size": 0}) | JUNK), "weight_map": wm}
            if draw(rare(5)):
                index["weight_map"] = draw(JUNK)
        text = json.dumps(index, allow_nan=True)
        if draw(rare(4)):
            text = draw(mutated(text))
        raw = draw(encoded(text))
    return raw, draw(CONFIGS), draw(st.booleans())


# ---- adapter_config.json --------------------------------------------------------------------

ADAPTER_FIELDS = st.sampled_from([
    "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
    "target_modules", "modules_to_save", "peft_type", "use_dora", "lora_bias", "target_parameters",
    "layer_replication", "base_model_name_or_path", "bias", "task_type",
]) | chars(max_size=6)
ADAPTER_VALUES = st.sampled_from([
    0, -4, 1, 2, 4, 8, 4.0, 0.0, "four", "4", True, False, None, 1e308, math.inf, -math.inf,
    math.nan, 10**30, 2**63, [], {}, "all-linear", "(", "q_proj", ["q_proj"], ["q_proj", "nope"],
    ".*proj", "model\\.layers\\.0\\..*", [4], {"q_proj": 4}, {"q_proj": 8}, {"(": 2},
    {"q_proj": "x"}, {".*": 0}, {"q_proj": 0}, {"q_proj": -1.5}, {"q_proj": math.nan},
    {"layers.0.self_attn.q_proj": 2}, "@PRE@", "@PRE@/", "/tmp/elsewhere", "meta-llama/Llama-2-7b",
    "org/model", "", "LORA", "lora", "IA3", ["lm_head"], ["embed_tokens"], [1, 2], "lora_only",
]) | JUNK
LLAMA_MODULES = [f"model.layers.{i}.{m}" for i in (0, 1) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["model.embed_tokens", "lm_head"]
RAW_KEYS = st.sampled_from([
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_B",
    "base_model.model.model.embed_tokens.lora_embedding_A",
    "base_model.model.model.embed_tokens.lora_embedding_B",
    "base_model.model.model.embed_tokens.lora_A.weight",
    "base_model.model.lm_head.weight", "base_model.model.model.norm.weight", "lm_head.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    "base_model.model.nothing.lora_A.weight", "base_model.model.nothing.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
]) | chars(max_size=10)
SMALL_SHAPES = st.sampled_from([(4, 64), (64, 4), (32, 4), (4, 128), (128, 4), (8, 64), (64, 8),
                                (4, 320), (320, 4), (320, 64), (0, 64), (64, 0), (64,), (4, 4, 4),
                                (), (0, 0)]) | st.lists(st.integers(0, 6), max_size=3).map(tuple)
WEIGHT_TAGS = st.sampled_from(["F32"] * 4 + ["F16", "BF16", "I64", "BOOL", "U8"])


@st.composite
def lora_pairs(draw) -> list:
    """LoRA factor pairs that fit the base (``@`` shapes are filled in from the base) or not."""
    out = []
    for module in draw(st.lists(st.sampled_from(LLAMA_MODULES), min_size=1, max_size=3,
                                unique=True)):
        r = draw(st.sampled_from([4, 4, 4, 1, 2, 8, 0]))
        emb = module.endswith("embed_tokens") and draw(st.booleans())
        prefix = "" if draw(rare(5)) else "base_model.model."
        a, b = (("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight"))
        ra, rb = r, r
        if draw(rare(4)):
            rb = draw(st.integers(0, 8))
        out.append((f"{prefix}{module}.{a}", ("A", module, ra, emb), "F32"))
        if not draw(rare(8)):
            out.append((f"{prefix}{module}.{b}", ("B", module, rb, emb), draw(WEIGHT_TAGS)))
    return out


ADAPTER_WEIGHTS = st.one_of(
    st.just("real"), st.just("real"), st.just("real"), st.just("none"), st.just("bin"),
    st.binary(max_size=64),
    st.lists(st.tuples(RAW_KEYS, SMALL_SHAPES, WEIGHT_TAGS), max_size=4),
    lora_pairs(),
)


ADAPTER_PAIRS = st.sampled_from([  # suspicious-but-loadable and ill-typed settings
    ("lora_alpha", 0), ("lora_alpha", 0.0), ("lora_alpha", -8), ("lora_alpha", "8"),
    ("target_modules", ["q_proj"]), ("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"]),
    ("target_modules", "nope"), ("target_modules", ".*_proj"), ("target_modules", "all-linear"),
    ("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj", "lm_head"]),
    ("base_model_name_or_path", "/tmp/elsewhere"), ("base_model_name_or_path", "org/other"),
    ("base_model_name_or_path", "@PRE@/"), ("base_model_name_or_path", "pre"),
    ("base_model_name_or_path", "~no-such-user/model"), ("base_model_name_or_path", "./x\x00"),
    ("base_model_name_or_path", "/" + "x" * 300), ("base_model_name_or_path", "x/" * 3000),
    ("base_model_name_or_path", ""), ("base_model_name_or_path", None),
    ("alpha_pattern", {"q_proj": 0}), ("alpha_pattern", {"q_proj": 16}),
    ("rank_pattern", {"q_proj": 2}), ("rank_pattern", {"q_proj": 4}), ("r", "four"),
    ("r", 4.0), ("r", 0), ("use_rslora", True), ("use_rslora", "true"), ("fan_in_fan_out", True),
    ("modules_to_save", "lm_head"), ("modules_to_save", ["lm_head"]),
])


@st.composite
def adapter_cases(draw) -> tuple:
    start = draw(st.sampled_from(["real"] * 8 + ["empty", "junk"]))
    overrides = draw(st.lists(ADAPTER_PAIRS | st.tuples(ADAPTER_FIELDS,
                                                        ADAPTER_VALUES | st.just("<delete>")),
                              max_size=4))
    text_damage = draw(rare(9))
    damage = draw(mutated("@CONFIG@")) if text_damage else None
    junk = draw(JUNK) if start == "junk" else None
    return start, overrides, damage, junk, draw(ADAPTER_WEIGHTS), draw(st.booleans())


# ---- mergekit YAML --------------------------------------------------------------------------

def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, n: int) -> st.SearchStrategy:
    """``good``, and ``bad`` about once in ``n + 1`` draws: deep paths get most of the cases."""
    return rare(n).flatmap(lambda r: bad if r else good)


REFS = mostly(st.sampled_from(["pre", "pre+lora", "@PRE@", "@PRE@+@LORA@", "./pre", "pre/"]),
              st.sampled_from(["lora", "@LORA@", "nope", "", " ", "pre+", "+lora", "pre+nope",
                               "pre+pre", "~/nope", "/", "/etc/passwd", "pre\x00",
                               "pre\u2028lora", "pre+lora+lora"]) | JUNK, 2)
METHOD_NAMES = mostly(st.sampled_from([
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "nearswap", "sce"]),
    st.sampled_from(["passthrough", "nope", "", "LINEAR"]) | JUNK, 5)
PARAM_NAMES = mostly(st.sampled_from([
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "t", "int8_mask", "rescale",
    "normalize_by", "rescale_norm", "filter_wise", "k", "select_topk"]), chars(max_size=6), 6)
NUMBERS = st.integers(-3, 3) | st.floats(-2, 2) | FLOATS | HUGE_INTS
PARAM_VALUES = mostly(st.one_of(
    NUMBERS, st.booleans(), st.lists(NUMBERS, max_size=5), st.lists(st.booleans(), max_size=3),
    st.fixed_dictionaries({"value": NUMBERS}, optional={"filter": st.sampled_from(
        ["self_attn", "mlp", "*", "", None, 3])}),
    st.lists(st.fixed_dictionaries({"value": NUMBERS | st.lists(NUMBERS, max_size=3)},
                                   optional={"filter": chars(max_size=5)}), max_size=3)),
    JUNK, 5)
PARAMS = mostly(st.dictionaries(PARAM_NAMES, PARAM_VALUES, max_size=4), JUNK, 6)
MODEL_ENTRIES = mostly(
    REFS | st.fixed_dictionaries({"model": REFS}, optional={"parameters": PARAMS}),
    st.dictionaries(st.sampled_from(["model", "parameters", "lora", "x"]), JUNK, max_size=3), 6)
YAML_KEYS = st.sampled_from(["merge_method", "models", "base_model", "parameters", "dtype",
                             "out_dtype", "tokenizer_source", "slices", "tokenizer",
                             "chat_template"]) | chars(max_size=6)


@st.composite
def mergekit_docs(draw) -> dict:
    doc = {"merge_method": draw(METHOD_NAMES),
           "models": draw(mostly(st.lists(MODEL_ENTRIES, min_size=1, max_size=3),
                                 st.lists(MODEL_ENTRIES, max_size=0) | JUNK, 6))}
    if draw(st.booleans()):
        doc["base_model"] = draw(REFS)
    if draw(st.booleans()):
        doc["parameters"] = draw(PARAMS)
    for key in ("dtype", "out_dtype"):
        if draw(rare(3)):
            doc[key] = draw(st.sampled_from(["float32", "bfloat16", "float16", "fp16", "int8",
                                             "float64", ""]) | JUNK)
    if draw(rare(3)):
        doc["tokenizer_source"] = draw(st.sampled_from(["base", "union"]) | REFS)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        key = draw(YAML_KEYS)
        if key in doc and draw(st.booleans()):
            del doc[key]
        else:
            doc[key] = draw(JUNK)
    return doc


UNIT = st.floats(0.05, 1.0)
GRADIENT = st.lists(st.floats(0.0, 1.0), min_size=2, max_size=4)
CONDITIONS = st.lists(st.fixed_dictionaries(
    {"value": UNIT}, optional={"filter": st.sampled_from(["self_attn", "mlp", "embed", "*"])}),
    min_size=1, max_size=3)


def _valid_value(kind: type, choices: tuple | None = None) -> st.SearchStrategy:
    if choices:
        return mostly(st.sampled_from(choices), st.sampled_from(["", "none", 1]) | JUNK, 5)
    if kind is bool:
        return mostly(st.booleans(), st.sampled_from([0, 1, "yes", "off", 2, "maybe"]), 5)
    if kind is int:
        return mostly(st.integers(1, 4), st.sampled_from([0, -1, 2.5, "3", 10**30]), 5)
    return mostly(UNIT | GRADIENT | CONDITIONS, NUMBERS | JUNK, 5)


@st.composite
def near_valid_docs(draw) -> dict:
    """A config that merges (every method, its own parameters), sometimes with one value off."""
    name = draw(st.sampled_from(sorted(METHODS)))
    spec = METHODS[name]
    if spec.kind == "slerp":
        n = 1
    else:
        n = draw(st.sampled_from([2, 3] if spec.kind == "model_stock" else [1, 2, 3]))
    per_model = [(ps.name, ps.type, ps.choices) for ps in spec.params if ps.scope == "model"]
    if spec.uses_weight and spec.kind != "slerp":
        per_model.append(("weight", float, None))
    shared = [(ps.name, ps.type, ps.choices) for ps in spec.params if ps.scope == "shared"]
    models = []
    for ref in ["pre+lora", "./pre+lora", "@PRE@+@LORA@"][:n]:
        params = {k: draw(_valid_value(t, c)) for k, t, c in per_model if not draw(rare(4))}
        models.append({"model": ref, "parameters": params})
    doc = {"merge_method": name, "models": models,
           "parameters": {k: draw(_valid_value(t, c)) for k, t, c in shared if not draw(rare(2))}}
    if spec.kind != "linear" or draw(st.booleans()):
        doc["base_model"] = "pre"
    if draw(rare(5)):
        doc["dtype"] = draw(st.sampled_from(["float32", "bfloat16", "float16", "int8", "nope"]))
    return doc


def _alias_bomb(depth: int, width: int) -> str:
    """``[&l0 [x, x], &l1 [*l0, *l0], ...]``: tiny text, width**depth leaves once expanded."""
    items = [f"&l0 [{', '.join(['x'] * width)}]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "[" + ", ".join(items) + "]"


ALIAS_SLOTS = ["models", "merge_method", "base_model", "parameters.weight", "models.0.model",
               "models.0.parameters.weight", "dtype", "tokenizer_source", "parameters"]


@st.composite
def yaml_alias_docs(draw) -> str:
    """Anchors and aliases: exponential expansion, self-reference, merge keys."""
    kind = draw(st.sampled_from(["bomb", "recursive", "merge", "deep"]))
    slot = draw(st.sampled_from(ALIAS_SLOTS))
    if kind == "bomb":
        value = _alias_bomb(draw(st.sampled_from(range(1, 13))), draw(st.sampled_from(range(2, 10))))
    elif kind == "recursive":
        value = draw(st.sampled_from(["&r [*r]", "&r {value: *r}", "&r [{filter: '*', value: *r}]",
                                      "&r {model: *r}", "&r [1, *r]"]))
    elif kind == "merge":
        value = draw(st.sampled_from(["{<<: {model: pre}, parameters: {weight: 1}}",
                                      "{<<: [{model: pre}, {model: pre+lora}]}", "{<<: 5}"]))
    else:
        depth = draw(st.sampled_from([10, 100, 400, 1000, 5000]))
        value = "[" * depth + "1" + "]" * depth
    doc = {"merge_method": "linear", "models": [{"model": "pre", "parameters": {"weight": 1}},
                                                {"model": "pre+lora"}],
           "parameters": {"weight": 0.5}}
    keys = slot.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[keys[-1]] = "@VALUE@"
    return json.dumps(doc).replace('"@VALUE@"', value)


@st.composite
def yaml_cases(draw) -> tuple[bytes, str | None]:
    mode = draw(st.sampled_from(["doc"] * 4 + ["near"] * 3 + ["alias"] * 2 + ["text", "bytes"]))
    if mode == "bytes":
        raw = draw(st.binary(max_size=200))
    else:
        if mode in ("doc", "near"):
            doc = draw(mergekit_docs() if mode == "doc" else near_valid_docs())
            text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()),
                                  default_flow_style=draw(st.sampled_from([None, True, False])))
        elif mode == "alias":
            text = draw(yaml_alias_docs())
        else:
            text = draw(chars(max_size=200))
        if draw(rare(4)):
            text = draw(mutated(text))
        raw = draw(encoded(text))
    dtype = draw(st.sampled_from([None] * 5 + ["float32", "bfloat16", "bf16", "nope", ""]))
    return raw, dtype


# ---- prompt files ---------------------------------------------------------------------------

COLUMNS = st.sampled_from(["prompt", "goal", "Prompt", "PROMPT", "category", "label", "answer",
                           "reference", "text", "", " prompt ", "type"]) | chars(max_size=8)
CELLS = st.sampled_from(["", " ", "How do I?", "safe", "unsafe", '"', '""', ",", "\t", "\n",
                         "\r", "a\x00b", "x" * 200, "\ufeff"]) | chars(max_size=20)


@st.composite
def prompt_cases(draw) -> tuple[str, bytes, dict]:
    suffix = draw(st.sampled_from([".csv"] * 3 + [".jsonl"] * 2 + [".json"] * 2 + [
        ".tsv", ".ndjson", ".txt", ".CSV", ".parquet", ""]))
    mode = draw(st.sampled_from(["structured"] * 4 + ["near"] * 3 + ["wide", "deep", "text",
                                                                     "bytes"]))
    if mode == "bytes":
        raw = draw(st.binary(max_size=300))
    else:
        if mode in ("structured", "near"):
            if mode == "near":  # a usable set: a prompt column, non-empty prompts
                cols = ["prompt", *draw(st.lists(st.sampled_from(["category", "label", "answer",
                                                                  "id", "goal"]),
                                                 max_size=3, unique=True))]
                rows = draw(st.lists(st.tuples(st.sampled_from(["How do I?", "Tell me, x", "q\"x"])
                                               | chars(max_size=10).map(lambda c: "p" + c),
                                               st.lists(CELLS, min_size=len(cols) - 1,
                                                        max_size=len(cols) - 1)),
                                     min_size=1, max_size=4).map(
                    lambda rs: [[p, *rest] for p, rest in rs]))
            else:
                cols = draw(st.lists(COLUMNS, max_size=5))
                rows = draw(st.lists(st.lists(CELLS, min_size=max(0, len(cols) - 1),
                                              max_size=len(cols) + 1), max_size=4))
            if suffix.lower() in (".csv", ".tsv", ""):
                buf = io.StringIO()
                w = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
                w.writerow(cols)
                w.writerows(rows)
                text = buf.getvalue()
            else:
                records = [dict(zip(cols, row)) for row in rows]
                if mode == "structured" or draw(rare(5)):
                    records += draw(st.lists(JUNK, max_size=2))
                if suffix in (".jsonl", ".ndjson"):
                    text = "\n".join(json.dumps(r, allow_nan=True) for r in records)
                elif suffix == ".json":
                    wrap = draw(st.sampled_from(["list", "dict", "dict2", "junk"]))
                    obj = {"list": records, "dict": {"data": records},
                           "dict2": {"a": records, "b": records}, "junk": draw(JUNK)}[wrap]
                    text = json.dumps(obj, allow_nan=True)
                else:
                    text = "\n".join(" ".join(row) for row in rows)
        elif mode == "wide":  # many columns: messages that list them must stay short
            n = draw(st.sampled_from([50, 300, 2000]))
            cols = [f"column_{i}_" + "x" * 20 for i in range(n)]
            if suffix in (".jsonl", ".ndjson", ".json"):
                rec = json.dumps({c: "v" for c in cols})
                text = rec if suffix != ".json" else f"[{rec}]"
            else:
                text = ",".join(cols) + "\n" + ",".join("v" * len(cols)) + "\n"
        elif mode == "deep":
            depth = draw(st.sampled_from([100, 1000, 100_000]))
            text = "[" * depth + "]" * depth
        else:
            text = draw(chars(max_size=300))
        if draw(rare(4)):
            text = draw(mutated(text))
        raw = draw(encoded(text))
    kwargs = {
        "prompt_column": draw(st.sampled_from([None] * 4 + ["prompt", "PROMPT", "goal", "nope", ""])
                              | chars(max_size=4)),
        "category_column": draw(st.sampled_from([None] * 4 + ["category", "nope"])),
        "reference_column": draw(st.sampled_from([None] * 4 + ["answer", "nope"])),
        "require_reference": draw(st.booleans()),
    }
    return suffix, raw, kwargs


# =============================================================================================
# the runner (this file as a script): the checks
# =============================================================================================

class CaseTimeout(Exception):
    """A case ran past CASE_SECONDS."""


def _on_alarm(signum, frame):
    raise CaseTimeout(f"case ran past {CASE_SECONDS} s")


class Runner:
    """Workspace and inputs shared by the cases; one ``check_<target>`` per target."""

    def __init__(self, workspace: Path, pre: Path, lora: Path) -> None:
        from mergesafe.checkpoint import open_checkpoint, save_file

        self.ws = workspace
        self.pre = pre.resolve()
        self.lora = lora.resolve()
        self.slowest = 0.0
        self.outcomes: collections.Counter = collections.Counter()
        for sub in ("header", "index", "adapter", "yaml", "prompts"):
            (self.ws / sub).mkdir(parents=True, exist_ok=True)
        # shard index: shards to link into each case's folder, and one to leave outside it
        src = self.ws / "index_src"
        (src / "sub").mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.ones(2, 3), "y": torch.arange(4)}, src / "a.safetensors")
        save_file({"z": torch.zeros(3, dtype=torch.bfloat16)}, src / "b.safetensors")
        save_file({"w": torch.ones(1)}, src / "sub" / "c.safetensors")
        save_file({"x": torch.ones(2, 3)}, src / "outside.safetensors")
        self.index_src = src
        # adapter: the real adapter's config and weights; the base opened once
        self.base = open_checkpoint(self.pre)
        self.lora_config = json.loads((self.lora / "adapter_config.json").read_text())
        # mergekit: the tiny models under short relative names next to the config
        for name, target in (("pre", self.pre), ("lora", self.lora)):
            link = self.ws / "yaml" / name
            if not link.exists():
                link.symlink_to(target)

    # -- helpers ----------------------------------------------------------------------------
    def bounded(self, fn, *args, **kwargs):
        """``fn(...)`` within CASE_SECONDS; a UserError is checked and gives None, anything else
        propagates (and fails the property)."""
        from mergesafe.errors import UserError

        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        start = time.monotonic()
        try:
            result = fn(*args, **kwargs)
            self.outcomes[f"ok: {fn.__name__}"] += 1
            return result
        except UserError as err:
            _check_message(str(err))
            msg = str(err)[len(err.path) + 2:] if err.path and str(err).startswith(err.path) else str(err)
            self.outcomes[re.sub(r"\d+", "N", msg)[:50]] += 1
            return None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.slowest = max(self.slowest, time.monotonic() - start)

    def fresh(self, sub: str) -> Path:
        folder = self.ws / sub / "case"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        return folder

    def placeholders(self, text: str) -> str:
        return (text.replace("@PRE@", str(self.pre)).replace("@LORA@", str(self.lora))
                .replace("@OUTSIDE@", str(self.ws / "index" / "case" / "outside.safetensors"))
                .replace("@INSIDE@", str(self.ws / "index" / "case" / "model" / "a.safetensors")))

    # -- targets ----------------------------------------------------------------------------
    def check_header(self, data: bytes) -> None:
        from mergesafe.checkpoint import read_header, read_tensor

        path = self.ws / "header" / "model.safetensors"
        path.write_bytes(data)
        got = self.bounded(read_header, path)
        if got is not None:
            infos, metadata = got
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
            for info in infos.values():
                t = self.bounded(read_tensor, info)
                assert t is not None and tuple(t.shape) == info.shape and t.dtype == info.dtype

    def check_index(self, case) -> None:
        from mergesafe.checkpoint import open_checkpoint

        raw, config, single = case
        root = self.fresh("index")
        model = root / "model"
        (model / "sub").mkdir(parents=True)
        for rel in ("a.safetensors", "b.safetensors", "sub/c.safetensors"):
            os.link(self.index_src / rel, model / rel)
        os.link(self.index_src / "outside.safetensors", root / "outside.safetensors")
        if single:
            os.link(self.index_src / "a.safetensors", model / "model.safetensors")
        (model / "model.safetensors.index.json").write_bytes(
            self.placeholders(raw.decode("latin-1")).encode("latin-1") if b"@" in raw else raw)
        if config is not None:
            (model / "config.json").write_bytes(config)
        ckpt = self.bounded(open_checkpoint, model)
        if ckpt is not None:
            inside = str(model) + os.sep
            for f in ckpt.weight_files():
                assert os.path.normpath(str(f)).startswith(inside), f"reads {f} outside {model}"
            for name in ckpt.names():
                self.bounded(ckpt.get, name)
            ckpt.close()

    def _adapter_weights(self, folder: Path, spec) -> None:
        from mergesafe.checkpoint import save_file

        if spec == "real":
            os.link(self.lora / "adapter_model.safetensors", folder / "adapter_model.safetensors")
        elif spec == "bin":
            (folder / "adapter_model.bin").write_bytes(b"PK\x03\x04 not really a pickle")
        elif isinstance(spec, bytes):
            (folder / "adapter_model.safetensors").write_bytes(spec)
        elif isinstance(spec, list):
            tensors = {}
            for key, shape, tag in spec:
                if isinstance(shape, tuple) and len(shape) == 4 and shape[0] in ("A", "B"):
                    part, module, r, emb = shape
                    target = f"{module}.weight"
                    out, inp = self.base.shape(target) if target in self.base else (16, 16)
                    if emb:
                        shape = (r, out) if part == "A" else (inp, r)
                    else:
                        shape = (r, inp) if part == "A" else (out, r)
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                         "I64": torch.int64, "BOOL": torch.bool, "U8": torch.uint8}[tag]
                tensors[key] = (torch.ones(shape) * 0.01).to(dtype)
            save_file(tensors, folder / "adapter_model.safetensors")

    def check_adapter(self, case) -> None:
        from mergesafe.checkpoint import SuspiciousAdapterWarning, open_adapter

        start, overrides, damage, junk, weights, base_object = case
        folder = self.fresh("adapter")
        cfg = dict(self.lora_config) if start == "real" else {}
        for key, value in overrides:
            if value == "<delete>":
                cfg.pop(key, None)
            else:
                cfg[key] = json.loads(self.placeholders(json.dumps(value, allow_nan=True)))
        text = json.dumps(junk if start == "junk" else cfg, allow_nan=True)
        if damage is not None:
            text = damage.replace("@CONFIG@", text)
        (folder / "adapter_config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        self._adapter_weights(folder, weights)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            view = self.bounded(open_adapter, folder, self.base if base_object else self.pre)
            if view is not None:
                for name in [*list(view.lora_modules)[:2], *list(view.saved_modules)[:1]]:
                    t = self.bounded(view.get, name)
                    assert t is None or tuple(t.shape) == tuple(view.shape(name)), name
        for w in caught:
            if issubclass(w.category, SuspiciousAdapterWarning):
                _check_message(str(w.message))
                self.outcomes["warning: " + str(w.message).split(": ", 1)[-1][:40]] += 1

    def check_yaml(self, case) -> None:
        from mergesafe.merge.config import build_config_plan

        raw, dtype = case
        path = self.ws / "yaml" / "merge.yaml"
        path.write_bytes(self.placeholders(raw.decode("latin-1")).encode("latin-1")
                         if b"@" in raw else raw)
        self.bounded(build_config_plan, path, seed=0, allow_pickle=False, dtype=dtype)

    def check_prompts(self, case) -> None:
        from mergesafe.evaluate.prompts import load_prompt_file

        suffix, raw, kwargs = case
        path = self.ws / "prompts" / f"prompts{suffix}"
        path.write_bytes(raw)
        rows = self.bounded(load_prompt_file, path, **kwargs)
        if rows is not None:
            assert rows and all(isinstance(r.prompt, str) and r.prompt.strip() for r in rows)


LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x85\u2028\u2029]")  # what terminals and logs break on


def _check_message(msg: str) -> None:
    assert msg and not LINE_BREAKS.search(msg), f"message is not one line: {msg[:1000]!r}"
    assert len(msg) <= MAX_MESSAGE, f"message of {len(msg)} chars: {msg[:1000]!r}"


STRATEGIES = {"header": safetensors_files(), "index": index_cases(), "adapter": adapter_cases(),
              "yaml": yaml_cases(), "prompts": prompt_cases()}


def _run_target(runner: Runner, target: str, n: int) -> dict:
    count = [0]
    check = getattr(runner, f"check_{target}")

    @settings(max_examples=n, derandomize=True, database=None,
              deadline=timedelta(seconds=CASE_SECONDS),
              suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink),
              report_multiple_bugs=True, print_blob=False)
    @given(STRATEGIES[target])
    def prop(case):
        count[0] += 1
        check(case)

    runner.slowest = 0.0
    runner.outcomes.clear()
    start = time.monotonic()
    error = None
    try:
        prop()
    except BaseException as err:  # report whatever broke, with the example
        if isinstance(err, KeyboardInterrupt):
            raise
        error = "".join(traceback.format_exception(err))
        if len(error) > 12000:
            error = error[:6000] + "\n[...]\n" + error[-6000:]
    return {"ok": error is None, "cases": count[0], "seconds": time.monotonic() - start,
            "slowest": runner.slowest, "error": error,
            "maxrss": _peak_rss(),
            "outcomes": dict(runner.outcomes.most_common(60))}


def _peak_rss() -> int:
    """This process's own peak resident memory in bytes: VmHWM of its memory map.  Not
    `ru_maxrss`: Linux carries that over from the parent at fork and exec, so a runner started by a
    pytest process that once held a 2.7 GB model reported 2.7 GB itself."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _limit_memory() -> None:
    """Address space: what the started runner holds plus EXTRA_MEMORY."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + EXTRA_MEMORY
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run the fuzz targets (see the module docstring)")
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--pre", type=Path, required=True)
    ap.add_argument("--lora", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("counts", nargs="+", help="TARGET=N ...")
    args = ap.parse_args(argv)
    counts = {}
    for item in args.counts:
        target, _, n = item.partition("=")
        if target not in TARGETS:
            ap.error(f"unknown target {target!r}")
        counts[target] = int(n)
    torch.set_num_threads(1)
    for module in ("mergesafe.evaluate.prompts", "mergesafe.merge.config"):
        importlib.import_module(module)  # before the memory limit

    args.workspace.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.workspace.resolve(), args.pre, args.lora)
    _limit_memory()
    results: dict = {}
    for target, n in counts.items():
        results[target] = _run_target(runner, target, n)
        args.out.write_text(json.dumps(results, indent=1))
        r = results[target]
        print(f"{target}: {'ok' if r['ok'] else 'FAILED'}, {r['cases']} cases in "
              f"{r['seconds']:.1f} s (slowest {r['slowest']:.2f} s, peak RSS "
              f"{r['maxrss'] / 2**20:.0f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
