"""Shared fixtures: tiny models in real formats, built once per test session (no hub)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public evaluation sets not found at {SHARED_DATA} (the ../shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return tiny_models.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_pre(tmp_path_factory, tiny_tokenizer) -> Path:
    return tiny_models.make_llama(tmp_path_factory.mktemp("pre") / "model", tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_post(tmp_path_factory, tiny_pre) -> Path:
    return tiny_models.make_post(tiny_pre, tmp_path_factory.mktemp("post") / "model", seed=1)


@pytest.fixture(scope="session")
def tiny_post2(tmp_path_factory, tiny_pre) -> Path:
    return tiny_models.make_post(tiny_pre, tmp_path_factory.mktemp("post2") / "model", seed=11)


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_pre) -> Path:
    return tiny_models.make_lora(tiny_pre, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a cached float32 checkpoint (tests/smollm2.py; .venv-vllm only)."""
    import smollm2 as _smollm2

    return _smollm2.smollm2_checkpoint()
