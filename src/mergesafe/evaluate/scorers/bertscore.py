"""`bertscore`: BERTScore F1 of each response against its row's reference, by the `bert-score` package.

BERTScore (Zhang et al., "BERTScore: Evaluating Text Generation with BERT", ICLR 2020): with x̂ the
candidate's and x the reference's token embeddings from one layer of a BERT-like model
(L2-normalised; [CLS]/[SEP] left out),
    P = mean_{x̂_j} max_{x_i} x_iᵀx̂_j,   R = mean_{x_i} max_{x̂_j} x_iᵀx̂_j,   F1 = 2PR / (P + R),
without idf weighting.  With `--bertscore-rescale`, F1 is rescaled with the package's baseline b for
that model and layer: F1' = (F1 − b) / (1 − b) (English baselines, shipped inside the package).
The paper (Farn et al., arXiv 2412.19512) scores its medical and tool-use answers with
microsoft/deberta-xlarge-mnli, layer 40, no rescaling.  All of it is computed by
`bert_score.BERTScorer` on the local folder given by `--bertscore-model`; nothing is downloaded.

Which model the folder holds (for the default layer and the baseline file) is found by, in order:
1. `_name_or_path` in its config.json, or 2. the folder's name (or `ORG/NAME` of a Hugging Face
cache folder `models--ORG--NAME/snapshots/REV`), when it names a model of bert_score's
`model2layers` table, in full or by its last part ("deberta-xlarge-mnli"), case-insensitively;
3. else its shape: a `deberta` with hidden size 1024 and 48 layers is deberta-xlarge-mnli when its
labels are MNLI's (an `entailment` label), else deberta-xlarge.
The default layer is that model's entry of `model2layers` (40 for deberta-xlarge-mnli); a model
found by none of the rules needs `--bertscore-layer N`.

The BERT model is loaded once and kept (the last one used) for the rest of the process, so a sweep
loads it once.  A tokenizer without a `model_max_length` gets the model's position count, so a
long response is truncated instead of overflowing the position table.  An empty (or blank)
response has raw P = R = F1 = 0, the package's rule, applied here without calling it (its
empty-text path fails under transformers 5).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mergesafe.errors import UserError, one_line

if TYPE_CHECKING:
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.evaluate.prompts import PromptRow

NAME = "bertscore"
NEEDS_REFERENCE = True
INSTALL = "pip install 'mergesafe[bertscore]'"
PAPER_MODEL = "microsoft/deberta-xlarge-mnli"
BASELINE_LANG = "en"
# model types whose position ids start after the padding index (fairseq heritage)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text")
_UNSET_MAX_LENGTH = 10 ** 9  # transformers' "no limit" is ~1e30

_cache: dict[tuple, Any] = {}  # {(folder, layer, rescale, device, batch): BERTScorer}, at most one


def _package() -> Any:
    try:
        import bert_score
    except ImportError:
        raise UserError(f"--scorer bertscore needs the bert-score package: {INSTALL}") from None
    return bert_score


def _config_json(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("no config.json: --bertscore-model must be a Hugging Face model folder "
                        "(config, weights, tokenizer)", path=folder) from None
    except (OSError, ValueError) as err:
        raise UserError(f"unreadable config.json ({one_line(str(err), 100)})", path=folder) from None
    if not isinstance(data, dict):
        raise UserError("config.json is not a JSON object", path=folder)
    return data


def _table_name(candidate: str, table: dict[str, int]) -> str | None:
    """The key of bert_score's `model2layers` that `candidate` names (in full or by its last part)."""
    wanted = candidate.strip().rstrip("/").lower()
    if not wanted:
        return None
    for key in table:
        if key.lower() == wanted:
            return key
    last = wanted.rsplit("/", 1)[-1]
    for key in table:
        if key.rsplit("/", 1)[-1].lower() == last:
            return key
    return None


