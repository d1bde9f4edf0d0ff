"""transformers against vLLM, side by side in one run: generation, and a 5-trial linear sweep.

1. **Generation.**  SmolLM2-135M-Instruct (the cached float32 checkpoint of tests/smollm2.py, or
   --model), the first --prompts AdvBench behaviours, greedy, --max-new-tokens, repetition
   penalty 1.2: `mergesafe eval`'s transformers path (batched, --batch-size) against the vLLM
   engine (`--backend vllm`).  Start-up (model load; for vLLM engine start plus its start-up check)
   and generation are timed separately; tokens/s counts the new tokens of the responses (each
   response re-tokenized the same way for both).
2. **Sweep.**  --trials `linear` merges (λ evenly spread in (0, 1)) of the model and a LoRA
   fine-tune of it (rank 8, random, made here: the same post for every variant), each evaluated
   on the same prompts with the keyword judge:
   * transformers: one live model, merges written into it in place (`TrialWorker`);
   * vLLM, restart: `mergesafe merge` writes each checkpoint, a fresh engine evaluates it;
   * vLLM, in place: one engine on pre, each merge loaded with `reload_weights`
     (`VllmTrialWorker.run_many(lora=False)`); the weight update is timed apart;
   * vLLM, LoRA-batched: every λ as a λ-scaled adapter, one generation pass (its own engine,
     with LoRA on; the in-place engine has LoRA off, as `sweep` starts them).
   Wall time of the trials, and start-up, per variant.

Run in the vLLM environment (`make venv-vllm`), on an idle machine:

    .venv-vllm/bin/python benchmarks/engine_bench.py                 # 128 prompts × 128 tokens, 5 trials
    .venv-vllm/bin/python benchmarks/engine_bench.py --quick         # 8 prompts × 16 tokens, 2 trials

Prints two tables with ratios (vLLM / transformers; in place / restart).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
ADVBENCH = ROOT.parent / "shared" / "data" / "advbench_harmful_behaviors.csv"


def smollm2(model: str | None) -> Path:
    if model:
        return Path(model)
    sys.path.insert(0, str(ROOT / "tests"))
    import smollm2 as fixture  # the cached dequantised checkpoint (made once)

    return fixture.smollm2_checkpoint()


def prompts_file(n: int, folder: Path) -> tuple[Path, list[str]]:
    with ADVBENCH.open(newline="", encoding="utf-8") as fh:
        goals = [row["goal"] for row in csv.DictReader(fh)][:n]
    path = folder / "advbench.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["goal"], *([g] for g in goals)])
    return path, goals


def new_tokens(tok, responses: list[str]) -> int:
    return sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses)


def generation(model: Path, prompts: list[str], args) -> list[dict]:
    from mergesafe.checkpoint.hf_model import load_for_generation
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.evaluate.generate import generate_responses
    from mergesafe.evaluate.vllm_engine import VllmGenerator

    rows = []
    t0 = time.perf_counter()
    hf_model, tok = load_for_generation(model)
    t1 = time.perf_counter()
    hf = generate_responses(hf_model, tok, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            repetition_penalty=1.2)
    t2 = time.perf_counter()
    rows.append(dict(engine="transformers", start=t1 - t0, gen=t2 - t1, tokens=new_tokens(tok, hf)))
    del hf_model
    gen = VllmGenerator(model, tok, EvalConfig(backend="vllm", max_new_tokens=args.max_new_tokens))
    try:
        t0 = time.perf_counter()
        gen.start()
        t1 = time.perf_counter()
        vl = gen(prompts)
        t2 = time.perf_counter()
    finally:
        gen.close()
    rows.append(dict(engine="vLLM", start=t1 - t0, gen=t2 - t1, tokens=new_tokens(tok, vl)))
    same = sum(a == b for a, b in zip(hf, vl))
    print(f"responses identical between the engines: {same}/{len(prompts)}")
    return rows


def make_lora(model: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(out))
    return out


def sweep_variants(model: Path, harm: Path, work: Path, args) -> list[dict]:
    from mergesafe.checkpoint.hf_model import load_tokenizer
    from mergesafe.evaluate.api import evaluate_loaded, load_eval_sets
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.evaluate.judges.keyword import KeywordJudge
    from mergesafe.evaluate.vllm_engine import VllmGenerator
    from mergesafe.merge.api import merge
    from mergesafe.merge.registry import validate_params
    from mergesafe.sweep.vllm_worker import VllmTrialWorker
    from mergesafe.sweep.worker import Trial, TrialWorker, WorkerSpec

    post = make_lora(model, work / "lora")
    weights = [round((i + 1) / (args.trials + 1), 4) for i in range(args.trials)]
    params = validate_params("linear", {})
    trials = [Trial("linear", w, params, f"t{i}") for i, w in enumerate(weights)]
    common = dict(safety=[harm], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    hf_cfg, vl_cfg = EvalConfig(**common), EvalConfig(backend="vllm", **common)
    rows = []

    t0 = time.perf_counter()
    worker = TrialWorker(WorkerSpec(pre=model, posts=[post], tokenizer_source=model, eval_config=hf_cfg))
    t1 = time.perf_counter()
    out = list(worker.run_many(trials))
    rows.append(dict(variant="transformers (live model)", start=t1 - t0, trials=time.perf_counter() - t1,
                     update=sum(r["seconds"]["merge"] for r, _ in out)))
    del worker

    tok = load_tokenizer(model)
    sets = load_eval_sets(vl_cfg)
    t1 = time.perf_counter()
    starts = 0.0
    for trial in trials:
        ckpt = merge(model, post, work / f"restart-{trial.key}", method="linear", weight=trial.weight)
        gen = VllmGenerator(ckpt, tok, vl_cfg)
        try:
            s = time.perf_counter()
            gen.start()
            starts += time.perf_counter() - s
            evaluate_loaded(None, tok, sets, vl_cfg, judge=KeywordJudge(), generator=gen)
        finally:
            gen.close()
    rows.append(dict(variant="vLLM, engine restart per trial", start=0.0, trials=time.perf_counter() - t1,
                     update=starts, note="engine starts are inside the trials"))

    # one engine each, as `sweep` starts them: LoRA off for in place (a LoRA-enabled engine
    # generates slower even without an adapter), on for the λ-scaled adapters
    for variant, lora in (("vLLM, in place", False), ("vLLM, LoRA-batched", True)):
        t0 = time.perf_counter()
        worker = VllmTrialWorker(WorkerSpec(pre=model, posts=[post], tokenizer_source=model, eval_config=vl_cfg,
                                            serve_lora=lora))
        start = time.perf_counter() - t0
        try:
            t1 = time.perf_counter()
            out = list(worker.run_many(trials, lora=lora))
            rows.append(dict(variant=variant, start=start, trials=time.perf_counter() - t1,
                             update=sum(r["seconds"]["merge"] for r, _ in out),
                             gen=sum(r["seconds"]["eval"] for r, _ in out)))
        finally:
            worker.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="8 prompts × 16 tokens, 2 trials (a check that it runs)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.trials = 8, 16, 2
    import torch

    model = smollm2(args.model)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        harm, prompts = prompts_file(args.prompts, Path(tmp))
        print(f"{model}: {len(prompts)} AdvBench prompts × {args.max_new_tokens} new tokens, greedy, "
              f"batch {args.batch_size}; {device}")
        gen_rows = generation(model, prompts, args)
        base = gen_rows[0]["tokens"] / gen_rows[0]["gen"]
        print(f"\n{'engine':<14}{'start-up s':>12}{'generation s':>14}{'new tokens':>12}{'tokens/s':>10}{'× hf':>7}")
        for r in gen_rows:
            rate = r["tokens"] / r["gen"]
            print(f"{r['engine']:<14}{r['start']:>12.1f}{r['gen']:>14.1f}{r['tokens']:>12d}{rate:>10.0f}"
                  f"{rate / base:>7.2f}")
        sweep_rows = sweep_variants(model, harm, Path(tmp), args)
    print(f"\n{args.trials}-trial linear sweep (LoRA post, rank 8), {len(prompts)} prompts each")
    print(f"{'variant':<34}{'start-up s':>11}{'trials s':>10}{'update s':>10}{'× hf':>7}{'× restart':>10}")
    hf_t, restart_t = sweep_rows[0]["trials"] + sweep_rows[0]["start"], sweep_rows[1]["trials"]
    for r in sweep_rows:
        total = r["trials"] + r["start"]
        print(f"{r['variant']:<34}{r['start']:>11.1f}{r['trials']:>10.1f}{r['update']:>10.2f}"
              f"{total / hf_t:>7.2f}{total / restart_t:>10.2f}")
    in_place = sweep_rows[2]
    print(f"\nweight updates: {in_place['update']:.2f} s = {100 * in_place['update'] / in_place['gen']:.1f}% of the "
          f"in-place trials' evaluation time ({in_place['gen']:.1f} s); 'update s' of the restart row = its "
          f"engine starts. × columns compare wall time with start-up included (the restart row's starts are "
          f"inside its trials).")


if __name__ == "__main__":
    main()
