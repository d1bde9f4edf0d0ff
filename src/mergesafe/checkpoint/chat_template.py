"""A bounded trial render of a tokenizer's chat template, before the template is used.

A chat template is Jinja code from the model folder.  Transformers renders it in Jinja's
``ImmutableSandboxedEnvironment``, which blocks attribute tricks (``__class__``,
``__subclasses__``) but neither time nor memory: ``{% for a in range(100000) %}{% for b in
range(100000) %}x{% endfor %}{% endfor %}`` runs for minutes and takes gigabytes.

:func:`check_chat_template` renders the template once on a short probe conversation (system, user
and assistant turns, with and without ``add_generation_prompt``) in a child Python process with a
CPU-time limit, an address-space limit (``RLIMIT_AS``), a wall-clock timeout and a cap on the
rendered length, in an environment built like transformers' ``_compile_jinja_template``
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``{% generation %}``, ``tojson``,
``raise_exception``, ``strftime_now``, ``dict``, ``namespace``).  A template that does not compile,
that the sandbox refuses, that runs out of time or memory, that renders too much, or that cannot
render the probe conversation at all, is a one-line :class:`~mergesafe.errors.UserError` naming
the tokenizer file.  A template may refuse the system role (Gemma): the probe only needs one
variant of each shape (a prompt ready for the reply; a conversation with an answer) to render.

The result is cached per template text (and special tokens), so the check runs once per process.
:func:`describe_template_error` turns an error raised by a real ``apply_chat_template`` call into a
short message for the callers' own ``UserError``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from mergesafe.errors import UserError, one_line

log = logging.getLogger(__name__)

TIME_LIMIT_S = 10.0  # wall clock for the whole check (CPU time in the child is limited to this too)
MEMORY_LIMIT_BYTES = 1 << 30  # address space of the child process
MAX_OUTPUT_CHARS = 256 * 1024  # rendered characters of one probe conversation
MAX_TEMPLATE_CHARS = 4 * 1024 * 1024
_ECHO = 100

_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
_cache: dict[tuple[str, str], str | None] = {}
_lock = threading.Lock()

# The child: limits first, then jinja2 only (no transformers, no torch: it starts in ~0.1 s).
# Reads {"template", "tokens", "max_output", "memory", "cpu", "sys_path"} as JSON on stdin and
# writes {"fatal": [kind, message] | null, "errors": {probe: [type, message]}} on stdout.
_CHILD = r'''
import json, sys
payload = json.loads(sys.stdin.read())
try:
    import resource
except ImportError:  # Windows: the parent's timeout and the output cap still hold
    resource = None

def lower(which, soft, hard):
    try:
        lim = getattr(resource, which)
        _, cur = resource.getrlimit(lim)
        if cur != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur), min(hard, cur)
        resource.setrlimit(lim, (soft, hard))
    except Exception:
        pass

if resource is not None:
    lower("RLIMIT_AS", payload["memory"], payload["memory"])
    lower("RLIMIT_CPU", payload["cpu"], payload["cpu"] + 1)
sys.path[:0] = payload["sys_path"]

def done(fatal=None, errors=None):
    sys.stdout.write(json.dumps({"fatal": fatal, "errors": errors or {}}))
    sys.stdout.flush()
    sys.exit(0)

def text(err):
    return str(err)[:200]

import json as _json
from contextlib import contextmanager
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class AssistantTracker(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


class TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"underscore-prefixed namespace attribute {name[:50]!r}")


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                    extensions=[AssistantTracker, jinja2.ext.loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now
env.globals["dict"] = TemplateDict()
env.globals["namespace"] = TemplateNamespace
try:
    compiled = env.from_string(payload["template"])
except TemplateSyntaxError as err:
    done(["syntax", f"line {err.lineno}: {text(err.message or err)}"])
except SecurityError as err:
    done(["security", text(err)])
except MemoryError:
    done(["memory", ""])
except RecursionError:
    done(["recursion", ""])
except Exception as err:
    done(["compile", f"{type(err).__name__}: {text(err)}"])

S = {"role": "system", "content": "You are a helpful assistant."}
U = {"role": "user", "content": "What is the capital of France?"}
A = {"role": "assistant", "content": "The capital of France is Paris."}
U2 = {"role": "user", "content": "And of Peru?"}
PROBES = [
    ("prompt", "user", [U], True),
    ("prompt", "system+user", [S, U], True),
    ("chat", "user+assistant", [U, A], False),
    ("chat", "system+user+assistant", [S, U, A], False),
    ("turns", "user+assistant+user", [U, A, U2], True),
    ("turns", "system+user+assistant+user", [S, U, A, U2], True),
]
errors = {}
limit = payload["max_output"]
for shape, name, messages, gen in PROBES:
    try:
        n = 0
        for chunk in compiled.generate(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=gen, **payload["tokens"]):
            n += len(chunk)
            if n > limit:
                done(["output", name])
    except SecurityError as err:
        done(["security", text(err)])
    except MemoryError:
        done(["memory", name])
    except RecursionError:
        done(["recursion", name])
    except Exception as err:
        errors[name] = [shape, type(err).__name__, text(err)]
done(None, errors)
'''


def _one_line(text: str) -> str:
    return one_line(str(text), _ECHO)


def describe_template_error(err: BaseException) -> str:
    """`Type: message` of an error from rendering a chat template, one line, cut short."""
    msg = getattr(err, "message", None) or str(err)
    return _one_line(f"{type(err).__name__}: {msg}" if msg else type(err).__name__)


def chat_template_source(tokenizer: Any) -> str:
    """The file a tokenizer's chat template came from, for messages (its folder otherwise)."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if name:
        folder = Path(name)
        for fname in _FILES:
            try:
                if (folder / fname).is_file():
                    return str(folder / fname)
            except (OSError, ValueError):  # a name too long for a path, a NUL byte
                break
        return _one_line(name)
    return "<tokenizer>"


