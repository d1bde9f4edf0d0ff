"""Benchmark ``mergesafe merge`` against ``mergekit-yaml`` (mergekit 0.1.5) on the same inputs.

Builds a ~220M-parameter Llama pair (pre, post = pre + small noise) in float32 and in bfloat16,
then, for ``linear`` and ``ties`` (density 0.5), runs the two command lines alternately
(``--repeats`` times each, page cache warmed first) and reports wall time and peak RSS of each
child process (GNU ``/usr/bin/time``, else the child's rusage) and the ratios
mergesafe / mergekit.  A second table merges the same width at two depths with mergesafe (and
mergekit) to show that mergesafe's peak RSS does not grow with the number of layers.  Models are
built in child processes so that the measuring process stays small.  Targets (2 cores): linear <= 0.35x and ties <= 0.25x
mergekit's wall time, peak RSS <= 0.5x mergekit's.

    python benchmarks/merge_bench.py [--work DIR] [--repeats 3] [--quick]

``--quick`` uses a ~30M model (for a smoke test).  Needs ``mergekit-yaml`` on PATH or next to
this interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def find_tool(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found (install the test extras: pip install -e '.[test]')")
    return found


def build_model(out: Path, *, vocab: int, hidden: int, inter: int, layers: int, heads: int,
                dtype: str, seed: int, base: Path | None = None, noise: float = 0.01) -> Path:
    """Write a Llama checkpoint (config.json + model.safetensors + a small tokenizer) directly
    from random tensors (no module initialisation).  With ``base``: base + noise·N(0, 1)."""
    import torch
    from transformers import LlamaConfig

    from mergesafe.checkpoint import OutEntry, StreamingShardWriter, open_checkpoint

    dtype = getattr(torch, dtype)

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(str(tmp))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    gen = torch.Generator().manual_seed(seed)
    base_ck = open_checkpoint(base) if base is not None else None
    w = StreamingShardWriter(tmp, [OutEntry(n, s, dtype) for n, s in shapes.items()], 10**12)
    for n in w.order:
        if base_ck is not None:
            t = base_ck.get(n).float() + noise * torch.randn(shapes[n], generator=gen)
        elif n.endswith("norm.weight"):
            t = torch.ones(shapes[n])
        else:
            t = 0.02 * torch.randn(shapes[n], generator=gen)
        w.write(n, t.to(dtype))
    w.close()
    from mergesafe.world.tokenizer import train_tokenizer

    train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50,
                    vocab_size=300).save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def nparams(folder: Path) -> int:
    """Parameter count from the safetensors header (no torch needed)."""
    import math
    import struct

    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def build_in_child(out: Path, **kwargs) -> Path:
    """Build a model in a separate process: the measuring process stays small (a child started
    with vfork would otherwise inherit its peak RSS in the kernel's accounting)."""
    if (out / "config.json").exists():
        return out
    spec = json.dumps({"out": str(out), **{k: (str(v) if isinstance(v, Path) else v)
                                          for k, v in kwargs.items()}})
    subprocess.run([sys.executable, __file__, "--build", spec], check=True)
    return out


TIME = "/usr/bin/time"


def run(cmd: list[str], out: Path, env: dict | None = None) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS MiB) of that child.  Peak RSS comes from
    GNU time's report when /usr/bin/time exists, else from the child's rusage."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    use_time = os.path.exists(TIME)
    rss_file = out.with_name(out.name + ".rss")
    full = [TIME, "-f", "%M", "-o", str(rss_file), *cmd] if use_time else cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    if use_time:
        kib = int(rss_file.read_text().split()[-1])
        rss_file.unlink()
    else:
        kib = usage.ru_maxrss
    return wall, kib / 1024


