"""`--scorer bertscore`: mergesafe's F1 equals `bert_score.score` on the same tiny BERT (built here,
with a WordPiece tokenizer from a vocab file), pairs and layer; the default-layer rule; rescaling with
the package's baseline; the CLI end to end; bad input → exit 2 with one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import expect_error, run_cli
from mergesafe.errors import UserError
from mergesafe.evaluate import EvalConfig, evaluate_loaded, load_eval_sets, load_judge
from mergesafe.evaluate.scorers import bertscore

bert_score = pytest.importorskip("bert_score")

WORDS = ("the a of to and is in it you that was for on are with as his they be at one have this from "
         "or had by word but what some we can out other were all there when up use your how said an "
         "each she which do their time if will way about many then them write would like so these her "
         "long make see him two has look more day could go come did number no most people my over know "
         "water than call first who may down side been now find any new work part take get place made "
         "live where after back little only round man year came show every good me give our under name "
         "city capital paris lima peru france answer madrid spain santiago chile").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), "##s", "##ed", "##ing", ".", ",",
         "?", "!"]
QA = [("Capital of Peru?", "The capital of Peru is Lima."), ("Capital of Chile?", "Santiago"),
      ("Capital of Spain?", "It is Madrid, the city in Spain."), ("Capital of France?", "Paris")]
RESPONSES = {"Capital of Peru?": "Lima is the capital of Peru.", "Capital of Chile?": "I do not know the answer.",
             "Capital of Spain?": "madrid", "Capital of France?": "  "}
LAYER = 2


def make_tiny_bert(folder: Path) -> Path:
    """A 3-layer BERT (random weights, seeded) and a WordPiece tokenizer from a vocab file we write."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, model_max_length=64)
    assert tok.tokenize("the capital of peru") == ["the", "capital", "of", "peru"]
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bs") / "tinybert")


@pytest.fixture()
def qa(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    return path


def fake_generator(prompts, progress):
    if progress:
        progress(len(prompts))
    return [RESPONSES[p] for p in prompts]


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]


def test_f1_equals_bert_score(tiny_bert, qa, tmp_path):
    cfg = EvalConfig(task=[(qa, "bertscore")], bertscore_model=tiny_bert, bertscore_layer=LAYER)
    out = tmp_path / "out"
    m = evaluate_loaded(None, None, load_eval_sets(cfg), cfg, judge=load_judge("keyword"), out=out,
                        generator=fake_generator)
    rows = _rows(out)
    nonempty = [(RESPONSES[q], a) for q, a in QA if RESPONSES[q].strip()]
    P, R, F = bert_score.score([c for c, _ in nonempty], [r for _, r in nonempty], model_type=str(tiny_bert),
                               num_layers=LAYER)
    got = [r for r in rows if r["response"].strip()]
    assert [r["score"] for r in got] == pytest.approx(F.tolist(), abs=1e-6)
    assert [r["precision"] for r in got] == pytest.approx(P.tolist(), abs=1e-6)
    assert [r["recall"] for r in got] == pytest.approx(R.tolist(), abs=1e-6)
    assert len(set(round(x, 4) for x in F.tolist())) == 3  # the pairs really differ
    # an empty (whitespace) response scores 0, as the package sets it (its own empty-text path
    # fails under transformers 5, so mergesafe does not call it for those)
    empty = [r for r in rows if not r["response"].strip()]
    assert [(r["score"], r["precision"], r["recall"]) for r in empty] == [(0.0, 0.0, 0.0)]
    entry = json.loads((out / "metrics.json").read_text())["task"]["qa"]
    assert entry["score"] == pytest.approx(sum(F.tolist()) / 4, abs=1e-6) == m["task"]["qa"]["score"]
    assert (entry["n"], entry["scorer"], entry["bertscore_layer"]) == (4, "bertscore", LAYER)
    assert entry["bertscore_model"] == str(tiny_bert) and entry["bertscore_rescaled"] is False
    assert {r["verdict"] for r in rows} == {"scored"}
    # loaded once: the same BERTScorer serves the next evaluation
    assert bertscore.scorer_for(cfg) is bertscore.scorer_for(cfg.model_copy())


def test_rescale_with_the_package_baseline(tmp_path, qa):
    # named after a model bert_score knows, so its shipped baseline (en/bert-base-uncased.tsv) applies
    folder = make_tiny_bert(tmp_path / "bert-base-uncased")
    cfg = EvalConfig(task=[(qa, "bertscore")], bertscore_model=folder, bertscore_layer=LAYER,
                     bertscore_rescale=True)
    m = evaluate_loaded(None, None, load_eval_sets(cfg), cfg, judge=load_judge("keyword"),
                        generator=fake_generator)
    baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / "bert-base-uncased.tsv"
    nonempty = [(RESPONSES[q], a) for q, a in QA if RESPONSES[q].strip()]
    _, _, F = bert_score.score([c for c, _ in nonempty], [r for _, r in nonempty], model_type=str(folder),
                               num_layers=LAYER, lang="en", rescale_with_baseline=True,
                               baseline_path=str(baseline))
    # the empty response: raw 0 rescaled, (0 − b) / (1 − b) with b the baseline's F of layer 2
    b = float(baseline.read_text().splitlines()[1 + LAYER].split(",")[3])
    expected = sum(F.tolist()) + (0 - b) / (1 - b)
    assert m["task"]["qa"]["score"] == pytest.approx(expected / 4, abs=1e-6)
    assert m["task"]["qa"]["bertscore_rescaled"] is True