def _templates(tokenizer: Any) -> list[str]:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return [template] if template else []
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
        return [t for t in template.values() if isinstance(t, str) and t]
    if isinstance(template, list):  # [{"name": ..., "template": ...}] as in tokenizer_config.json
        return [t["template"] for t in template
                if isinstance(t, dict) and isinstance(t.get("template"), str) and t["template"]]
    return []


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (getattr(tokenizer, "special_tokens_map", None) or {}).items():
        if isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[str(key)] = list(value)
        elif value is not None:
            out[str(key)] = str(value)
    return out


def check_chat_template(tokenizer: Any, source_path: str | Path | None = None) -> None:
    """Render the tokenizer's chat template(s) on a short probe conversation, under bounds.

    No-op for a tokenizer without a chat template.  Raises :class:`UserError` naming
    `source_path` (default: :func:`chat_template_source`) when a template fails; see the module
    docstring.  Cached per template text, so repeated calls cost nothing.
    """
    templates = _templates(tokenizer)
    if not templates:
        return
    source = str(source_path) if source_path is not None else chat_template_source(tokenizer)
    tokens = _special_tokens(tokenizer)
    for template in templates:
        problem = check_template_text(template, tokens)
        if problem is not None:
            raise UserError(problem, path=source)


def check_template_text(template: str, tokens: dict[str, Any] | None = None) -> str | None:
    """The problem of one template text (a message for a `UserError`), or None when it renders."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return f"the chat template is too long ({len(template)} characters; at most {MAX_TEMPLATE_CHARS})"
    tokens = tokens or {}
    key = (template, json.dumps(tokens, sort_keys=True))
    with _lock:
        if key in _cache:
            return _cache[key]
    problem = _probe(template, tokens)
    with _lock:
        _cache[key] = problem
    return problem


def _probe(template: str, tokens: dict[str, Any]) -> str | None:
    limit_s = float(TIME_LIMIT_S)
    payload = json.dumps({
        "template": template, "tokens": tokens, "max_output": int(MAX_OUTPUT_CHARS),
        "memory": int(MEMORY_LIMIT_BYTES), "cpu": max(1, int(limit_s)),
        "sys_path": [p for p in sys.path if p and os.path.isabs(p)],
    })
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=payload.encode("utf-8"),
                              capture_output=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return f"the chat template takes more than {limit_s:g} s to render a short test conversation"
    except OSError as err:  # cannot start a child process: skip the check, the real render remains
        log.warning("could not check the chat template in a child process (%s); skipped", err)
        return None
    try:
        result = json.loads(proc.stdout.decode("utf-8")) if proc.returncode == 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        result = None
    if not isinstance(result, dict):
        return (f"the chat template takes more than {limit_s:g} s or {MEMORY_LIMIT_BYTES >> 20} MB "
                f"to render a short test conversation (the check ended with code {proc.returncode})")
    fatal = result.get("fatal")
    if fatal:
        kind, detail = fatal[0], _one_line(fatal[1]) if len(fatal) > 1 else ""
        return {
            "syntax": f"the chat template is not valid Jinja ({detail})",
            "security": f"the chat template was refused by the Jinja sandbox ({detail})",
            "memory": (f"the chat template needs more than {MEMORY_LIMIT_BYTES >> 20} MB to render a "
                       "short test conversation"),
            "recursion": "the chat template recurses too deeply on a short test conversation",
            "output": (f"the chat template renders more than {MAX_OUTPUT_CHARS} characters for a short "
                       "test conversation"),
        }.get(kind, f"the chat template cannot be compiled ({detail})")
    # A prompt ready for the reply and a conversation with an answer must each render, with or
    # without a system turn; multi-turn probes only count for time, memory and length.
    errors = result.get("errors") or {}
    for shape in ("prompt", "chat"):
        errs = [e for e in errors.values() if e[0] == shape]
        if len(errs) >= 2:
            _, etype, emsg = errs[0]
            return (f"the chat template cannot render a short test conversation "
                    f"({_one_line(f'{etype}: {emsg}')})")
    return None
