"""Hostile or broken inputs stay bounded and end in one short `UserError` line.

* mergekit YAML: alias bombs, recursive aliases, deep nesting, huge files, non-UTF-8 bytes;
* `sweep --weights`: grids that would grow without bound;
* chat templates: endless loops, memory bombs, sandbox escapes, syntax errors (checked in a child
  process with time and memory limits, once per template), and errors on real rows;
* prompt sets: `limit` stops reading, `sample` streams, non-UTF-8 files name the line.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from cli_helpers import expect_error, run_cli

from mergesafe.checkpoint import chat_template as ct
from mergesafe.errors import UserError
from mergesafe.evaluate.prompts import (
    iter_prompt_rows,
    load_prompt_file,
    safe_rows_only,
    select_rows,
)
from mergesafe.sweep.grid import MAX_WEIGHTS, check_grid, parse_weights

BOMB = """\
merge_method: linear
models:
  - model: {model}
    parameters:
      weight:
        - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
        - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
        - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
        - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
        - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
        - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
        - &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
        - &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
        - &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


# ------------------------------------------------------------------------------ mergekit YAML

def _merge_error(cfg: Path, tmp_path: Path, capsys, *fragments: str) -> str:
    out = tmp_path / "o"
    t0 = time.perf_counter()
    line = expect_error(["merge", "--config", cfg, "--out", out], capsys, str(cfg), *fragments)
    assert time.perf_counter() - t0 < 10
    assert len(line) < 400, line
    assert not out.exists()
    return line


def test_yaml_alias_bomb_is_refused_fast_and_short(tiny_pre, tmp_path, capsys):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB.format(model=tiny_pre))
    assert cfg.stat().st_size < 1024
    _merge_error(cfg, tmp_path, capsys, "too many aliases")


def test_yaml_small_alias_nest_gives_a_short_message(tiny_pre, tmp_path, capsys):
    # 9 × 9 × 9 values: under the expansion bound, but a wrong parameter value; the message
    # quotes it cut short instead of its full repr.
    text = "\n".join(BOMB.format(model=tiny_pre).splitlines()[:9]) + "\n"
    cfg = tmp_path / "nest.yaml"
    cfg.write_text(text)
    line = _merge_error(cfg, tmp_path, capsys, "parameter 'weight'")
    assert "..." in line


