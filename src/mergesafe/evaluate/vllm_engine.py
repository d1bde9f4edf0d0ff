"""vLLM as a generation backend (`--backend vllm`): the same prompts and decoding as transformers.

* **Same prompts.**  Each prompt is rendered once through the chat template
  (:func:`mergesafe.evaluate.generate.chat_texts`) and tokenized without special tokens
  (:func:`mergesafe.evaluate.generate.encode_texts`, the transformers backend's own encoder); vLLM
  gets those token ids (`TokensPrompt`), so no second BOS and no second template can creep in.
* **Same decoding.**  Every request carries an explicit `SamplingParams` (else vLLM would use
  the checkpoint's generation config): greedy (temperature 0) or the task sets' sampling,
  `repetition_penalty` (vLLM, like transformers, divides positive logits and multiplies
  negative ones of every token already in prompt or output; Keskar et al. 2019),
  `max_tokens = max_new_tokens`, stop at the eos ids of the tokenizer and of the generation
  config.  The new token ids are cut at the first eos and decoded by the same tokenizer call as
  transformers' (`skip_special_tokens=True`).
* **Engine.**  One `vllm.LLM` per evaluation, in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`:
  no spawn, no `__main__` guard), `enforce_eager=True` on CPU, a small CPU KV cache
  (`VLLM_CPU_KVCACHE_SPACE=2` GiB), vLLM's log at ERROR; each of these environment variables is
  only set when the user has not set it.  dtype: `--dtype`, default float32 on CPU (vllm-cpu 0.32
  was measured writing wrong text for SmolLM2 in bfloat16) and the checkpoint's (`auto`) on CUDA.
* **Start-up check (CPU).**  After the engine starts, it writes :data:`PROBE_TOKENS` greedy
  tokens for each of :data:`PROBE_PROMPTS`; transformers (float32, CPU) reads the same prompt
  plus those tokens in one forward pass, and every token vLLM chose must be within
  :data:`PROBE_TOLERANCE` nats of transformers' most likely token at its position
  (log p(argmax) − log p(vLLM's token) ≤ tolerance).  A near tie that rounding breaks the other
  way passes; an engine writing other text (a dtype that overflows, wrong weights) is refused
  with one line.  On CUDA the check is skipped (it would load the model a second time).

Bad input: vLLM not installed → the install line for this machine; an architecture vLLM does
not know, a prompt longer than the engine's context, or an engine that cannot start on the
folder → one :class:`UserError` line.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError, one_line
from mergesafe.evaluate.generate import Progress, Sampling, _cut, chat_texts, encode_texts, eos_token_ids

VLLM_INSTALL_CPU = "pip install 'mergesafe[vllm]'"
VLLM_INSTALL_CUDA = "pip install vllm==0.32.0"  # the CUDA release that pins torch 2.13.0, as we do
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: no spawn
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache on CPU
    "VLLM_LOGGING_LEVEL": "ERROR",
}
VLLM_FIELDS = ("dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size")
PROBE_PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.")
PROBE_TOKENS = 16
PROBE_TOLERANCE = 1.0  # nats


def install_line() -> str:
    """The install command for this machine: the CUDA build where torch sees a GPU, else the
    registry's CPU build through mergesafe's extra."""
    import torch

    return VLLM_INSTALL_CUDA if torch.cuda.is_available() else VLLM_INSTALL_CPU


def require_vllm() -> None:
    """vLLM importable, or one line: not installed (with the install command), or installed but
    broken (with the import error)."""
    for k, v in ENGINE_ENV.items():  # read by vLLM at import and at engine start
        os.environ.setdefault(k, v)
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"--backend vllm needs vLLM, which is not installed; install it with: {install_line()}")
    try:
        import vllm  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken install (e.g. a mismatched torchvision)
        raise UserError(f"vLLM is installed but cannot be imported ({type(err).__name__}: "
                        f"{_first_line(err)})") from None


def check_engine_config(config: Any) -> None:
    """The vLLM-only settings are refused with the transformers backend (they would be ignored)."""
    if config.backend == "vllm":
        return
    given = [f"--{f.replace('_', '-')}" for f in VLLM_FIELDS if getattr(config, f, None) is not None]
    if given:
        raise UserError(f"{', '.join(given)} {'are settings' if len(given) > 1 else 'is a setting'} of the "
                        "vLLM engine: give --backend vllm too (the transformers backend loads float32 on "
                        "CPU, the saved dtype on CUDA)")


def on_cpu() -> bool:
    """Whether this vLLM build runs on the CPU (vllm-cpu)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_dtype(config: Any) -> str:
    """`--dtype`, else float32 on CPU and the checkpoint's dtype (`auto`) elsewhere."""
    if getattr(config, "dtype", None):
        return str(config.dtype)
    return "float32" if on_cpu() else "auto"