def _config_only(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_default_layer_rule(tmp_path):
    def layer(folder):
        return bertscore.resolve(EvalConfig(bertscore_model=folder))[1]

    deberta = dict(model_type="deberta", hidden_size=1024, num_hidden_layers=48)
    mnli = {"0": "CONTRADICTION", "1": "NEUTRAL", "2": "ENTAILMENT"}
    assert layer(_config_only(tmp_path / "deberta-xlarge-mnli", model_type="deberta")) == 40  # folder name
    assert layer(_config_only(tmp_path / "a", **deberta, id2label=mnli)) == 40  # shape + MNLI labels
    assert layer(_config_only(tmp_path / "b", **deberta)) == 18  # deberta-xlarge
    hub = tmp_path / "hub" / "models--microsoft--deberta-xlarge-mnli" / "snapshots" / "0123abc"
    assert layer(_config_only(hub, model_type="deberta")) == 40  # a Hugging Face cache folder
    assert layer(_config_only(tmp_path / "c", _name_or_path="/models/roberta-large")) == 17
    assert layer(_config_only(tmp_path / "d", _name_or_path="bert-base-uncased")) == 9
    unknown = _config_only(tmp_path / "mystery", model_type="bert", num_hidden_layers=4)
    with pytest.raises(UserError, match="give --bertscore-layer N"):
        layer(unknown)
    assert bertscore.resolve(EvalConfig(bertscore_model=unknown, bertscore_layer=3))[1] == 3
    with pytest.raises(UserError, match="the model has 4 layers"):
        bertscore.resolve(EvalConfig(bertscore_model=unknown, bertscore_layer=5))
    with pytest.raises(UserError, match="--bertscore-rescale needs the baseline"):
        bertscore.resolve(EvalConfig(bertscore_model=unknown, bertscore_layer=3, bertscore_rescale=True))
    odd = _config_only(tmp_path / "deberta-v3-xsmall", model_type="deberta-v2")  # known, no baseline shipped
    with pytest.raises(UserError, match="ships no en rescaling baseline for microsoft/deberta-v3-xsmall"):
        bertscore.resolve(EvalConfig(bertscore_model=odd, bertscore_rescale=True))


def test_cli_end_to_end_on_the_tiny_model(tiny_bert, tiny_pre, qa, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["eval", "--model", tiny_pre, "--out", out, "--task", qa, "--scorer", "bertscore",
                                 "--bertscore-model", tiny_bert, "--bertscore-layer", LAYER,
                                 "--max-new-tokens", "6", "--no-progress"], capsys)
    assert code == 0, err
    assert "bertscore" in stdout
    rows = _rows(out)
    scored = [(r["response"], r["reference"], r["score"]) for r in rows if r["response"].strip()]
    assert scored, "the tiny model gave only empty responses"
    _, _, F = bert_score.score([c for c, _, _ in scored], [r for _, r, _ in scored], model_type=str(tiny_bert),
                               num_layers=LAYER)
    assert [s for _, _, s in scored] == pytest.approx(F.tolist(), abs=1e-6)
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"]["qa"]["score"] == pytest.approx(sum(r["score"] for r in rows) / len(QA), abs=1e-6)


def test_cli_bad_input(tiny_bert, tiny_pre, qa, tmp_path, capsys, monkeypatch):
    base = ["eval", "--model", tiny_pre, "--out", tmp_path / "out", "--task", qa, "--scorer", "bertscore"]
    expect_error(base, capsys, "needs --bertscore-model PATH")
    expect_error([*base, "--bertscore-model", tmp_path / "nope"], capsys, "nope: BERTScore model folder not found")
    expect_error([*base, "--bertscore-model", tiny_bert], capsys, "tinybert: cannot tell which model",
                 "give --bertscore-layer N")
    expect_error([*base, "--bertscore-model", tiny_bert, "--bertscore-layer", "7"], capsys, "the model has 3 layers")
    expect_error([*base, "--bertscore-model", tiny_bert, "--bertscore-layer", "2", "--bertscore-rescale"], capsys,
                 "--bertscore-rescale needs the baseline")
    no_weights = _config_only(tmp_path / "noweights", model_type="bert", num_hidden_layers=3)
    expect_error([*base, "--bertscore-model", no_weights, "--bertscore-layer", "2"], capsys, "noweights")
    monkeypatch.setitem(sys.modules, "bert_score", None)  # as if not installed
    expect_error([*base, "--bertscore-model", tiny_bert, "--bertscore-layer", "2"], capsys,
                 "pip install 'mergesafe[bertscore]'")
    assert not (tmp_path / "out").exists()