def warm(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def commands(tool: str, work: Path, pre: Path, post: Path, method: str, tag: str):
    ms = find_tool("mergesafe")
    mk = find_tool("mergekit-yaml")
    out_ms = work / f"out_ms_{tag}"
    out_mk = work / f"out_mk_{tag}"
    ms_cmd = [ms, "merge", "--pre", str(pre), "--post", str(post), "--method", method,
              "--weight", "0.5", "--out", str(out_ms), "--quiet"]
    models = [{"model": str(post), "parameters": {"weight": 0.5}}]
    if method == "ties":
        ms_cmd += ["--param", "density=0.5"]
        models[0]["parameters"]["density"] = 0.5
    cfg = {"merge_method": method, "base_model": str(pre), "models": models}
    if method == "linear":
        cfg = {"merge_method": "linear",
               "models": [{"model": str(pre), "parameters": {"weight": 0.5}}, *models]}
    cfg_path = work / f"mk_{tag}.yml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    mk_cmd = [mk, str(cfg_path), str(out_mk)]
    return (ms_cmd, out_ms), (mk_cmd, out_mk)


def bench_pair(work: Path, pre: Path, post: Path, method: str, tag: str, repeats: int) -> dict:
    """Alternate mergesafe and mergekit runs.  mergesafe's first run starts with an empty
    sha256 cache (it hashes every input for its manifest); later runs reuse the digests of
    unchanged files, as repeated merges of the same inputs do."""
    (ms_cmd, out_ms), (mk_cmd, out_mk) = commands("", work, pre, post, method, tag)
    cache = work / f"hash-cache-{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    res = {"mergesafe": [], "mergekit": []}
    for _ in range(repeats):  # alternate
        res["mergesafe"].append(run(ms_cmd, out_ms, {"MERGESAFE_CACHE_DIR": str(cache)}))
        res["mergekit"].append(run(mk_cmd, out_mk))
    row = {}
    for tool, runs in res.items():
        row[tool] = {"wall_s": statistics.median(r[0] for r in runs),
                     "rss_mib": max(r[1] for r in runs), "runs": runs}
    row["mergesafe"]["cold_wall_s"] = res["mergesafe"][0][0]
    row["wall_ratio"] = row["mergesafe"]["wall_s"] / row["mergekit"]["wall_s"]
    row["cold_ratio"] = row["mergesafe"]["cold_wall_s"] / row["mergekit"]["wall_s"]
    row["rss_ratio"] = row["mergesafe"]["rss_mib"] / row["mergekit"]["rss_mib"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergesafe-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a ~30M model instead of ~220M")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--skip-depth", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--methods", default="linear,ties")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        dims = dict(vocab=8000, hidden=512, inter=1408, heads=8, layers=6)
    else:  # 2·32000·1024 + 12·(4·1024² + 3·1024·2816) + norms ≈ 220M
        dims = dict(vocab=32000, hidden=1024, inter=2816, heads=16, layers=12)
    rows = []
    print(f"building models in {work} ...", flush=True)
    for dn in args.dtypes.split(","):
        pre = build_in_child(work / f"pre_{dn}", dtype=dn, seed=0, **dims)
        post = build_in_child(work / f"post_{dn}", dtype=dn, seed=1, base=pre, **dims)
        n = nparams(pre)
        warm(pre), warm(post)
        for method in args.methods.split(","):
            print(f"timing {method} {dn} ({n / 1e6:.0f}M params) ...", flush=True)
            row = bench_pair(work, pre, post, method, f"{method}_{dn}", args.repeats)
            row.update(method=method, dtype=dn, params_m=n / 1e6)
            rows.append(row)
    depth_rows = []
    if not args.skip_depth:
        for layers in ((2, 8) if args.quick else (4, 16)):
            d = dict(dims, layers=layers)
            pre = build_in_child(work / f"pre_depth{layers}", dtype="float32", seed=0, **d)
            post = build_in_child(work / f"post_depth{layers}", dtype="float32", seed=1, base=pre,
                                  **d)
            warm(pre), warm(post)
            print(f"timing linear float32 at {layers} layers ...", flush=True)
            row = bench_pair(work, pre, post, "linear", f"depth{layers}", 2)
            row.update(layers=layers, params_m=nparams(pre) / 1e6)
            depth_rows.append(row)
    targets = {"linear": 0.35, "ties": 0.25}
    print()
    print("| method | dtype | params | mergesafe wall (cold) | mergekit wall | wall ratio (cold) "
          "| target | mergesafe peak RSS | mergekit peak RSS | RSS ratio (target 0.5) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = targets[r["method"]]
        ok_w = "ok" if r["wall_ratio"] <= t else "MISSED"
        ok_r = "ok" if r["rss_ratio"] <= 0.5 else "MISSED"
        print(f"| {r['method']} | {r['dtype']} | {r['params_m']:.0f}M "
              f"| {r['mergesafe']['wall_s']:.2f} s ({r['mergesafe']['cold_wall_s']:.2f} s) "
              f"| {r['mergekit']['wall_s']:.2f} s | {r['wall_ratio']:.2f}x ({r['cold_ratio']:.2f}x) "
              f"| <= {t} {ok_w} | {r['mergesafe']['rss_mib']:.0f} MiB | {r['mergekit']['rss_mib']:.0f} MiB "
              f"| {r['rss_ratio']:.2f}x {ok_r} |")
    print(f"\nwall: median of {args.repeats} alternating runs; (cold): mergesafe's first run, which "
          "also hashes every input file for its manifest (later runs reuse cached digests)")
    if depth_rows:
        print()
        print("| layers | params | mergesafe wall | mergesafe peak RSS | mergekit wall | mergekit peak RSS |")
        print("|---|---|---|---|---|---|")
        for r in depth_rows:
            print(f"| {r['layers']} | {r['params_m']:.0f}M | {r['mergesafe']['wall_s']:.2f} s "
                  f"| {r['mergesafe']['rss_mib']:.0f} MiB | {r['mergekit']['wall_s']:.2f} s "
                  f"| {r['mergekit']['rss_mib']:.0f} MiB |")
    (work / "results.json").write_text(json.dumps({"pairs": rows, "depth": depth_rows}, indent=2))
    print(f"\nraw results: {work / 'results.json'}")
    if not args.keep:
        for p in work.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--build":
        spec = json.loads(sys.argv[2])
        out = Path(spec.pop("out"))
        if spec.get("base"):
            spec["base"] = Path(spec["base"])
        build_model(out, **spec)
    else:
        main()
