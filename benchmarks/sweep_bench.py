"""Benchmark: a 9-point linear sweep (in memory) against 9 evaluations of already-merged models.

Both sides evaluate the same prompts with the same settings on the same ~3.4M-parameter Llama
pair (the miniature world's size).  The "evaluations alone" side loads each merged checkpoint
from disk and evaluates it (the merges are written beforehand and not timed); the sweep side is
one `mergesafe.sweep` call, which also evaluates pre and post (11 evaluations in all) and writes
its report.  Target (issue 5): sweep ≤ 1.5 × the evaluations alone.

    .venv/bin/python benchmarks/sweep_bench.py [--prompts 32] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per set (two sets)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch

    import tiny_models
    from mergesafe.evaluate.api import evaluate_loaded, load_eval_sets, load_judge, load_model
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.merge.api import merge
    from mergesafe.sweep.api import sweep

    torch.set_num_threads(2)
    weights = [round(0.1 * i, 1) for i in range(1, 10)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pre, post, harm, task = tiny_models.make_bench_world(tmp, args.prompts)
        n_params = sum(p.numel() for p in load_model(pre)[0].parameters())
        cfg = EvalConfig(safety=[harm], task=[(task, "numeric")], max_new_tokens=args.max_new_tokens,
                         batch_size=32)
        merged = [merge(pre, post, tmp / f"m{w}", method="linear", weight=w) for w in weights]

        sets = load_eval_sets(cfg)
        judge = load_judge(cfg.judge)

        def evals_alone() -> float:
            t0 = time.perf_counter()
            for path in merged:
                model, tokenizer = load_model(path)
                evaluate_loaded(model, tokenizer, sets, cfg, judge=judge)
            return time.perf_counter() - t0

        def one_sweep(i: int):
            t0 = time.perf_counter()
            result = sweep(pre, post, tmp / f"sweep{i}", methods=["linear"], weights=weights,
                           eval_config=cfg, progress=False)
            return time.perf_counter() - t0, result

        # Alternate A B B A so that a change in the machine's load hits both sides alike.
        a1 = evals_alone()
        b1, result = one_sweep(1)
        b2, _ = one_sweep(2)
        a2 = evals_alone()
        t_evals, t_sweep = (a1 + a2) / 2, (b1 + b2) / 2
        n_trials = len(result.rows)
        merge_s = sum(r["seconds"]["merge"] for r in result.rows)
        eval_s = sum(r["seconds"]["eval"] for r in result.rows)

    print(f"model: Llama {n_params / 1e6:.1f}M parameters, {2 * args.prompts} prompts, "
          f"{args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print(f"runs (A B B A): evaluations alone {a1:.1f} s, {a2:.1f} s; sweeps {b1:.1f} s, {b2:.1f} s")
    print(f"{'what (mean of two runs)':<52}{'seconds':>10}{'per model':>12}")
    print(f"{'9 evaluations of merged checkpoints (load + eval)':<52}{t_evals:>10.1f}{t_evals / 9:>12.2f}")
    print(f"{f'sweep, 9 λ + pre + post = {n_trials} trials (all in)':<52}{t_sweep:>10.1f}"
          f"{t_sweep / n_trials:>12.2f}")
    print(f"{'  of which in-memory merging':<52}{merge_s:>10.2f}{merge_s / n_trials:>12.3f}")
    print(f"{'  of which evaluation':<52}{eval_s:>10.1f}{eval_s / n_trials:>12.2f}")
    print(f"ratio sweep / evaluations alone: {t_sweep / t_evals:.2f}x (target <= 1.5x); "
          f"per evaluated model: {(t_sweep / n_trials) / (t_evals / 9):.2f}x")


if __name__ == "__main__":
    main()
