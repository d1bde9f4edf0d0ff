"""`mergesafe finetune` on the command line: bad input gives exit 2 and one line on stderr
naming the file, and leaves nothing behind; a good run prints its summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mergesafe.cli.main import main

GOOD = {"prompt": "What is the capital of Peru?", "response": "The capital of Peru is Lima."}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["finetune", *argv])
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


def expect_error(argv: list[str], capsys, *fragments: str) -> str:
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mergesafe: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def good_data(tmp_path) -> Path:
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    return path


def _jsonl(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, content, fragments", [
    ("missing.jsonl", None, ["missing.jsonl", "not found"]),
    ("empty.jsonl", "", ["empty.jsonl", "no rows"]),
    ("broken.jsonl", json.dumps(GOOD) + "\n\n" + '{"prompt": "x", "response": \n',
     ["broken.jsonl", "line 3", "malformed JSON"]),
    ("cols.jsonl", json.dumps({"query": "x", "reply": "y"}) + "\n",
     ["cols.jsonl", "no recognisable columns", "found: query, reply", "messages (chat)", "alpaca"]),
    ("noanswer.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"prompt": "x", "response": ""}) + "\n",
     ["noanswer.jsonl", "line 2", "empty response"]),
])
def test_bad_data(tiny_pre, tmp_path, capsys, name, content, fragments):
    data = tmp_path / name
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    expect_error(["--model", str(tiny_pre), "--data", str(data), "--out", str(out)], capsys, *fragments)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_model_without_tokenizer(tiny_pre, good_data, tmp_path, capsys):
    model = shutil.copytree(tiny_pre, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    expect_error(["--model", str(model), "--data", str(good_data), "--out", str(out)], capsys,
                 str(model), "no tokenizer")
    assert not out.exists()


def test_model_without_chat_template(tiny_pre, good_data, tmp_path, capsys):
    model = shutil.copytree(tiny_pre, tmp_path / "model")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    expect_error(["--model", str(model), "--data", str(good_data), "--out", str(out)], capsys,
                 str(model), "no chat template", "--chat-template FILE")
    assert not out.exists()
    # plain-text rows need no template
    text = _jsonl(tmp_path, "text.jsonl", json.dumps({"text": "The capital of Peru is Lima."}) + "\n")
    code, _, err = run(["--model", str(model), "--data", str(text), "--out", str(out), "--max-steps", "1",
                        "--val-size", "0", "--no-progress", "--cpu-threads", "1"], capsys)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file()


def test_out_not_empty(tiny_pre, good_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    expect_error(["--model", str(tiny_pre), "--data", str(good_data), "--out", str(out)], capsys,
                 str(out), "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_cli_full_run_with_overwrite(tiny_pre, good_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run(["--model", str(tiny_pre), "--data", str(good_data), "--out", str(out), "--full",
                        "--max-steps", "2", "--val-size", "0", "--overwrite", "--system-prompt", "Be brief.",
                        "--cpu-threads", "1"], capsys)
    assert code == 0, err
    assert "fine-tuning summary" in err and "full" in err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    manifest = json.loads((out / "mergesafe.json").read_text())
    assert manifest["config"]["lora"] is False and manifest["config"]["system_prompt"] == "Be brief."
    assert manifest["training"]["global_step"] == 2


@pytest.mark.parametrize("flag", [[], ["--allow-pickle"]])
def test_ema_merge_follows_allow_pickle(tiny_pre, good_data, tmp_path, capsys, monkeypatch, flag):
    """`finetune --ema --merge-adapter` merges the EMA adapter with the user's --allow-pickle, never
    with pickle allowed behind their back."""
    import mergesafe.merge.api as merge_api

    real_merge = merge_api.merge
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("allow_pickle"))
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(merge_api, "merge", spy)
    out = tmp_path / "out"
    code, _, err = run(["--model", str(tiny_pre), "--data", str(good_data), "--out", str(out),
                        "--ema", "0.5", "--merge-adapter", "--max-steps", "1", "--val-size", "0",
                        "--no-progress", "--cpu-threads", "1", *flag], capsys)
    assert code == 0, err
    assert seen == [bool(flag)]
    assert (out / "ema" / "adapter").is_dir()
    assert json.loads((out / "mergesafe.json").read_text())["config"]["allow_pickle"] is bool(flag)


def test_failed_run_leaves_no_partial_and_an_empty_partial_blocks_nothing(tiny_pre, good_data, tmp_path,
                                                                           capsys):
    model = shutil.copytree(tiny_pre, tmp_path / "model")
    shard = max(model.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # fails when the trainer loads it, after OUT.partial exists
    out = tmp_path / "new" / "out"
    expect_error(["--model", str(model), "--data", str(good_data), "--out", str(out), "--no-progress"],
                 capsys, str(model))
    assert not (tmp_path / "new").exists()  # nor OUT.partial, nor the parent it made
    (tmp_path / "out.partial" / "empty").mkdir(parents=True)  # left by a run killed before writing
    out = tmp_path / "out"
    code, _, err = run(["--model", str(tiny_pre), "--data", str(good_data), "--out", str(out),
                        "--max-steps", "1", "--val-size", "0", "--no-progress", "--cpu-threads", "1"], capsys)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and not (tmp_path / "out.partial").exists()
    (tmp_path / "out2.partial").mkdir()
    (tmp_path / "out2.partial" / "train_log.jsonl").write_text('{"step": 2}\n')  # something: kept
    expect_error(["--model", str(tiny_pre), "--data", str(good_data), "--out", str(tmp_path / "out2")],
                 capsys, "interrupted run", "--resume")


def test_out_is_the_model_or_a_file_parent(tiny_pre, good_data, tmp_path, capsys):
    model = shutil.copytree(tiny_pre, tmp_path / "model")
    (tmp_path / "other").mkdir()
    before = sorted((p.name, p.stat().st_size) for p in model.iterdir())
    for out in (model, tmp_path / "other" / ".." / "model", model / "sub"):
        expect_error(["--model", str(model), "--data", str(good_data), "--out", str(out), "--overwrite"],
                     capsys, "input", str(model))
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    expect_error(["--model", str(model), "--data", str(good_data), "--out", str(tmp_path / "link" / "model"),
                  "--overwrite"], capsys, "input", str(model))
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    data = shutil.copy(good_data, data_dir / "train.jsonl")
    expect_error(["--model", str(model), "--data", str(data), "--out", str(data_dir), "--overwrite"],
                 capsys, "contains the input", str(data))
    assert data.read_text() == good_data.read_text()
    afile = tmp_path / "afile"
    afile.write_text("x")
    expect_error(["--model", str(model), "--data", str(good_data), "--out", str(afile / "out")], capsys,
                 str(afile), "not a folder")
    assert sorted((p.name, p.stat().st_size) for p in model.iterdir()) == before
    assert afile.read_text() == "x"


def test_failure_during_training_removes_the_work_folder_and_the_parents_it_made(tiny_pre, good_data,
                                                                                 tmp_path):
    from transformers import TrainerCallback

    import mergesafe

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        mergesafe.finetune(tiny_pre, good_data, out, callbacks=[Boom()], max_steps=2, val_size=0,
                           progress=False, cpu_threads=1)
    assert list(tmp_path.iterdir()) == [good_data]  # no OUT.partial, no a/b


def test_no_progress_prints_one_line_per_logging_step(tiny_pre, good_data, tmp_path, capsys):
    import re

    out = tmp_path / "out"
    code, stdout, err = run(["--model", str(tiny_pre), "--data", str(good_data), "--out", str(out),
                             "--max-steps", "4", "--logging-steps", "2", "--val-size", "0", "--no-progress",
                             "--cpu-threads", "1"], capsys)
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for line, row in zip(lines, [r for r in log if "loss" in r]):
        m = re.fullmatch(r"step (\d+)/4  loss (\S+)  lr (\S+)  tokens/s (\d+)", line)
        assert m, line
        assert int(m.group(1)) == row["step"]
        assert float(m.group(2)) == pytest.approx(row["loss"], abs=5e-5)
        assert float(m.group(3)) == pytest.approx(row["lr"], rel=1e-2)
        assert int(m.group(4)) > 0