def test_yaml_aliases_within_bounds_still_merge(tiny_pre, tiny_post, tmp_path, capsys):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"merge_method: linear\nparameters: &p {{weight: 0.5}}\nmodels:\n"
                   f"  - model: {tiny_pre}\n    parameters: *p\n"
                   f"  - model: {tiny_post}\n    parameters: *p\n")
    code, _, err = run_cli(["merge", "--config", cfg, "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "config.json").is_file()


@pytest.mark.parametrize("name, content, fragment", [
    ("recursive.yaml", b"merge_method: linear\nmodels: &m [*m]\n", "recursive alias"),
    ("deep.yaml", b"merge_method: linear\nmodels: " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
     "nested too deeply"),
    ("deepblock.yaml", b"merge_method: linear\nmodels:\n" + b"".join(b" " * i + b"- \n" for i in range(1300)),
     "nested too deeply"),
    ("flat.yaml", b"merge_method: linear\nmodels: [" + b"1," * 300_000 + b"1]\n", "more than 10000 values"),
    ("latin1.yaml", b"merge_method: linear\nmodels:\n  - model: caf\xe9\n", "line 3: not UTF-8"),
    ("huge.yaml", b"merge_method: linear\n#" + b"x" * (1 << 20) + b"\n", "too large"),
    ("date.yaml", b"merge_method: linear\nmodels: 2024-13-45\n", "invalid YAML value"),
    ("tag.yaml", b"merge_method: !!python/object:os.system " + b"x" * 500 + b"\n", "invalid YAML"),
    ("method.yaml", b"merge_method: [" + b"abc, " * 400 + b"x]\nmodels: [x]\n", "merge_method"),
])
def test_yaml_bad_files(name, content, fragment, tmp_path, capsys):
    cfg = tmp_path / name
    cfg.write_bytes(content)
    _merge_error(cfg, tmp_path, capsys, fragment)


# ------------------------------------------------------------------------------ sweep grid

@pytest.mark.parametrize("spec", ["0:1:1e-9", "0:1:1e-999999999", "0:1:0.001",
                                  ",".join(["0.5"] * (MAX_WEIGHTS + 1))])
def test_weight_grid_is_capped_before_it_is_made(spec):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        parse_weights(spec)
    assert time.perf_counter() - t0 < 1
    assert str(err.value).startswith("--weights: ") and str(MAX_WEIGHTS) in str(err.value)
    assert len(str(err.value)) < 200


def test_weight_grid_up_to_the_cap_and_short_echo():
    grid = parse_weights("0:0.999:0.001")
    assert len(grid) == MAX_WEIGHTS and grid[0] == 0.0 and grid[-1] == 0.999
    assert parse_weights("0.1:0.9:0.1") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    with pytest.raises(UserError) as err:
        parse_weights("x" * 10_000 + ":1:0.1")
    assert len(str(err.value)) < 200 and "..." in str(err.value)
    with pytest.raises(UserError, match="outside"):
        parse_weights("0:2:0.5")


def test_methods_times_weights_cap():
    check_grid(["linear", "ties"], [0.1 * i for i in range(10)])
    with pytest.raises(UserError, match="merges; at most"):
        check_grid(["linear"] * 6, [i / 1000 for i in range(1000)])


def test_sweep_cli_refuses_an_endless_grid(tiny_pre, tiny_post, tmp_path, capsys):
    harm = tmp_path / "harm.csv"
    harm.write_text("prompt\nHow do I pick a lock?\n")
    out = tmp_path / "o"
    line = expect_error(["sweep", "--pre", tiny_pre, "--post", tiny_post, "--out", out,
                         "--safety", harm, "--methods", "linear", "--weights", "0:1:1e-9"],
                        capsys, "--weights", "more than 1000")
    assert len(line) < 200 and not out.exists()


# ------------------------------------------------------------------------------ chat templates

NESTED_OUTPUT = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
NESTED_SILENT = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
GEMMA_LIKE = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<model>{% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_pre):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_pre))


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(ct, "_cache", {})


def _check(tok, template: str, **limits) -> str | None:
    tok = tok.__class__.from_pretrained(tok.name_or_path)  # a copy: the fixture keeps its template
    tok.chat_template = template
    try:
        ct.check_chat_template(tok, "tmpl.jinja")
    except UserError as err:
        assert str(err).startswith("tmpl.jinja: ") and "\n" not in str(err)
        assert len(str(err)) < 300, str(err)
        return str(err)
    return None


