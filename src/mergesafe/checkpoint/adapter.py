"""PEFT LoRA adapters seen as full post-tuning checkpoints.

``open_adapter(adapter_dir, base)`` returns a checkpoint-like view of ``base + adapter``: for a
module ``X`` with LoRA factors ``A`` (r × in) and ``B`` (out × r), the post tensor is

    X.weight = W + (B @ A) · scale,   scale = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

computed per tensor, on demand, in float32 and in the same order of operations as
``peft``'s ``merge_and_unload`` (``get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) ·
scaling``, then ``W += delta``).  Embedding LoRA (``lora_embedding_A/B``) is transposed as peft
does.  ``rank_pattern``/``alpha_pattern`` are honoured.  Tensors listed in ``modules_to_save``
replace the base ones.  PEFT key names ``base_model.model.X.lora_A.weight`` map to base names
``X.weight``.

Refused with a reason: other PEFT types, DoRA, LoRA biases, ``target_parameters``,
``layer_replication``, trainable-token deltas, and any adapter that does not fit the base
(module missing in the base, shapes that do not agree).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from mergesafe.checkpoint.reader import Checkpoint, _load_bin, open_checkpoint, read_json
from mergesafe.checkpoint.safetensors_io import read_header, read_tensor
from mergesafe.errors import UserError

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.weight)?$")
_EMB_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern key that matches the module path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraModule:
    """One LoRA-adapted module: factor keys, rank, alpha and scale."""

    def __init__(self, module: str, a_key: str, b_key: str, embedding: bool,
                 r: int, alpha: float, rslora: bool, fan_in_fan_out: bool) -> None:
        self.module = module
        self.target = f"{module}.weight"
        self.a_key = a_key
        self.b_key = b_key
        self.embedding = embedding
        self.r = r
        self.alpha = alpha
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.transpose = embedding or fan_in_fan_out


class AdapterView:
    """``base + LoRA`` with the interface of :class:`~mergesafe.checkpoint.reader.Checkpoint`.

    ``dir`` is the adapter folder; ``config`` is the base model's config; ``adapter_config`` the
    PEFT config; ``base`` the base checkpoint.  ``get(name)`` returns the merged tensor in float32
    for LoRA targets, the ``modules_to_save`` tensor for replaced modules, and the base tensor
    otherwise.  ``lora_modules`` maps target tensor names to :class:`LoraModule`;
    ``saved_modules`` maps replaced tensor names to their adapter keys.
    """

    is_adapter = True
    kind = "adapter"

    def __init__(self, adapter_dir: Path, base: Checkpoint, adapter_config: dict,
                 weight_file: Path, raw_infos: dict | None, raw_bin: dict | None) -> None:
        self.dir = adapter_dir
        self.base = base
        self.config = base.config
        self.adapter_config = adapter_config
        self.weight_file = weight_file
        self._infos = raw_infos
        self._bin = raw_bin
        self.lora_modules: dict[str, LoraModule] = {}
        self.saved_modules: dict[str, str] = {}
        self._parse()

    # -- raw adapter tensors ----------------------------------------------------------------
    def raw_keys(self) -> list[str]:
        return list(self._infos) if self._infos is not None else list(self._bin)

    def raw_shape(self, key: str) -> tuple[int, ...]:
        if self._infos is not None:
            return self._infos[key].shape
        return tuple(self._bin[key].shape)

    def raw_dtype(self, key: str) -> torch.dtype:
        return self._infos[key].dtype if self._infos is not None else self._bin[key].dtype

    def raw(self, key: str) -> torch.Tensor:
        if self._infos is not None:
            return read_tensor(self._infos[key])
        return self._bin[key].clone()

    def _parse(self) -> None:
        cfg = self.adapter_config
        where = self.dir / "adapter_config.json"
        peft_type = str(cfg.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise UserError(f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)", where)
        if cfg.get("use_dora"):
            raise UserError("DoRA adapters (use_dora) are not supported", where)
        if cfg.get("lora_bias"):
            raise UserError("LoRA adapters with lora_bias are not supported", where)
        if cfg.get("target_parameters"):
            raise UserError("adapters with target_parameters are not supported", where)
        if cfg.get("layer_replication"):
            raise UserError("adapters with layer_replication are not supported", where)
        r_default = int(cfg.get("r", 8))
        alpha_default = float(cfg.get("lora_alpha", 8))
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))
        parts: dict[str, dict[str, str]] = {}
        embedding: dict[str, bool] = {}
        for key in self.raw_keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _LORA_KEY.match(name) or _EMB_KEY.match(name)
            if m:
                part = m.group("part")
                module = m.group("module")
                parts.setdefault(module, {})["A" if part.endswith("A") else "B"] = key
                embedding[module] = part.startswith("lora_embedding")
                continue
            if "lora_magnitude_vector" in name:
                raise UserError("DoRA adapters are not supported", self.weight_file)
            if "lora_" in name or "token_adapter" in name or "trainable_tokens" in name:
                raise UserError(f"unsupported adapter tensor {key!r}", self.weight_file)
            # modules_to_save: a full tensor that replaces the base one
            if name not in self.base:
                raise UserError(f"adapter does not fit pre: saved tensor {name!r} is not in pre "
                                f"{self.base.dir}", self.weight_file)
            self.saved_modules[name] = key
        if not parts and not self.saved_modules:
            raise UserError("adapter holds no LoRA tensors", self.weight_file)
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise UserError(f"module {module!r} has lora_{'A' if 'B' in ab else 'B'} missing",
                                self.weight_file)
            a_shape, b_shape = self.raw_shape(ab["A"]), self.raw_shape(ab["B"])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise UserError(f"module {module!r}: LoRA factors of shapes {list(a_shape)} and "
                                f"{list(b_shape)} do not multiply", self.weight_file)
            r = a_shape[0]
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
            r_cfg = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r_default))
            if r_cfg != r:
                raise UserError(f"module {module!r}: LoRA rank {r} does not match r={r_cfg} in the "
                                "adapter config", self.weight_file)
            lm = LoraModule(module, ab["A"], ab["B"], embedding[module], r, alpha, rslora, fifo)
            if lm.target not in self.base:
                raise UserError(f"adapter does not fit pre: module {module!r} has no weight "
                                f"{lm.target!r} in pre {self.base.dir}", self.weight_file)
            delta_shape = (b_shape[0], a_shape[1])
            if lm.transpose:
                delta_shape = delta_shape[::-1]
            base_shape = tuple(self.base.shape(lm.target))
            if base_shape != delta_shape:
                raise UserError(f"adapter does not fit pre: {lm.target} is {list(base_shape)} in pre "
                                f"but the LoRA delta is {list(delta_shape)}", self.weight_file)
            if lm.target in self.saved_modules:
                raise UserError(f"tensor {lm.target!r} is both LoRA-adapted and saved in full",
                                self.weight_file)
            self.lora_modules[lm.target] = lm

    # -- checkpoint interface ---------------------------------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.saved_modules:
            return tuple(self.raw_shape(self.saved_modules[name]))
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self.saved_modules:
            return self.raw_dtype(self.saved_modules[name])
        return self.base.dtype(name)

    def info(self, name: str):
        return None

    @property
    def tied(self) -> bool:
        return self.base.tied

    def model_dtype(self) -> torch.dtype:
        return self.base.model_dtype()

    def delta(self, name: str) -> torch.Tensor:
        """``scale · B @ A`` (transposed for embeddings / fan_in_fan_out), float32."""
        lm = self.lora_modules[name]
        a = self.raw(lm.a_key).float()
        b = self.raw(lm.b_key).float()
        d = b @ a
        if lm.transpose:
            d = d.T
        return d * lm.scale

    def get(self, name: str) -> torch.Tensor:
        if name in self.saved_modules:
            return self.raw(self.saved_modules[name])
        if name in self.lora_modules:
            w = self.base.get(name).float()
            return w + self.delta(name)
        return self.base.get(name)

    def weight_files(self) -> list[Path]:
        return [self.weight_file]

    def files(self) -> list[Path]:
        out = [self.weight_file, self.dir / "adapter_config.json"]
        from mergesafe.checkpoint.reader import TOKENIZER_FILES
        for name in TOKENIZER_FILES:
            p = self.dir / name
            if p.is_file():
                out.append(p)
        return out

    def close(self) -> None:
        """Nothing to release: the base checkpoint belongs to the caller."""

    def __repr__(self) -> str:
        return (f"AdapterView({str(self.dir)!r} on {str(self.base.dir)!r}, "
                f"{len(self.lora_modules)} LoRA modules, {len(self.saved_modules)} saved)")


def open_adapter(adapter_dir: str | Path, base_checkpoint: Checkpoint | str | Path,
                 allow_pickle: bool = False) -> AdapterView:
    """Open a PEFT LoRA adapter folder as a full post checkpoint on top of ``base_checkpoint``."""
    adapter_dir = Path(adapter_dir).expanduser().absolute()
    if not adapter_dir.exists():
        raise UserError("no such file or folder", adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError("not a PEFT adapter folder: adapter_config.json is missing", adapter_dir)
    base = (base_checkpoint if not isinstance(base_checkpoint, (str, Path))
            else open_checkpoint(base_checkpoint, allow_pickle=allow_pickle))
    cfg = read_json(cfg_path)
    st = adapter_dir / "adapter_model.safetensors"
    binf = adapter_dir / "adapter_model.bin"
    if st.is_file():
        infos, _ = read_header(st)
        return AdapterView(adapter_dir, base, cfg, st, infos, None)
    if binf.is_file():
        if not allow_pickle:
            raise UserError("adapter_model.bin holds pickled weights; refused without --allow-pickle",
                            adapter_dir)
        return AdapterView(adapter_dir, base, cfg, binf, None, _load_bin(binf))
    raise UserError("adapter weights not found: expected adapter_model.safetensors", adapter_dir)
