"""Checkpoint I/O: lazy readers, LoRA adapters as full weights, streaming writer, atomic folders,
manifests.

Public API (used by merge, finetune, sweep, world):

* ``open_checkpoint(path, allow_pickle=False)`` -> :class:`Checkpoint`
* ``open_adapter(adapter_dir, base_checkpoint)`` -> :class:`AdapterView`
* ``atomic_output_dir(out, overwrite=False)`` (context manager), ``check_output_dir``
* ``StreamingShardWriter``, ``OutEntry``, ``parse_size``
* ``write_manifest(...)``, ``describe_input``, ``sha256_file``, ``BackgroundHasher``, ``versions``
* ``copy_model_files(src_dir, dst_dir, ...)`` (config, generation config, tokenizer, chat template)
"""

from mergesafe.checkpoint.adapter import (
    AdapterView,
    SuspiciousAdapterWarning,
    is_adapter_dir,
    open_adapter,
)
from mergesafe.checkpoint.atomic import Terminated, atomic_output_dir, check_output_dir, signals_raise
from mergesafe.checkpoint.files import copy_model_files, copy_tokenizer_files, has_tokenizer
from mergesafe.checkpoint.manifest import (
    MANIFEST_NAME,
    BackgroundHasher,
    describe_input,
    read_manifest,
    sha256_file,
    versions,
    write_manifest,
)
from mergesafe.checkpoint.reader import CONFIG_FILES, TOKENIZER_FILES, Checkpoint, open_checkpoint
from mergesafe.checkpoint.safetensors_io import (
    OutEntry,
    StreamingShardWriter,
    TensorInfo,
    parse_size,
    read_header,
    read_tensor,
    save_file,
)

__all__ = [
    "AdapterView", "BackgroundHasher", "CONFIG_FILES", "Checkpoint", "MANIFEST_NAME", "OutEntry",
    "StreamingShardWriter", "TOKENIZER_FILES", "TensorInfo", "Terminated", "atomic_output_dir",
    "check_output_dir", "copy_model_files", "copy_tokenizer_files", "describe_input",
    "has_tokenizer", "is_adapter_dir", "open_adapter", "open_checkpoint", "parse_size",
    "read_header", "read_manifest", "read_tensor", "save_file", "sha256_file", "signals_raise",
    "versions", "write_manifest",
    "SuspiciousAdapterWarning",
]
