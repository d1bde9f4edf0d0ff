"""The sweep's worker on vLLM (`--backend vllm`): one engine on pre, each merge loaded in place.

The engine starts once per worker, on pre (:class:`~mergesafe.evaluate.vllm_engine.VllmGenerator`:
the same prompts, decoding and start-up check as `eval --backend vllm`).  For each trial:

1. :class:`~mergesafe.sweep.live.MergeState` computes every tensor of the merge (method, λ) with
   the merge engine's own per-tensor plan (`pair_plan` / `merge_pair`, the function the streamed
   `mergesafe merge` runs), cast to pre's stored dtype as `mergesafe merge` writes it;
2. the (HF name, tensor) pairs go into the running engine in place: the model runner's
   `reload_weights(weights_iterator=...)` (vLLM's checkpoint loaders, so the CPU backend's
   repacking and tensor-parallel sharding happen as at start-up), sent with
   `LLM.collective_rpc` (in this process a plain call; with the engine in its own processes the
   pairs are sent to every rank);
3. `LLM.reset_prefix_cache()`: vLLM does not invalidate cached prefix KV when weights change.

No merged checkpoint is written.  A trial's responses are those of a fresh engine started on the
checkpoint `mergesafe merge` writes for the same (method, λ) (`tests/test_sweep_vllm.py`).
Results rows, keys and generations are those of :class:`~mergesafe.sweep.worker.TrialWorker`.

**A LoRA post, `linear` / `task_arithmetic`: λ-scaled adapters in one batch.**  With post =
pre + s·B·A (s = lora_alpha/r, or /√r with rsLoRA), these merges are pre + c·s·B·A, where c is
the merge's coefficient of post − pre (λ for `linear` and `task_arithmetic` at their default
parameters; computed by the merge engine itself on a probe: c = merge(pre = 0, post = 1)).  Each
such trial is served as an adapter whose `lora_B` is c·B (in a temporary folder, removed after
the pass), and pre, post and every λ of the grid are generated in one pass (`LoRARequest` per
prompt; the engine keeps pre's weights: no reload at all).  The rows get `"lora_batch": N` (the trials that
shared the pass).  Where vLLM cannot serve the adapter (DoRA, `modules_to_save`, embedding or
per-module ranks, a rank above 512), those trials load merged weights in place, with one note.
LoRA is on in the engine only when `WorkerSpec.serve_lora` (the sweep sets it when its methods
include one of :data:`LORA_METHODS`): a LoRA-enabled engine generates slower even with no adapter
in a request.

Bad input: a post with another vocabulary size than pre (the engine's embedding is pre's) is
one line.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError
from mergesafe.sweep.worker import Row, Trial, WorkerSpec


LORA_METHODS = ("linear", "task_arithmetic")  # pre + c·(post − pre): a scaled adapter
MAX_LORA_SLOTS = 16  # adapters in one generation pass (vLLM's max_loras)


def reload_weights(worker: Any, pairs: Iterable[tuple[str, Any]]) -> None:
    """Run on each vLLM worker (`LLM.collective_rpc`): load (HF name, tensor) pairs in place."""
    worker.model_runner.reload_weights(weights_iterator=iter(pairs))


class VllmTrialWorker:
    """`run(trial)` loads the merge into the engine in place, evaluates, and returns the results row."""

    def __init__(self, spec: WorkerSpec, *, sets: Any = None, inputs: Any = None, tokenizer: Any = None) -> None:
        import os

        from mergesafe.checkpoint.hf_model import load_tokenizer
        from mergesafe.evaluate.api import config_judge, load_eval_sets
        from mergesafe.evaluate.vllm_engine import VllmGenerator, require_vllm
        from mergesafe.sweep.live import LiveMerge, MergeState

        require_vllm()
        self.spec = spec
        config = spec.eval_config
        self.sets = sets if sets is not None else load_eval_sets(config)
        if inputs is None:
            inputs = LiveMerge.open_inputs(spec.pre, spec.posts, anchor=spec.anchor,
                                           allow_pickle=spec.allow_pickle)
        _check_same_shapes(inputs)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer_source)
        self.state = MergeState(inputs, list(inputs.pre.names()))
        # in this process (a plain call, pairs streamed) unless the engine runs its own processes
        self.in_process = (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
                           and (config.tensor_parallel_size or 1) == 1)
        self.notes: list[str] = []
        self.adapter, rank = self._servable_adapter(inputs) if spec.serve_lora else (None, 0)
        self.generator = VllmGenerator(spec.pre, self.tokenizer, _beside_a_judge(config),
                                       lora_slots=MAX_LORA_SLOTS if self.adapter is not None else 0,
                                       lora_rank=rank)
        self.llm = self.generator.start()  # the engine on pre, checked against transformers (CPU)
        self.loaded: Trial | None = None  # whose weights the engine holds (None: pre's, as started)
        self.lora_dir: Path | None = None  # the λ-scaled adapters, removed by close()
        self.lora_ids = 0
        try:
            self.judge = config_judge(config, shared=True)  # a model judge: its own engine, beside
        except BaseException:
            self.close()
            raise

    def ready(self) -> bool:
        return True

    def _servable_adapter(self, inputs: Any) -> tuple[Any, int]:
        """(the one post when it is a LoRA adapter vLLM serves, its vLLM rank), else (None, 0);
        an adapter it cannot serve gets the note of the module docstring."""
        from mergesafe.evaluate.vllm_engine import adapter_rank

        if len(inputs.posts) != 1 or not hasattr(inputs.posts[0], "adapter_config"):
            return None, 0
        post = inputs.posts[0]
        cfg = post.adapter_config
        reason = None
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            reason = "per-module ranks or alphas"
        elif any("lora_embedding" in k or "magnitude" in k for k in post.raw_keys()):
            reason = "embedding LoRA or DoRA weights"
        else:
            try:
                return post, adapter_rank(post.dir)
            except UserError as err:
                reason = str(err.args[0] if err.args else err)
        self.notes.append(f"vLLM cannot serve the adapter {post.dir} as LoRA ({reason}); its linear and "
                          "task_arithmetic trials load merged weights in place")
        return None, 0

    def load(self, trial: Trial) -> None:
        """Load the merge of `trial` into the engine in place and reset the prefix cache."""
        pairs = ((name, tensor.to(self.state.dtypes[name])) for name, tensor in
                 self.state.merged(trial.method, trial.weight, trial.params, self.spec.seed, post=trial.post))
        self.llm.collective_rpc(reload_weights, args=(pairs if self.in_process else list(pairs),))
        self.llm.reset_prefix_cache()
        self.loaded = None if trial.method == "pre" else trial

    def lora_coefficient(self, trial: Trial) -> float | None:
        """c of the module docstring when `trial` can be served as a scaled adapter, else None."""
        import torch

        from mergesafe.merge.engine import merge_tensor

        if self.adapter is None or trial.post is not None:
            return None
        if trial.method == "pre":
            return 0.0
        if trial.method == "post":
            return 1.0
        if trial.method not in LORA_METHODS:
            return None
        return float(merge_tensor(trial.method, "lora-coefficient", torch.zeros(1), [torch.ones(1)],
                                  [trial.weight], trial.params, self.spec.seed)[0])

    def _scaled_adapter(self, c: float) -> Any:
        """A `LoRARequest` for the adapter with `lora_B` × c (written once per call)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.lora_dir is None:
            self.lora_dir = Path(tempfile.mkdtemp(prefix="mergesafe-lora-"))
        self.lora_ids += 1
        folder = self.lora_dir / f"adapter-{self.lora_ids}"
        folder.mkdir()
        shutil.copyfile(self.adapter.dir / "adapter_config.json", folder / "adapter_config.json")
        post = self.adapter
        tensors = {k: (post.raw(k).float() * c if ".lora_B" in k else post.raw(k).float()).contiguous()
                   for k in post.raw_keys()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return LoRARequest(f"lambda-{self.lora_ids}", self.lora_ids, str(folder))

    def generate(self, prompts: Sequence[str], progress: Any = None, sampling: Any = None) -> list[str]:
        """The engine's responses (the engine stays up: `evaluate_loaded` closes only a
        `VllmGenerator` it is handed itself)."""
        return self.generator(prompts, progress, sampling)

    def run(self, trial: Trial) -> tuple[Row, list[Row]]:
        """The trial's results row and its per-prompt rows (eval's `generations.jsonl` rows)."""
        return next(iter(self.run_many([trial])))

    def run_many(self, trials: Sequence[Trial], started: Callable[[Trial], None] | None = None, *,
                 lora: bool = True) -> Iterator[tuple[Row, list[Row]]]:
        """(row, generations) of every trial, as each ends: first those served as λ-scaled
        adapters, in batches of up to :data:`MAX_LORA_SLOTS` (`lora=False`: none), then the
        others, each loaded in place.  `started(trial)` is called as a trial begins."""
        coefficients = {t.key: self.lora_coefficient(t) for t in trials} if lora else {}
        served = [t for t in trials if coefficients.get(t.key) is not None]
        if not any(t.method != "pre" for t in served):
            served = []
        for i in range(0, len(served), MAX_LORA_SLOTS):
            yield from self._run_lora_batch(served[i:i + MAX_LORA_SLOTS], coefficients, started)
        for trial in trials:
            if trial not in served:
                if started is not None:
                    started(trial)
                t0 = time.perf_counter()
                self.load(trial)
                yield self._evaluate(trial, self.generate, time.perf_counter() - t0)

    def _run_lora_batch(self, trials: Sequence[Trial], coefficients: dict[str, float | None],
                        started: Callable[[Trial], None] | None) -> Iterator[tuple[Row, list[Row]]]:
        """One generation pass for every trial of `trials` (pre's weights in the engine)."""
        if self.loaded is not None:  # back to pre's weights after a trial in place
            self.load(Trial("pre", 0.0, {}, ""))
        loras, seconds = [], []
        for t in trials:
            t0 = time.perf_counter()
            c = coefficients[t.key]
            loras.append(None if t.method == "pre" else self._scaled_adapter(float(c)))
            seconds.append(time.perf_counter() - t0)
        cache: dict[tuple[Any, ...], list[list[str]]] = {}
        try:
            for j, trial in enumerate(trials):
                if started is not None:
                    started(trial)

                def generate(prompts: Sequence[str], progress: Any = None, sampling: Any = None,
                             j: int = j) -> list[str]:
                    key = (tuple(prompts), repr(sampling))  # every trial asks for the same prompts
                    if key not in cache:
                        cache[key] = self.generator.generate_many(prompts, loras, sampling)
                    if progress is not None:
                        progress(len(prompts))
                    return cache[key][j]

                row, generations = self._evaluate(trial, generate, seconds[j])
                row["lora_batch"] = len(trials)
                yield row, generations
        finally:  # vLLM read them at the pass; their ids are never used again
            for lora in loras:
                if lora is not None:
                    shutil.rmtree(lora.lora_path, ignore_errors=True)

    def _evaluate(self, trial: Trial, generate: Callable[..., list[str]],
                  merge_seconds: float) -> tuple[Row, list[Row]]:
        from mergesafe.evaluate.api import evaluate_loaded

        t1 = time.perf_counter()
        generations: list[Row] = []
        metrics = evaluate_loaded(None, self.tokenizer, self.sets, self.spec.eval_config, judge=self.judge,
                                  rows_out=generations, generator=generate, model_name=str(self.spec.pre))
        t2 = time.perf_counter()
        row = {"method": trial.method, "weight": trial.weight, "params": trial.params,
               "safety": metrics["safety"], "over_refusal": metrics["over_refusal"],
               "task": metrics["task"], "key": trial.key, "seed": self.spec.seed,
               "seconds": {"merge": round(merge_seconds, 4), "eval": round(t2 - t1, 4)}}
        if trial.post is not None:
            row["post"] = str(self.spec.posts[trial.post])
        return row, generations

    def close(self) -> None:
        """Shut the engine down and free its memory; remove the λ-scaled adapters."""
        self.generator.close()
        if hasattr(self, "judge") and hasattr(self.judge, "close"):
            self.judge.close()
        if self.lora_dir is not None:
            shutil.rmtree(self.lora_dir, ignore_errors=True)
            self.lora_dir = None


def _beside_a_judge(config: Any) -> Any:
    """The generator's settings: with a model judge on vLLM too, each engine takes a share of the
    GPU's memory (unless --gpu-memory-utilization is given)."""
    from mergesafe.evaluate.judges.registry import judge_folder
    from mergesafe.evaluate.judges.vllm_judge import SHARED_GPU_SHARE

    if config.gpu_memory_utilization is None and judge_folder(config.judge) is not None:
        return config.model_copy(update={"gpu_memory_utilization": SHARED_GPU_SHARE})
    return config


def check_inputs(inputs: Any) -> None:
    """Before any work: vLLM importable, pre an architecture vLLM runs, the posts of pre's shapes."""
    from mergesafe.evaluate.vllm_engine import check_architecture, require_vllm

    require_vllm()
    check_architecture(inputs.pre.dir)
    _check_same_shapes(inputs)


def _check_same_shapes(inputs: Any) -> None:
    """Every post tensor has pre's shape: the engine runs pre's architecture and vocabulary."""
    pre = inputs.pre
    for post in inputs.posts:
        for name in pre.names():
            a, b = tuple(pre.shape(name)), tuple(post.shape(name))
            if a != b:
                raise UserError(f"tensor '{name}' is {b} in the post model and {a} in pre: a vLLM sweep "
                                "loads every merge into an engine started on pre, so their shapes must "
                                "match (added tokens: use --backend transformers)", path=getattr(post, "dir", None))
