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
import warnings
from pathlib import Path

import torch

from mergesafe.checkpoint.reader import Checkpoint, _load_bin, open_checkpoint, read_json
from mergesafe.checkpoint.safetensors_io import read_header, read_tensor
from mergesafe.errors import UserError, echo, short_path

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.weight)?$")
_EMB_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")


class SuspiciousAdapterWarning(UserWarning):
    """An adapter that loads but probably is not what the user meant: a zero ``lora_alpha``
    (the adapter changes nothing), ``target_modules`` that disagree with the adapter's weights, or
    a ``base_model_name_or_path`` that is not the pre model given."""


def _warn(message: str, where: Path) -> None:
    text = " ".join(f"{where}: {message}".splitlines())  # one line
    warnings.warn(text, SuspiciousAdapterWarning, stacklevel=5)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _regex(pattern: str, field: str, where: Path) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        raise UserError(f"{field}: {echo(pattern, 60)} is not a valid regular expression",
                        where) from None


class LoraSettings:
    """The fields of ``adapter_config.json`` that the view uses, type-checked.

    Raises :class:`UserError` naming ``adapter_config.json`` for any ill-typed field: ``r`` and
    ``rank_pattern`` values must be positive integers, ``lora_alpha`` and ``alpha_pattern``
    values finite numbers, the flags booleans, the patterns objects with valid regular
    expressions as keys, ``target_modules`` a regular expression or a list of names,
    ``modules_to_save`` a list of names and ``base_model_name_or_path`` a string.
    """

    def __init__(self, cfg: dict, where: Path) -> None:
        self.where = where
        peft_type = cfg.get("peft_type")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise UserError(f"peft_type {echo(peft_type, 40)} is not supported (only LORA)", where)
        flags = {}
        for key in ("use_dora", "lora_bias", "use_rslora", "fan_in_fan_out"):
            value = cfg.get(key)
            if value is not None and not isinstance(value, bool):
                raise UserError(f"{key} must be true or false, got {echo(value, 40)}", where)
            flags[key] = bool(value)
        if flags["use_dora"]:
            raise UserError("DoRA adapters (use_dora) are not supported", where)
        if flags["lora_bias"]:
            raise UserError("LoRA adapters with lora_bias are not supported", where)
        if cfg.get("target_parameters"):
            raise UserError("adapters with target_parameters are not supported", where)
        if cfg.get("layer_replication"):
            raise UserError("adapters with layer_replication are not supported", where)
        self.rslora = flags["use_rslora"]
        self.fan_in_fan_out = flags["fan_in_fan_out"]
        self.r = self._rank(cfg.get("r", 8), "r")
        self.alpha = self._alpha(cfg.get("lora_alpha", 8), "lora_alpha")
        self.rank_pattern = self._patterns(cfg, "rank_pattern", self._rank)
        self.alpha_pattern = self._patterns(cfg, "alpha_pattern", self._alpha)
        targets = cfg.get("target_modules")
        if isinstance(targets, str):
            _regex(targets, "target_modules", where)
        elif targets is not None and not (isinstance(targets, list)
                                          and all(isinstance(t, str) for t in targets)):
            raise UserError(f"target_modules must be a string or a list of strings, got "
                            f"{echo(targets, 60)}", where)
        self.target_modules: str | list[str] | None = targets
        self.layer_filter = bool(cfg.get("layers_to_transform") or cfg.get("layers_pattern")
                                 or cfg.get("exclude_modules"))
        saved = cfg.get("modules_to_save")
        if saved is not None and not (isinstance(saved, list)
                                      and all(isinstance(t, str) for t in saved)):
            raise UserError(f"modules_to_save must be a list of strings, got {echo(saved, 60)}",
                            where)
        base = cfg.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise UserError(f"base_model_name_or_path must be a string, got {echo(base, 60)}",
                            where)
        self.base_model = base.strip() if base else None

    def _rank(self, value: object, field: str) -> int:
        if not _is_int(value) or value <= 0:
            raise UserError(f"{field} must be a positive integer, got {echo(value, 40)}",
                            self.where)
        return value

    def _alpha(self, value: object, field: str) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise UserError(f"{field} must be a finite number, got {echo(value, 40)}", self.where)
        return float(value)

    def _patterns(self, cfg: dict, field: str, check) -> dict:
        patterns = cfg.get(field)
        if patterns is None:
            return {}
        if not isinstance(patterns, dict):
            raise UserError(f"{field} must be an object mapping module patterns to values, got "
                            f"{echo(patterns, 60)}", self.where)
        for key, value in patterns.items():
            _regex(rf"(.*\.)?({key})$", field, self.where)
            check(value, f"{field}[{echo(key, 40)}]")
        return patterns

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` selects ``module`` (peft's ``check_target_module_exists``)."""
        t = self.target_modules
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == k or module.endswith(f".{k}") for k in t or ())


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
        where = self.dir / "adapter_config.json"
        cfg = LoraSettings(self.adapter_config, where)
        parts: dict[str, dict[str, str]] = {}
        embedding: dict[str, bool] = {}
        for key in self.raw_keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _LORA_KEY.match(name) or _EMB_KEY.match(name)
            if m:
                part = m.group("part")
                module = m.group("module")
                ab = parts.setdefault(module, {})
                letter = "A" if part.endswith("A") else "B"
                if letter in ab:
                    raise UserError(f"module {echo(module)} has two lora_{letter} tensors",
                                    self.weight_file)
                ab[letter] = key
                emb = part.startswith("lora_embedding")
                if embedding.setdefault(module, emb) != emb:
                    raise UserError(f"module {echo(module)} mixes lora_embedding and lora_A/B "
                                    "tensors", self.weight_file)
                continue
            if "lora_magnitude_vector" in name:
                raise UserError("DoRA adapters are not supported", self.weight_file)
            if "lora_" in name or "token_adapter" in name or "trainable_tokens" in name:
                raise UserError(f"unsupported adapter tensor {echo(key)}", self.weight_file)
            # modules_to_save: a full tensor that replaces the base one
            if name not in self.base:
                raise UserError(f"adapter does not fit pre: saved tensor {echo(name)} is not in "
                                f"pre {self.base.dir}", self.weight_file)
            if name in self.saved_modules:
                raise UserError(f"tensor {echo(name)} is saved twice", self.weight_file)
            self.saved_modules[name] = key
        if not parts and not self.saved_modules:
            raise UserError("adapter holds no LoRA tensors", self.weight_file)
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise UserError(f"module {echo(module)} has lora_{'A' if 'B' in ab else 'B'} "
                                "missing", self.weight_file)
            a_shape, b_shape = self.raw_shape(ab["A"]), self.raw_shape(ab["B"])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise UserError(f"module {echo(module)}: LoRA factors of shapes {list(a_shape)} "
                                f"and {list(b_shape)} do not multiply", self.weight_file)
            r = a_shape[0]
            alpha = _pattern_value(cfg.alpha_pattern, module, cfg.alpha)
            r_cfg = _pattern_value(cfg.rank_pattern, module, cfg.r)
            if r_cfg != r:
                raise UserError(f"module {echo(module)}: LoRA rank {r} does not match r={r_cfg} "
                                "in the adapter config", self.weight_file)
            lm = LoraModule(module, ab["A"], ab["B"], embedding[module], r, float(alpha),
                            cfg.rslora, cfg.fan_in_fan_out)
            if lm.target not in self.base:
                raise UserError(f"adapter does not fit pre: module {echo(module)} has no weight "
                                f"{echo(lm.target)} in pre {self.base.dir}", self.weight_file)
            delta_shape = (b_shape[0], a_shape[1])
            if lm.transpose:
                delta_shape = delta_shape[::-1]
            base_shape = tuple(self.base.shape(lm.target))
            if base_shape != delta_shape:
                raise UserError(f"adapter does not fit pre: {echo(lm.target)} is "
                                f"{list(base_shape)} in pre but the LoRA delta is "
                                f"{list(delta_shape)}", self.weight_file)
            if lm.target in self.saved_modules:
                raise UserError(f"tensor {echo(lm.target)} is both LoRA-adapted and saved in full",
                                self.weight_file)
            self.lora_modules[lm.target] = lm
        self._check_suspicious(cfg, where)

    def _check_suspicious(self, cfg: LoraSettings, where: Path) -> None:
        """Warn (:class:`SuspiciousAdapterWarning`) about adapters that load but look wrong."""
        mods = list(self.lora_modules.values())
        zero = [lm.module for lm in mods if lm.scale == 0]
        if zero:
            what = "every LoRA module" if len(zero) == len(mods) else \
                f"{len(zero)} of {len(mods)} LoRA modules (such as {echo(zero[0])})"
            _warn(f"lora_alpha is 0 for {what}: the adapter leaves them unchanged", where)
        targets = cfg.target_modules
        if mods and targets is not None and targets != "all-linear":
            untargeted = [lm.module for lm in mods if not cfg.targets(lm.module)]
            # a listed target that names modules of pre but has no LoRA weights (a target that
            # names nothing in pre is harmless: peft allows lists written for several models)
            unused = []
            if isinstance(targets, list) and not cfg.layer_filter:
                base_modules = {n[:-len(".weight")] for n in self.base.names()
                                if n.endswith(".weight")}
                if "lm_head.weight" in self.base:
                    base_modules.add("lm_head")

                def hits(t: str, modules) -> bool:
                    return any(m == t or m.endswith(f".{t}") for m in modules)

                lora = [lm.module for lm in mods]
                unused = [t for t in targets if not hits(t, lora) and hits(t, base_modules)]
            if untargeted or unused:
                detail = []
                if untargeted:
                    detail.append(f"{len(untargeted)} LoRA module(s) in the weights, such as "
                                  f"{echo(untargeted[0])}, are not in target_modules")
                if unused:
                    detail.append(f"target(s) {echo(unused[0])}"
                                  f"{f' and {len(unused) - 1} more' if len(unused) > 1 else ''} "
                                  "match no LoRA module in the weights")
                _warn(f"target_modules do not match the adapter weights: {'; '.join(detail)}",
                      where)
        if cfg.base_model and not _same_model(cfg.base_model, self.base):
            _warn(f"base_model_name_or_path {echo(cfg.base_model)} does not look like pre "
                  f"{echo(str(self.base.dir))}: the adapter may have been trained on another "
                  "model", where)

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


def _hub_id(path: Path) -> str | None:
    """``org/name`` from a Hugging Face cache folder (``models--org--name/snapshots/<hash>``)."""
    for part in path.parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


def _same_model(value: str, base) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` plausibly names the pre model ``base``:
    its folder (as given or resolved), the folder's name, a Hugging Face cache id, or the
    ``_name_or_path`` of its config.  A local path that exists must resolve to the same folder;
    a hub id or a path from another machine is compared by its last component."""
    folder = Path(getattr(base, "dir", "") or ".")
    folders = [folder]
    try:
        folders.append(folder.resolve())
    except (OSError, RuntimeError):
        pass
    full: set[str] = set()
    names: set[str] = set()
    for f in folders:
        full.add(str(f))
        names.add(f.name)
        hub = _hub_id(f)
        if hub:
            full.add(hub)
            names.add(hub.rsplit("/", 1)[-1])
    config = getattr(base, "config", None)
    own = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(own, str) and own.strip():
        full.add(own.strip().rstrip("/"))
        names.add(Path(own.strip().rstrip("/")).name)
    full = {f.casefold() for f in full if f}
    names = {n.casefold() for n in names if n}
    text = value.rstrip("/") or value
    if text.casefold() in full:
        return True
    path = Path(text)
    try:
        path = path.expanduser()  # RuntimeError for ~unknown-user
        if (path.is_absolute() or text.startswith((".", "~"))) and path.exists():
            return any(path.resolve() == f.resolve() for f in folders) or _same_weights(path, base)
    except (OSError, RuntimeError, ValueError):
        pass
    return path.name.casefold() in names


def _same_weights(folder: Path, base) -> bool:
    """Whether the model at ``folder`` looks like a copy of ``base``: the same tensor names and
    shapes, and equal values in its three smallest tensors (cheap to read)."""
    if not isinstance(base, Checkpoint):
        return False
    try:
        other = open_checkpoint(folder)
    except UserError:
        return False
    try:
        names = base.names()
        if sorted(other.names()) != sorted(names) or any(
                tuple(other.shape(n)) != tuple(base.shape(n)) for n in names):
            return False
        small = sorted(names, key=lambda n: math.prod(base.shape(n)))[:3]
        return all(torch.equal(other.get(n), base.get(n)) for n in small)
    except UserError:
        return False
    finally:
        other.close()


def open_adapter(adapter_dir: str | Path, base_checkpoint: Checkpoint | str | Path,
                 allow_pickle: bool = False) -> AdapterView:
    """Open a PEFT LoRA adapter folder as a full post checkpoint on top of ``base_checkpoint``."""
    adapter_dir = Path(adapter_dir).expanduser().absolute()
    cfg_path = adapter_dir / "adapter_config.json"
    st = adapter_dir / "adapter_model.safetensors"
    binf = adapter_dir / "adapter_model.bin"
    try:
        if not adapter_dir.exists():
            raise UserError("no such file or folder", short_path(adapter_dir))
        if not cfg_path.is_file():
            raise UserError("not a PEFT adapter folder: adapter_config.json is missing", adapter_dir)
        has_st, has_bin = st.is_file(), binf.is_file()
    except OSError as err:  # a name too long, a loop of links, no permission
        raise UserError(f"cannot access: {err.strerror or err}", short_path(adapter_dir)) from None
    base = (base_checkpoint if not isinstance(base_checkpoint, (str, Path))
            else open_checkpoint(base_checkpoint, allow_pickle=allow_pickle))
    try:
        cfg = read_json(cfg_path)
    except RecursionError:
        raise UserError("invalid JSON: nested too deeply", cfg_path) from None
    if has_st:
        infos, _ = read_header(st)
        return AdapterView(adapter_dir, base, cfg, st, infos, None)
    if has_bin:
        if not allow_pickle:
            raise UserError("adapter_model.bin holds pickled weights; refused without --allow-pickle",
                            adapter_dir)
        return AdapterView(adapter_dir, base, cfg, binf, None, _load_bin(binf))
    raise UserError("adapter weights not found: expected adapter_model.safetensors", adapter_dir)
