"""`mergesafe demo --real`: the paper's loop on SmolLM2-135M-Instruct, on a CPU.

`data.py` (AdvBench halves, XSTest safe prompts, generated benign and task prompts),
`config.py` (`RealConfig`: sizes, budgets, grid; `quick()`), `stages.py` (the dequantised base
model, alignment → pre, task → post), `demo.py` (`run_real_demo`: the sweep, summary, report).
"""

from mergesafe.world.real.demo import run_real_demo

__all__ = ["run_real_demo"]
