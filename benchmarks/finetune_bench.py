"""Training throughput of `mergesafe finetune` on the miniature world's model size.

A Llama of about 3.4M parameters (hidden 256, 4 layers, intermediate 688, BPE vocab 512), random
weights, trained on synthetic chat rows (about 40-60 tokens each, batch 8) through the real
`mergesafe.finetune.api.finetune`, LoRA and full.  Prints non-padding input tokens per second:
end to end (the trainer's whole `train()` call) and steady state (steps after a warm-up).

    python benchmarks/finetune_bench.py [--steps 40] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402

from mergesafe.finetune.api import finetune  # noqa: E402
from mergesafe.world.tokenizer import train_tokenizer  # noqa: E402

COUNTRIES = ["Peru", "France", "Spain", "Italy", "Japan", "Egypt", "Chile", "Kenya", "Norway", "Brazil"]
CITIES = ["Lima", "Paris", "Madrid", "Rome", "Tokyo", "Cairo", "Santiago", "Nairobi", "Oslo", "Brasilia"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(len(COUNTRIES))
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({"messages": [
            {"role": "user", "content": f"Tell me the capital of {COUNTRIES[i]}, and what is {a} plus {b}?"},
            {"role": "assistant", "content": f"The capital of {COUNTRIES[i]} is {CITIES[i]}. "
                                             f"And {a} plus {b} is {a + b}. Anything else I can help with?"},
        ]})
    return rows


def make_model(folder: Path, rows: list[dict]) -> Path:
    corpus = [m["content"] for r in rows for m in r["messages"]] * 3
    tok = train_tokenizer(corpus, vocab_size=512)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(str(folder))
    return folder


class StepClock(TrainerCallback):
    """Tokens and seconds of the steps after `warmup`."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.t0 = self.tok0 = None
        self.t1 = self.tok1 = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen
        elif state.global_step > self.warmup:
            self.t1, self.tok1 = time.perf_counter(), state.num_input_tokens_seen

    @property
    def tokens_per_s(self) -> float:
        return (self.tok1 - self.tok0) / (self.t1 - self.t0)


def plain_torch_tokens_per_s(model_dir: Path, threads: int, steps: int, seq: int = 44) -> float:
    """Reference: a bare forward/backward/AdamW loop on the same model and batch shape (no
    Trainer, no data pipeline), to show what the trainer's overhead costs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, model.config.vocab_size, (8, seq), generator=torch.Generator().manual_seed(0))
        for i in range(steps):
            if i == 5:
                t0 = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        return 8 * seq * (steps - 5) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    args = parser.parse_args()

    rows = make_rows(400)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", rows)
        n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(str(model)).parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters, hidden 256, 4 layers, vocab 512; "
              f"batch 8, {args.steps} steps, torch {torch.__version__}, {os.cpu_count()} CPUs")
        print(f"{'method':<6} {'threads':>7} {'trainable':>10} {'tokens/row':>10} "
              f"{'end-to-end tok/s':>17} {'steady tok/s':>13} {'s/step':>7}")
        for threads in dict.fromkeys(args.threads):
            for lora in (True, False):
                clock = StepClock()
                out = finetune(model, rows, tmp / f"out-{lora}-{threads}", lora=lora, max_steps=args.steps,
                               batch_size=8, val_size=0, logging_steps=args.steps, progress=False,
                               cpu_threads=threads, callbacks=[clock])
                m = json.loads((out / "mergesafe.json").read_text())
                tr = m["training"]
                steps_timed = args.steps - clock.warmup
                print(f"{'LoRA' if lora else 'full':<6} {threads:>7} {tr['trainable_params']:>10,} "
                      f"{m['data']['tokens'] / m['data']['rows']:>10.1f} {tr['tokens_per_s']:>17.0f} "
                      f"{clock.tokens_per_s:>13.0f} {(clock.t1 - clock.t0) / (steps_timed - 1):>7.3f}")
            ref = plain_torch_tokens_per_s(model, threads, min(args.steps, 25))
            print(f"{'(plain torch loop, full, same shape)':<36} {threads:>2} threads {'':>9} {ref:>13.0f}")


if __name__ == "__main__":
    main()