@pytest.mark.parametrize("template, fragment", [
    (NESTED_OUTPUT, "renders more than"),
    (ESCAPE, "refused by the Jinja sandbox"),
    ("{% for m in messages %}{{ m['content'] }}", "not valid Jinja"),
    ("{{ foo.bar }}", "UndefinedError"),
    ("{{ ('x' * 2000000000) | length }}", "MB to render"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses too deeply"),
    ("{{ raise_exception('I refuse every conversation') }}", "I refuse every conversation"),
])
def test_bad_chat_templates_are_user_errors(tok, fresh_cache, template, fragment):
    t0 = time.perf_counter()
    message = _check(tok, template)
    assert message is not None and fragment in message, message
    assert time.perf_counter() - t0 < 8


def test_endless_template_hits_the_time_limit(tok, fresh_cache, monkeypatch):
    monkeypatch.setattr(ct, "TIME_LIMIT_S", 1.5)
    t0 = time.perf_counter()
    message = _check(tok, NESTED_SILENT)
    assert message is not None and "takes more than 1.5 s" in message
    assert time.perf_counter() - t0 < 6


def test_good_templates_pass_and_are_checked_once(tok, fresh_cache, monkeypatch):
    assert _check(tok, tok.chat_template) is None
    assert _check(tok, GEMMA_LIKE) is None  # refusing the system role is fine
    calls = []
    monkeypatch.setattr(ct, "_probe", lambda *a: calls.append(a) or "the chat template is broken")
    assert _check(tok, tok.chat_template) is None and _check(tok, GEMMA_LIKE) is None
    assert calls == []  # cached per template text
    assert _check(tok, tok.chat_template + " ") == "tmpl.jinja: the chat template is broken"
    assert len(calls) == 1


def test_template_source_names_the_file(tok):
    assert ct.chat_template_source(tok) == str(Path(tok.name_or_path) / "chat_template.jinja")


def test_chat_texts_names_the_template_file(tiny_pre, tmp_path, fresh_cache):
    from transformers import AutoTokenizer

    from mergesafe.evaluate.generate import chat_texts

    model = tmp_path / "m"
    shutil.copytree(tiny_pre, model)
    (model / "chat_template.jinja").write_text(ESCAPE)
    tok = AutoTokenizer.from_pretrained(str(model))
    with pytest.raises(UserError, match="refused by the Jinja sandbox") as err:
        chat_texts(tok, ["hi"])
    assert err.value.path == str(model / "chat_template.jinja")
    # a template that passes the probe but rejects one real prompt
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    tok = AutoTokenizer.from_pretrained(str(model))
    assert chat_texts(tok, ["fine"]) == ["fine"]
    with pytest.raises(UserError, match=r"prompt 2 of 2: the chat template cannot render it .*no boom"):
        chat_texts(tok, ["fine", "boom"])


def test_eval_cli_bad_template_is_one_line(tiny_pre, tmp_path, capsys, fresh_cache):
    model = tmp_path / "m"
    shutil.copytree(tiny_pre, model)
    (model / "chat_template.jinja").write_text(NESTED_OUTPUT)
    harm = tmp_path / "harm.csv"
    harm.write_text("prompt\nHow do I pick a lock?\n")
    out = tmp_path / "out"
    line = expect_error(["eval", "--model", model, "--out", out, "--safety", harm, "--no-progress",
                         "--max-new-tokens", "2"], capsys,
                        str(model / "chat_template.jinja"), "renders more than")
    assert len(line) < 300 and not out.exists()


def test_finetune_cli_bad_template_file(tiny_pre, tmp_path, capsys, fresh_cache):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 2?", "response": "4"}) + "\n")
    bad = tmp_path / "t.jinja"
    bad.write_text(ESCAPE)
    out = tmp_path / "out"
    expect_error(["finetune", "--model", tiny_pre, "--data", data, "--out", out,
                  "--chat-template", bad], capsys, str(bad), "refused by the Jinja sandbox")
    latin = tmp_path / "latin.jinja"
    latin.write_bytes(b"{{ 'caf\xe9' }}")
    expect_error(["finetune", "--model", tiny_pre, "--data", data, "--out", out,
                  "--chat-template", latin], capsys, str(latin), "not UTF-8")
    assert not out.exists()


def test_load_tokenizer_checks_the_model_template(tiny_pre, tmp_path, fresh_cache):
    from mergesafe.finetune.tokenize import load_tokenizer

    model = tmp_path / "m"
    shutil.copytree(tiny_pre, model)
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] | frobnicate }}")
    with pytest.raises(UserError, match="not valid Jinja") as err:
        load_tokenizer(model)
    assert err.value.path == str(model / "chat_template.jinja")
    assert load_tokenizer(model, need_template=False) is not None  # plain-text data: not used


# ------------------------------------------------------------------------------ prompt sets

def test_limit_stops_reading(tmp_path):
    p = tmp_path / "big.jsonl"
    good = "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5))
    p.write_text(good + '{"prompt": "broken\n' + "\n".join(["not json"] * 10_000) + "\n")
    rows = load_prompt_file(p, limit=5)
    assert [r.prompt for r in rows] == [f"p{i}" for i in range(5)] and [r.line for r in rows] == [1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="line 6: malformed JSON"):
        load_prompt_file(p)
    with pytest.raises(UserError, match="line 6: malformed JSON"):
        load_prompt_file(p, limit=6)
    # the iterator reads lazily too
    it = iter_prompt_rows(p)
    assert next(it).prompt == "p0"


def test_limit_with_safe_filter_stops_reading(tmp_path):
    p = tmp_path / "xs.csv"
    p.write_text("prompt,label\na,unsafe\nb,safe\nc,safe\nd,e,f\n")
    rows = load_prompt_file(p, limit=2, safe_only=True)
    assert [(r.prompt, r.line) for r in rows] == [("b", 3), ("c", 4)]
    with pytest.raises(UserError, match="line 5: malformed row"):
        load_prompt_file(p, limit=3, safe_only=True)