def check_architecture(path: Path) -> None:
    """The model's `architectures` (config.json) must be one vLLM implements."""
    import vllm
    from vllm import ModelRegistry

    cfg_path = Path(path) / "config.json"
    try:
        archs = json.loads(cfg_path.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        raise UserError("cannot read config.json", path=cfg_path) from None
    supported = set(ModelRegistry.get_supported_archs())
    if not archs:
        raise UserError("config.json names no architecture ('architectures'), so vLLM cannot load it",
                        path=cfg_path)
    if not any(str(a) in supported for a in archs):
        raise UserError(f"vLLM {vllm.__version__} cannot load the architecture "
                        f"{', '.join(str(a)[:60] for a in archs[:3])} (use --backend transformers)",
                        path=cfg_path)


def check_head_size(head_size: int, hint: str | None = None) -> None:
    """On CPU, vllm-cpu's attention runs only the head sizes its backend lists (32, 64, 80, ...
    in 0.32); another is one line (`hint`: what to use instead).  Elsewhere: no check."""
    if not on_cpu():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM layout: the engine says it at start-up
        return
    if head_size not in sizes:
        raise UserError(f"vLLM on CPU runs attention head sizes {', '.join(map(str, sizes))}; this model's "
                        f"is {head_size}" + (f" (use {hint}, or --backend transformers)" if hint else
                                             " (use --backend transformers)"))


def adapter_rank(adapter: Path) -> int:
    """The LoRA rank of a PEFT adapter, checked against what vLLM serves (no DoRA, no
    `modules_to_save`, ranks vLLM accepts)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("use_dora"):
        raise UserError("vLLM cannot serve a DoRA adapter; merge it first (mergesafe merge) or use "
                        "--backend transformers", path=adapter)
    if cfg.get("modules_to_save"):
        raise UserError("vLLM cannot serve an adapter with modules_to_save; merge it first "
                        "(mergesafe merge) or use --backend transformers", path=adapter)
    r = int(cfg.get("r") or 0)
    ranks = [p for p in (1, 8, 16, 32, 64, 128, 256, 320, 512) if p >= r]
    if not ranks:
        raise UserError(f"vLLM cannot serve LoRA rank {r} (at most 512)", path=adapter)
    return ranks[0]


def start_engine(path: Path, config: Any, adapter: Path | None = None, *, lora_slots: int = 0,
                 lora_rank: int = 0) -> Any:
    """A `vllm.LLM` on the model folder with the settings of `config` (see the module docstring).
    `adapter`: LoRA on, one slot, its rank; else `lora_slots` > 0: LoRA on with that many adapters
    in one batch, of rank up to `lora_rank` (the sweep's λ-scaled adapters)."""
    require_vllm()
    check_architecture(path)
    from vllm import LLM

    cpu = on_cpu()
    kwargs: dict[str, Any] = {"dtype": engine_dtype(config), "seed": 0, "enforce_eager": cpu,
                              "tokenizer": str(path), "trust_remote_code": False,
                              "use_tqdm_on_load": False}
    for f in ("max_model_len", "gpu_memory_utilization", "tensor_parallel_size"):
        if getattr(config, f, None) is not None:
            kwargs[f] = getattr(config, f)
    if adapter is not None:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=adapter_rank(adapter))
    elif lora_slots > 0:
        kwargs.update(enable_lora=True, max_loras=lora_slots, max_lora_rank=lora_rank)
    try:
        with warnings.catch_warnings():  # vLLM's own deprecation noise (e.g. torch.distributed.reduce_op)
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")
            return LLM(model=str(path), **kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - an engine that cannot start on this folder
        raise UserError(f"vLLM cannot start on this model ({type(err).__name__}: {_first_line(err)})",
                        path=path) from None


def close_engine(llm: Any) -> None:
    """Shut the engine down and free its memory (best effort)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    try:
        if core is not None:
            core.shutdown()
    except Exception:  # noqa: BLE001 - already down
        pass
    del llm
    gc.collect()


def sampling_params(n: int, *, max_new_tokens: int, repetition_penalty: float, eos: list[int],
                    sampling: Sampling | None = None) -> list[Any]:
    """One explicit `SamplingParams` per prompt: greedy, or sampled with a per-prompt seed
    (`sampling.seed + i`, so repeated prompts get different, reproducible samples)."""
    from vllm import SamplingParams

    common = dict(max_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                  stop_token_ids=list(eos), detokenize=False)
    if sampling is None:
        return [SamplingParams(temperature=0.0, **common)] * n
    extra = {"top_k": sampling.top_k} if sampling.top_k else {}
    return [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed + i,
                           **extra, **common) for i in range(n)]


def generate_ids(llm: Any, prompt_ids: Sequence[list[int]], params: list[Any],
                 lora: Any = None) -> list[Any]:
    """vLLM's `RequestOutput`s for token-id prompts, in input order; a prompt that does not fit
    the engine's context is one line naming it."""
    from vllm.inputs import TokensPrompt

    limit = llm.llm_engine.model_config.max_model_len
    for i, ids in enumerate(prompt_ids, start=1):
        if len(ids) >= limit:
            raise UserError(f"prompt {i} of {len(prompt_ids)} is {len(ids)} tokens, which leaves no room "
                            f"to answer in the engine's context of {limit} tokens (--max-model-len)")
    return llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params,
                        use_tqdm=False, lora_request=lora)


def check_engine(llm: Any, path: Path, tokenizer: Any, eos: list[int], *, dtype: str,
                 adapter: Path | None = None, lora: Any = None, allow_pickle: bool = False,
                 reference: Path | None = None) -> float:
    """The start-up check of the module docstring; returns the largest gap in nats.
    `reference` is the folder transformers reads (default: `path`, the engine's own)."""
    import torch

    from mergesafe.checkpoint.hf_model import load_causal_lm

    prompts = encode_texts(tokenizer, chat_texts(tokenizer, list(PROBE_PROMPTS)))
    params = sampling_params(len(prompts), max_new_tokens=PROBE_TOKENS, repetition_penalty=1.0, eos=eos)
    outs = generate_ids(llm, prompts, params, lora)
    model = load_causal_lm(reference or path, dtype=torch.float32, device="cpu", allow_pickle=allow_pickle,
                           adapter=adapter)
    model.eval()
    worst, where = 0.0, (0, 0)
    try:
        with torch.inference_mode():
            for k, (ids, out) in enumerate(zip(prompts, outs)):
                new = list(out.outputs[0].token_ids)
                if not new:
                    continue
                logits = model(torch.tensor([ids + new])).logits[0, len(ids) - 1:len(ids) - 1 + len(new)]
                logp = torch.log_softmax(logits.float(), dim=-1)
                gaps = logp.max(dim=-1).values - logp[torch.arange(len(new)), torch.tensor(new)]
                j = int(gaps.argmax())
                if float(gaps[j]) > worst:
                    worst, where = float(gaps[j]), (k, j)
    finally:
        del model
        gc.collect()
    if worst != worst or worst > PROBE_TOLERANCE:  # NaN too
        k, j = where
        raise UserError(f"vLLM at dtype {dtype} writes other text than transformers (float32) on this model: "
                        f"token {j + 1} of its answer to {PROBE_PROMPTS[k]!r} is {worst:.1f} nats below "
                        f"transformers' choice; use --dtype float32", path=path)
    return worst


class VllmGenerator:
    """`generator(prompts, progress, sampling=None)` for :func:`evaluate_loaded` on a vLLM engine.

    The engine starts on the first call (after the prompt sets and the judge spec were checked)
    and is checked (CPU); `close()` frees it.  `prompt_token_ids` holds the token ids vLLM
    received in the last call, as vLLM reports them."""

    def __init__(self, path: Path, tokenizer: Any, config: Any, adapter: Path | None = None, *,
                 lora_slots: int = 0, lora_rank: int = 0) -> None:
        self.path, self.tokenizer, self.config = Path(path), tokenizer, config
        self.adapter = Path(adapter) if adapter is not None else None
        self.lora_slots, self.lora_rank = lora_slots, lora_rank
        self.llm: Any = None
        self.lora: Any = None
        self.eos = eos_token_ids(load_generation_config(self.path), tokenizer)
        self.prompt_token_ids: list[list[int]] = []
        self.probe_gap: float | None = None

    def start(self) -> Any:
        if self.llm is None:
            self.llm = start_engine(self.path, self.config, self.adapter, lora_slots=self.lora_slots,
                                    lora_rank=self.lora_rank)
            if self.adapter is not None:
                from vllm.lora.request import LoRARequest

                self.lora = LoRARequest("adapter", 1, str(self.adapter))
            if on_cpu():
                self.probe_gap = check_engine(self.llm, self.path, self.tokenizer, self.eos,
                                              dtype=engine_dtype(self.config), adapter=self.adapter,
                                              lora=self.lora, allow_pickle=self.config.allow_pickle)
        return self.llm

    def __call__(self, prompts: Sequence[str], progress: Progress | None = None,
                 sampling: Sampling | None = None) -> list[str]:
        if not prompts:
            return []
        self.start()  # sets self.lora (an --adapter) first
        texts = self.generate_many(prompts, [self.lora], sampling)[0]
        if progress is not None:
            progress(len(texts))
        return texts

    def generate_many(self, prompts: Sequence[str], loras: Sequence[Any],
                      sampling: Sampling | None = None) -> list[list[str]]:
        """The responses to `prompts` under each of `loras` (a `LoRARequest`, or None: the
        engine's own weights), all in one generation pass; one list per entry of `loras`.
        Sampled decoding: the same per-prompt seeds under every adapter."""
        if not prompts or not loras:
            return [[] for _ in loras]
        llm = self.start()
        ids = encode_texts(self.tokenizer, chat_texts(self.tokenizer, prompts, self.config.system_prompt))
        params = sampling_params(len(ids), max_new_tokens=self.config.max_new_tokens,
                                 repetition_penalty=self.config.repetition_penalty, eos=self.eos,
                                 sampling=sampling)
        lora = loras[0] if len(loras) == 1 else [r for r in loras for _ in ids]
        outs = generate_ids(llm, ids * len(loras), params * len(loras), lora)
        self.prompt_token_ids = [list(o.prompt_token_ids) for o in outs[:len(ids)]]
        pad = self.eos[0] if self.eos else 0
        texts = [self.tokenizer.decode(_cut(list(o.outputs[0].token_ids), self.eos, pad),
                                       skip_special_tokens=True) for o in outs]
        return [texts[i * len(ids):(i + 1) * len(ids)] for i in range(len(loras))]

    def close(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            close_engine(llm)


def load_generation_config(path: Path) -> Any:
    """The folder's `generation_config.json` (its eos ids), or None."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - an unreadable generation config: the tokenizer's eos only
        return None


def _first_line(err: BaseException) -> str:
    return one_line((str(err).strip().splitlines() or [""])[0], 200)
