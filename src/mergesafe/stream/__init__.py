"""The streaming map: whole checkpoints through a per-tensor function, one tensor at a time.

Sits between :mod:`mergesafe.checkpoint` (readers, writer, atomic folders) and the packages that
stream (:mod:`mergesafe.merge`, :mod:`mergesafe.restore`).  See :mod:`.tensor_map`.
"""

from mergesafe.stream.tensor_map import (
    Source,
    StreamPlan,
    check_architectures,
    check_finite,
    execute,
    hash_records,
    parse_dtype,
    plan_outputs,
    tokenizer_folder,
    tune_malloc,
)

__all__ = ["Source", "StreamPlan", "check_architectures", "check_finite", "execute",
           "hash_records", "parse_dtype", "plan_outputs", "tokenizer_folder", "tune_malloc"]