def _folder_names(folder: Path) -> list[str]:
    """The folder's own name, and `ORG/NAME` of a Hugging Face cache folder above it."""
    names = [folder.name]
    for parent in folder.parents:
        if parent.name.startswith("models--"):
            names.append(parent.name[len("models--"):].replace("--", "/"))
            break
    return names


def identify(folder: Path, config: dict[str, Any]) -> str | None:
    """bert_score's name of the model in `folder` (rules 1–3 of the module docstring), else None."""
    from bert_score.utils import model2layers

    name_or_path = config.get("_name_or_path")
    if isinstance(name_or_path, str) and (found := _table_name(name_or_path, model2layers)):
        return found
    for name in _folder_names(folder):
        if found := _table_name(name, model2layers):
            return found
    if (config.get("model_type") == "deberta" and config.get("hidden_size") == 1024
            and config.get("num_hidden_layers") == 48):
        labels = config.get("id2label") or {}
        mnli = isinstance(labels, dict) and any(str(v).lower() == "entailment" for v in labels.values())
        return PAPER_MODEL if mnli else "microsoft/deberta-xlarge"
    return None


def _n_layers(config: dict[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def resolve(config: EvalConfig) -> tuple[Path, int, Path | None]:
    """(model folder, layer, baseline file or None), checked; `UserError` for every bad option."""
    package = _package()
    if config.bertscore_model is None:
        raise UserError("--scorer bertscore needs --bertscore-model PATH (a local model folder; the "
                        f"paper's is {PAPER_MODEL}, layer 40)")
    folder = Path(config.bertscore_model).expanduser()
    if not folder.is_dir():
        raise UserError("BERTScore model folder not found (--bertscore-model)" if not folder.exists() else
                        "--bertscore-model must be a folder", path=folder)
    cfg = _config_json(folder)
    name = identify(folder, cfg)
    layer = config.bertscore_layer
    if layer is None:
        if name is None:
            raise UserError("cannot tell which model this is (neither config.json's _name_or_path nor the "
                            "folder name names one of bert_score's models): give --bertscore-layer N",
                            path=folder)
        from bert_score.utils import model2layers

        layer = model2layers[name]
    n_layers = _n_layers(cfg)
    if n_layers is not None and layer > n_layers:
        raise UserError(f"--bertscore-layer {layer}: the model has {n_layers} layers", path=folder)
    baseline = None
    if config.bertscore_rescale:
        if name is None:
            raise UserError("--bertscore-rescale needs the baseline of a model bert_score knows; cannot tell "
                            "which model this is (name the folder after it, e.g. deberta-xlarge-mnli)",
                            path=folder)
        baseline = Path(package.__file__).parent / "rescale_baseline" / BASELINE_LANG / f"{name}.tsv"
        if not baseline.is_file():
            raise UserError(f"bert_score ships no {BASELINE_LANG} rescaling baseline for {name}; "
                            "drop --bertscore-rescale", path=folder)
    return folder, layer, baseline


def check_config(config: EvalConfig, path: Path | None = None) -> None:  # noqa: ARG001 - the registry's hook
    """At load time: the package, the folder (weights validated, no custom code), the layer, the
    baseline, the device."""
    from mergesafe.checkpoint.hf_model import resolve_device
    from mergesafe.checkpoint.inputs import open_model

    folder, _, _ = resolve(config)
    open_model(folder, "--bertscore-model", allow_pickle=config.allow_pickle).close()
    resolve_device(config.device)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "weights not used" warnings and no progress bars while bert_score loads the model."""
    from transformers.utils import logging as hf_logging

    from mergesafe.checkpoint.hf_model import no_hf_progress_bars

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_hf_progress_bars():
            yield
    finally:
        hf_logging.set_verbosity(level)


def scorer_for(config: EvalConfig) -> Any:
    """The `bert_score.BERTScorer` of `config`, loaded once and reused while the options stay the same."""
    from mergesafe.checkpoint.hf_model import resolve_device

    folder, layer, baseline = resolve(config)
    device = str(resolve_device(config.device))
    key = (str(folder.resolve()), layer, baseline, device, config.batch_size)
    if key in _cache:
        return _cache[key]
    check_config(config)
    _cache.clear()  # one BERT model in memory at a time
    bert_score = _package()
    try:
        with _quiet_transformers():
            scorer = bert_score.BERTScorer(
                model_type=str(folder), num_layers=layer, batch_size=config.batch_size, device=device,
                lang=BASELINE_LANG if baseline else None, rescale_with_baseline=baseline is not None,
                baseline_path=str(baseline) if baseline else None)
    except Exception as err:  # noqa: BLE001 - any failure to load the folder is bad input
        raise UserError(f"cannot load the BERTScore model ({type(err).__name__}: "
                        f"{one_line(str(err) or repr(err), 200)})", path=folder) from None
    _limit_length(scorer, _config_json(folder))
    if baseline is not None:
        with warnings.catch_warnings():  # torch's note on the read-only numpy array bert_score hands it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            try:
                scorer.baseline_vals  # read (and checked) now, not halfway through scoring
            except Exception as err:  # noqa: BLE001 - a baseline file without that layer
                raise UserError(f"cannot read the rescaling baseline {baseline} for layer {layer} "
                                f"({type(err).__name__}: {one_line(str(err), 100)})", path=folder) from None
    _cache[key] = scorer
    return scorer


def _limit_length(scorer: Any, cfg: dict[str, Any]) -> None:
    """A tokenizer with no `model_max_length` gets the model's position count (see the docstring)."""
    tokenizer = scorer._tokenizer  # bert_score keeps its tokenizer there; it truncates to this length
    positions = cfg.get("max_position_embeddings")
    if tokenizer.model_max_length < _UNSET_MAX_LENGTH or not isinstance(positions, int):
        return
    if cfg.get("model_type") in _OFFSET_POSITIONS:
        positions -= int(cfg.get("pad_token_id") or 0) + 1
    tokenizer.model_max_length = positions


def score_batch(rows: Sequence[PromptRow], responses: Sequence[str], config: EvalConfig) -> list[dict]:
    """F1 of each response against its row's reference; P and R go to generations.jsonl too."""
    if not responses:
        return []
    scorer = scorer_for(config)
    # An empty (or blank) response: bert_score sets its raw P, R, F to 0 (then rescales them), but
    # its path for empty texts fails under transformers 5, so those are not handed to it.
    empty = [0.0, 0.0, 0.0]
    if scorer.rescale_with_baseline:
        b = scorer.baseline_vals.tolist()  # [P, R, F] of the layer
        empty = [(0.0 - x) / (1.0 - x) for x in b]
    prf = [list(empty) for _ in responses]
    todo = [i for i, resp in enumerate(responses) if resp.strip()]
    if todo:
        try:
            got = scorer.score([responses[i] for i in todo], [rows[i].reference or "" for i in todo],
                               batch_size=config.batch_size)
        except (IndexError, RuntimeError) as err:
            raise UserError(f"BERTScore failed ({type(err).__name__}: {one_line(str(err), 200)}); a text "
                            "longer than the model takes? set model_max_length in its tokenizer_config.json",
                            path=config.bertscore_model) from None
        for i, p, r, f in zip(todo, *(t.tolist() for t in got)):
            prf[i] = [p, r, f]
    return [{"score": float(f), "precision": float(p), "recall": float(r), "verdict": "scored"}
            for p, r, f in prf]


def set_metrics(scores: list[list[float]], config: EvalConfig) -> dict[str, Any]:  # noqa: ARG001
    """What produced the numbers, for metrics.json: the model folder, the layer, rescaled or not."""
    folder, layer, baseline = resolve(config)
    return {"bertscore_model": str(folder), "bertscore_layer": layer, "bertscore_rescaled": baseline is not None}