def _reference(path, *, limit=None, sample=None, seed=0, safe_only=False):
    rows = load_prompt_file(path)
    if safe_only:
        rows = safe_rows_only(rows)
    return select_rows(rows, limit=limit, sample=sample, seed=seed)


@pytest.mark.parametrize("kind", ["labels", "no_label_column", "null_labels", "late_label"])
def test_streamed_selection_equals_select_rows(tmp_path, kind):
    rng = random.Random(3)
    p = tmp_path / f"{kind}.jsonl"
    lines = []
    for i in range(60):
        rec = {"prompt": f"p{i}", "category": rng.choice(["a", "b"])}
        if kind == "labels":
            rec["label"] = rng.choice(["safe", "unsafe", " Safe "])
        elif kind == "null_labels":
            rec["label"] = None
        elif kind == "late_label":
            rec["label"] = "safe" if i in (40, 50) else None
        lines.append(json.dumps(rec))
        if i % 7 == 0:
            lines.append("")  # blank lines keep the numbering
    p.write_text("\n".join(lines) + "\n")
    for safe_only in (False, True):
        for limit in (None, 1, 3, 25, 100):
            for sample in (None, 0, 5, 30, 200):
                for seed in (0, 1):
                    got = load_prompt_file(p, limit=limit, sample=sample, seed=seed, safe_only=safe_only)
                    want = _reference(p, limit=limit, sample=sample, seed=seed, safe_only=safe_only)
                    assert got == want, (safe_only, limit, sample, seed)
                    # idempotent: the API may apply the selection again
                    assert select_rows(got, limit=limit, sample=sample, seed=seed) == got
    assert [r.line for r in load_prompt_file(p, limit=3)] == [1, 3, 4]


@pytest.mark.parametrize("name, content, fragment", [
    ("latin.csv", b"prompt,category\nhello,a\ncaf\xe9,b\n", "line 3: not UTF-8"),
    ("latin.tsv", b"prompt\tcategory\nhello\ta\n\ncaf\xe9\tb\n", "line 4: not UTF-8"),
    ("latin.jsonl", b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n', "line 2: not UTF-8"),
    ("latin.txt", b"hi\nthere\ncaf\xe9\n", "line 3: not UTF-8"),
    ("latin.json", b'[{"prompt": "hi"},\n {"prompt": "caf\xe9"}]\n', "line 2: not UTF-8"),
    ("header.csv", b"pr\xf6mpt\nhi\n", "line 1: not UTF-8"),
])
def test_non_utf8_prompt_sets(tmp_path, name, content, fragment):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_prompt_file(p)
    assert str(err.value) == f"{p}: {fragment} text (save the file as UTF-8)"


def test_eval_cli_non_utf8_csv(tiny_pre, tmp_path, capsys):
    p = tmp_path / "harm.csv"
    p.write_bytes(b"goal\nHow do I pick a lock?\nCaf\xe9 au lait\n")
    out = tmp_path / "out"
    expect_error(["eval", "--model", tiny_pre, "--out", out, "--safety", p, "--no-progress"], capsys,
                 str(p), "line 3: not UTF-8")
    assert not out.exists()


def test_long_lines_big_json_and_many_columns(tmp_path, monkeypatch):
    from mergesafe.evaluate import prompts

    wide = tmp_path / "wide.jsonl"
    wide.write_text(json.dumps({f"column_{i}_" + "y" * 50: i for i in range(2000)}) + "\n")
    with pytest.raises(UserError, match="no prompt column found") as err:
        load_prompt_file(wide)
    assert len(str(err.value)) < 400
    monkeypatch.setattr(prompts, "MAX_LINE_CHARS", 100)
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x" * 500}) + "\n")
    with pytest.raises(UserError, match="line 2: longer than 100 characters"):
        load_prompt_file(p)
    assert [r.prompt for r in load_prompt_file(p, limit=1)] == ["ok"]
    monkeypatch.setattr(prompts, "MAX_JSON_BYTES", 50)
    j = tmp_path / "big.json"
    j.write_text(json.dumps([{"prompt": f"p{i}"} for i in range(20)]))
    with pytest.raises(UserError, match="JSON Lines"):
        load_prompt_file(j)
