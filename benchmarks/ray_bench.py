"""Benchmark: a 12-trial sweep on Ray with 1 worker against 2 workers (1 torch thread each).

The same tiny Llama pair (~3.4M parameters, the miniature world's size), the same prompts and
settings on every side: pre, post and 10 linear λ values = 12 trials.  Each side is one
`mergesafe.sweep` call on a fresh output folder, on a local Ray cluster started once for the
run; the table gives the wall time of the trials (workers loaded, until the last row is written)
and, separately, Ray's start-up (joining the cluster, building the workers).  The one-process
sweep (no Ray, 1 thread) is shown for reference.  Target (issue 12): trials with 2 workers at
most 0.65 × trials with 1.

    .venv/bin/python benchmarks/ray_bench.py [--prompts 24] [--max-new-tokens 24]

On a machine with GPUs (a Ray cluster that has them) pass `--gpu`: one worker per GPU.
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
    ap.add_argument("--prompts", type=int, default=24, help="prompts per set (two sets)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--gpu", action="store_true", help="workers on the cluster's GPUs (one each)")
    args = ap.parse_args()

    import ray
    import torch

    import tiny_models
    from mergesafe.evaluate.config import EvalConfig
    from mergesafe.sweep.api import sweep
    from mergesafe.sweep.ray_pool import RayOptions

    torch.set_num_threads(1)
    weights = [round(0.1 * i, 1) for i in range(1, 11)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pre, post, harm, task = tiny_models.make_bench_world(tmp, args.prompts)
        device = "cuda" if args.gpu else "cpu"
        cfg = EvalConfig(safety=[harm], task=[(task, "numeric")], max_new_tokens=args.max_new_tokens,
                         batch_size=32, device=device)

        def run(name: str, options: RayOptions | None) -> dict:
            t0 = time.perf_counter()
            result = sweep(pre, post, tmp / name, methods=["linear"], weights=weights, eval_config=cfg,
                           progress=False, ray=options)
            wall = time.perf_counter() - t0
            assert result.computed == 12, result.computed
            return {"name": name, "wall": wall, **result.timings}

        rows = [run("one process, no Ray", None)]
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t0
        gpus = int(ray.cluster_resources().get("GPU", 0))
        sides = [("Ray, 1 worker", 1)] + ([("Ray, 2 workers", 2)] if not args.gpu else
                                          [(f"Ray, {gpus} workers", gpus)])
        for name, n in sides:
            rows.append(run(name, RayOptions(workers=n, gpus_per_worker=1 if args.gpu else None,
                                             threads_per_worker=1)))
        ray.shutdown()

    print(f"12 trials: pre, post, linear λ = 0.1 … 1.0 step 0.1 (λ=1.0 merges again); {args.prompts} + "
          f"{args.prompts} prompts × {args.max_new_tokens} new tokens; {os.cpu_count()} cores; "
          f"local Ray cluster started in {start:.1f} s")
    print(f"{'side':<22} {'trials s':>9} {'workers ready s':>16} {'total wall s':>13} {'trials ratio':>13}")
    base = rows[1]["trials"]
    for r in rows:
        print(f"{r['name']:<22} {r['trials']:>9.1f} {r.get('workers_ready', 0):>16.1f} {r['wall']:>13.1f} "
              f"{r['trials'] / base:>13.2f}")
    ratio = rows[2]["trials"] / base
    print(f"\n2 workers / 1 worker (trials): {ratio:.2f}  (target ≤ 0.65: {'met' if ratio <= 0.65 else 'MISSED'})")


if __name__ == "__main__":
    main()
