"""mergekit YAML configurations (the ``models:`` form), as in mergekit 0.1.5.

Supported keys: ``models`` (each ``{model: PATH, parameters: {...}}``; ``PATH+ADAPTER`` applies a
LoRA adapter, as in mergekit), ``base_model``, ``merge_method``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source`` (``base``, a model path, or absent: the base model's, else the
first model's).  Anything else (``slices``, ``modules``, ``tokenizer``, ``chat_template``,
``tokenizer_source: union``, ...) is refused with a message that names it.

Parameter values follow mergekit's ``evaluate_setting``:

* a scalar;
* a gradient: a list of numbers interpolated over layer depth ``t = layer / (num_layers − 1)``
  (``t = 0`` for tensors outside the layers: embeddings, final norm, LM head; ``t = 1`` with a
  single layer); a list of booleans/strings picks ``values[int(t·(n−1))]``;
* conditions: ``{filter: SUBSTRING, value: ...}`` or a list of them, the first whose filter is a
  substring of the tensor name (or is absent / ``*``) wins.

Per-model parameters (``weight``, ``density``, ``gamma``, ``epsilon``) are looked up in the model's
own ``parameters`` first, then in the global ``parameters``; shared ones (``normalize``,
``lambda``, ``t``, ...) in the global ``parameters`` only.  Inputs are rounded to ``dtype`` if
given (mergekit loads them so), computation is float32, output is ``out_dtype``, else ``dtype``,
else the base model's dtype.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from mergesafe.checkpoint import open_adapter
from mergesafe.checkpoint.inputs import open_model
from mergesafe.errors import UserError, echo
from mergesafe.merge.engine import merge_group
from mergesafe.merge.registry import MethodSpec, ParamSpec, check_della, get_method
from mergesafe.stream import Source, StreamPlan, parse_dtype, tokenizer_folder

SUPPORTED_KEYS = ("models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                  "tokenizer_source")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_WEIGHT = ParamSpec("weight", float, help="model weight")


# Bounds on a config file: mergekit configs are a few KB; anchors and aliases are allowed, but the
# document they expand to (what the manifest stores, what error messages may quote) stays small.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 10_000  # nodes written in the file (PyYAML composes ~10k nodes a second or more)
MAX_FLOW_DEPTH = 100  # nested [ and {: PyYAML's scanner is quadratic in their depth
MAX_EXPANDED_NODES = 100_000
MAX_EXPANDED_CHARS = 4_000_000
MAX_ECHO = 100  # characters of a user value quoted in an error message

def _expanded_size(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand to more than the bounds (a "billion laughs").

    Alias nodes are shared in the composed graph, so the expanded size is counted once per node
    (memoised) without expanding anything; a recursive alias is refused too.
    """
    sizes: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            nodes, chars = 1, 0
            for child in _children(node):
                n, c = sizes[id(child)]
                nodes, chars = nodes + n, chars + c
            if nodes > MAX_EXPANDED_NODES or chars > MAX_EXPANDED_CHARS:
                raise UserError(f"the YAML expands to more than {MAX_EXPANDED_NODES} values or "
                                f"{MAX_EXPANDED_CHARS} characters (too many aliases?)", path)
            sizes[key] = (nodes, chars)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise UserError("the YAML holds a recursive alias (an anchor used inside itself)", path)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value))
            continue
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _TooManyNodes(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops composing after `MAX_YAML_NODES` nodes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0

    def compose_node(self, parent, index):
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _TooManyNodes
        return super().compose_node(parent, index)


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` (a cheap over-estimate: quotes are not parsed)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError("no such file", path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"config file too large ({size} bytes; a mergekit config is at most "
                        f"{MAX_CONFIG_BYTES} bytes)", path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise UserError(f"line {line}: not UTF-8 text", path) from None
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise UserError(f"invalid YAML: nested too deeply (more than {MAX_FLOW_DEPTH} levels of [ or {{)",
                        path)
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters at once
    except yaml.YAMLError as err:  # a control character
        raise UserError(f"invalid YAML: {str(err).splitlines()[0][:MAX_ECHO]}", path) from None
    try:
        node = loader.get_single_node()
        if node is None:
            data = None
        else:
            _expanded_size(node, path)
            data = loader.construct_document(node)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"invalid YAML: {first[:MAX_ECHO]}", path) from None
    except RecursionError:
        raise UserError("invalid YAML: nested too deeply", path) from None
    except _TooManyNodes:
        raise UserError(f"the YAML has more than {MAX_YAML_NODES} values; a mergekit config is "
                        "much smaller", path) from None
    except (ValueError, TypeError, OverflowError) as err:  # e.g. a timestamp 2024-13-45
        raise UserError(f"invalid YAML value ({type(err).__name__}: {str(err)[:MAX_ECHO]})",
                        path) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise UserError("a mergekit config must be a mapping", path)
    return data


def _model_ref(value: Any, path: Path, where: str) -> str:
    if isinstance(value, str) and value.strip():
        if len(value) > 4096:
            raise UserError(f"{where}: model path too long ({len(value)} characters)", path)
        return value.strip()
    raise UserError(f"{where}: expected a model path, got {echo(value)}", path)


class ConfigModel:
    """One model reference of the config, opened."""

    def __init__(self, ref: str, config_dir: Path, allow_pickle: bool, base_cache: dict) -> None:
        self.ref = ref
        model, _, lora = ref.partition("+")
        self.path = self._locate(model, config_dir)
        self.lora = self._locate(lora, config_dir) if lora else None
        key = str(self.path)
        if key not in base_cache:
            base_cache[key] = open_model(self.path, allow_pickle=allow_pickle)
        self.ckpt = base_cache[key]
        if self.lora is not None:
            self.ckpt = open_adapter(self.lora, self.ckpt, allow_pickle=allow_pickle)

    @staticmethod
    def _locate(p: str, config_dir: Path) -> Path:
        path = Path(p).expanduser()
        if not path.exists() and not path.is_absolute() and (config_dir / path).exists():
            path = config_dir / path
        if not path.exists():
            raise UserError("no such file or folder (referenced in the config)", path)
        return path


def _evaluate(setting: Any, name: str, t: float, spec: ParamSpec, method: str) -> Any:
    """mergekit ``evaluate_setting``; returns None when no condition matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return spec.coerce(setting, method)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [spec.coerce(e, method) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return spec.coerce((1 - frac) * values[i0] + frac * values[i1], method)
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise UserError(f"parameter {spec.name!r}: expected {{filter, value}} conditions, "
                                f"got {echo(cond)}")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (name and str(flt) in name):
                return _evaluate(cond["value"], name, t, spec, method)
        return None
    raise UserError(f"parameter {spec.name!r}: unexpected value {echo(setting)}")


def _check_param_names(params: Any, spec: MethodSpec, allowed_weight: bool, where: str,
                       path: Path) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: parameters must be a mapping", path)
    for key in params:
        if key == "weight" and allowed_weight:
            continue
        if spec.param(key) is None:
            allowed = ", ".join((["weight"] if allowed_weight else []) + spec.param_names)
            raise UserError(f"{where}: unknown parameter {echo(key)} for method {spec.name} "
                            f"(allowed: {allowed})", path)
    return params


class ConfigResolver:
    """Resolves every parameter of every tensor from the config."""

    def __init__(self, spec: MethodSpec, global_params: dict, model_params: list[dict],
                 num_layers: int | None) -> None:
        self.spec = spec
        self.global_params = global_params
        self.model_params = model_params
        self.num_layers = num_layers

    def t_of(self, name: str) -> float:
        m = _LAYER.search(name)
        if not m:
            return 0.0
        n = self.num_layers
        if not n or n <= 1:
            return 1.0
        return int(m.group(1)) / (n - 1)

    def _resolve(self, ps: ParamSpec, scopes: list[dict], name: str, t: float, who: str) -> Any:
        for scope in scopes:
            if scope and ps.name in scope:
                v = _evaluate(scope[ps.name], name, t, ps, self.spec.name)
                if v is not None:
                    return v
        if ps.required:
            raise UserError(f"missing required parameter {ps.name!r} for {who} (tensor {name})")
        return ps.default

    def shared(self, name: str) -> dict[str, Any]:
        t = self.t_of(name)
        out = {ps.name: self._resolve(ps, [self.global_params], name, t, "the merge")
               for ps in self.spec.params if ps.scope == "shared"}
        if self.spec.kind == "slerp" and out.get("t") is None:
            raise UserError(f"missing required parameter 't' for slerp (tensor {name})")
        return out

    def per_model(self, index: int, name: str, who: str) -> dict[str, Any]:
        t = self.t_of(name)
        scopes = [self.model_params[index], self.global_params]
        out = {ps.name: self._resolve(ps, scopes, name, t, who)
               for ps in self.spec.params if ps.scope == "model"}
        if self.spec.uses_weight and self.spec.kind != "slerp":
            out["weight"] = self._resolve(_WEIGHT, scopes, name, t, who)
        if "epsilon" in out:
            check_della(self.spec.name, out["density"], out["epsilon"])
        return out


def _names(keys: list) -> str:
    """Some user keys for a message, each and all of them cut short."""
    text = ", ".join(str(k)[:MAX_ECHO] for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
    return text if len(text) <= 2 * MAX_ECHO else text[:2 * MAX_ECHO - 3] + "..."


def _scalar(data: dict, key: str, path: Path) -> Any:
    """A top-level setting that must be a short scalar (method name, dtype, tokenizer source)."""
    value = data.get(key)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if not isinstance(value, str) or len(value) > 4096:
        raise UserError(f"{key}: expected a name or path, got {echo(value)}", path)
    return value


def build_config_plan(config_path: str | Path, *, seed: int = 0, allow_pickle: bool = False,
                      dtype: str | None = None) -> StreamPlan:
    """Parse a mergekit YAML file and return the :class:`StreamPlan` of its merge.

    Every error is a one-line :class:`UserError` of bounded length that names the config file
    (or the model folder it is about).
    """
    path = Path(config_path).expanduser()
    try:
        return _build_config_plan(path, seed=seed, allow_pickle=allow_pickle, dtype=dtype)
    except UserError as err:  # one bounded line already (see mergesafe.errors); name the file
        if err.path is not None:
            raise
        raise UserError(err.problem, path) from None
    except OSError as err:  # a path too long for the file system, ...
        raise UserError(f"cannot read a file it names: {err.strerror or err}", path) from None


def _build_config_plan(path: Path, *, seed: int, allow_pickle: bool,
                       dtype: str | None) -> StreamPlan:
    data = _load_yaml(path)
    unsupported = [k for k in data if k not in SUPPORTED_KEYS]
    if unsupported:
        raise UserError(f"unsupported mergekit config key(s): {_names(unsupported)} "
                        f"(mergesafe supports: {', '.join(SUPPORTED_KEYS)})", path)
    if "merge_method" not in data:
        raise UserError("merge_method is missing", path)
    for key in ("merge_method", "dtype", "out_dtype", "tokenizer_source", "base_model"):
        _scalar(data, key, path)
    spec = get_method(str(data["merge_method"]))
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise UserError("models must be a non-empty list", path)
    tok_src = data.get("tokenizer_source")
    if tok_src == "union":
        raise UserError("tokenizer_source: union is not supported (use base or a model path)", path)
    global_params = _check_param_names(data.get("parameters"), spec, True, "parameters", path)
    cache: dict = {}
    cdir = path.parent.absolute()
    entries = []
    for i, m in enumerate(models):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise UserError(f"{where}: expected {{model: PATH, parameters: ...}}", path)
        bad = [k for k in m if k not in ("model", "parameters")]
        if bad:
            raise UserError(f"{where}: unsupported key(s): {_names(bad)}", path)
        ref = _model_ref(m["model"], path, where)
        params = _check_param_names(m.get("parameters"), spec, True, where, path)
        entries.append((ref, params))
    base_ref = _model_ref(data["base_model"], path, "base_model") if data.get("base_model") else None
    refs = [r for r, _ in entries]
    if len(set(refs)) != len(refs):
        raise UserError("a model is listed twice in models", path)
    opened = {r: ConfigModel(r, cdir, allow_pickle, cache) for r in refs}
    if base_ref is not None and base_ref not in opened:
        opened[base_ref] = ConfigModel(base_ref, cdir, allow_pickle, cache)

    # inputs in mergekit's order: the models, then the base if it was not listed
    if spec.kind == "linear":
        inputs = [(r, p) for r, p in entries]
        if base_ref is not None and base_ref not in refs:
            inputs.append((base_ref, {}))
        base_input = None
    else:
        if base_ref is None:
            raise UserError(f"merge method {spec.name} needs a base_model", path)
        inputs = [(r, p) for r, p in entries if r != base_ref]
        base_input = base_ref
    n = len(inputs)
    if spec.kind == "slerp" and n != 1:
        raise UserError(f"slerp needs the base model and exactly one other model, got {n} others",
                        path)
    if spec.kind == "model_stock" and n < 2:
        raise UserError(f"model_stock needs the base model and at least two others, got {n}", path)
    if n < 1:
        raise UserError("no models to merge besides the base", path)

    labels = {r: (f"base_model {r}" if r == base_ref else f"model {r}") for r in opened}
    ref_key = base_ref if base_ref is not None else refs[0]
    sources = {r: Source(labels[r], opened[r].ckpt) for r in opened}
    reference = sources[ref_key]
    order = ([base_input] if base_input else []) + [r for r, _ in inputs]
    num_layers = reference.ckpt.config.get("num_hidden_layers")
    resolver = ConfigResolver(spec, global_params, [p for _, p in inputs], num_layers)
    in_labels = [sources[r].label for r, _ in inputs]
    base_label = sources[base_input].label if base_input else None
    pre_index = -1 if base_input else (in_labels.index(reference.label))
    is_lin = spec.kind == "linear"

    def compute(name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        shared = resolver.shared(name)
        per = [resolver.per_model(i, name, in_labels[i]) for i in range(n)]
        weights = [p.get("weight", 1.0) for p in per]
        model_params = {ps.name: [p[ps.name] for p in per]
                        for ps in spec.params if ps.scope == "model"}
        base_t = loaded[base_label] if base_label else None
        return merge_group(spec, name, base_t, [loaded[lab] for lab in in_labels], weights,
                           model_params, shared, seed, pre_index=pre_index if is_lin else -1,
                           labels=([base_label] if base_label else []) + in_labels,
                           consume=True)  # loaded tensors are ours

    # resolve every parameter of every tensor now: a bad setting fails before anything is written
    for name in reference.ckpt.names():
        resolver.shared(name)
        for i in range(n):
            resolver.per_model(i, name, in_labels[i])

    # tokenizer: mergekit copies the donor's (base_model, else the first model) unless told
    if tok_src in (None, "base"):
        donor = sources[ref_key]
    else:
        tref = str(tok_src)
        if tref not in sources:
            raise UserError(f"tokenizer_source {echo(tref)} is not one of the config's models", path)
        donor = sources[tref]
    out_dtype = parse_dtype(data.get("out_dtype"), "out_dtype") or parse_dtype(
        data.get("dtype"), "dtype")
    if dtype is not None:
        out_dtype = parse_dtype(dtype)
    plan = StreamPlan(
        kind="merge",
        reference=reference,
        sources=[sources[r] for r in order],
        compute=compute,
        out_dtype=out_dtype,
        input_dtype=parse_dtype(data.get("dtype"), "dtype"),
        tokenizer_src=tokenizer_folder(donor, reference),
        generation_src=[donor.dir, reference.dir],
        elementwise=spec.kind == "linear" or spec.name == "task_arithmetic",
        manifest={
            "method": spec.name,
            "params": {"parameters": global_params,
                       "models": {r: p for r, p in entries}},
            "seed": seed,
            "config": data,
            "inputs": {"config": path.absolute(),
                       "base_model": sources[base_ref] if base_ref else None,
                       "models": [sources[r] for r in refs]},
        },
    )
    return plan
