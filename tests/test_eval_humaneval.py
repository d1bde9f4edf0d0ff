"""HumanEval scoring: hand-written problems with fixed responses through `evaluate_loaded`, the
sandbox's limits (each checked with the audit hook off, so that the OS-level layer is what holds),
pass@k against hand computations, and bad input."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from mergesafe.errors import UserError
from mergesafe.evaluate import EvalConfig, evaluate_loaded, load_eval_sets, load_judge
from mergesafe.evaluate.metrics import pass_at_k
from mergesafe.evaluate.sandbox import Limits, run_program, run_programs
from mergesafe.evaluate.scorers.humaneval import build_program, extract_code

ROOT = os.geteuid() == 0


def problem(task_id: str, name: str, signature: str, doc: str, test: str) -> dict:
    return {"task_id": task_id, "entry_point": name,
            "prompt": f"def {name}({signature}):\n    \"\"\"{doc}\"\"\"\n",
            "test": textwrap.dedent(test)}


ADD_TEST = """
def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(-4, 4) == 0
"""


def fence(code: str) -> str:
    return f"Here is the function:\n```python\n{textwrap.dedent(code).strip()}\n```\nIt adds."


def cases(outside) -> list[tuple[dict, str, bool, str]]:
    """(problem, response, passes, expected result prefix): ten hand-written problems."""
    return [
        (problem("t/0", "add", "a, b", "Sum of a and b.", ADD_TEST),
         fence("def add(a, b):\n    return a + b"), True, "passed"),
        (problem("t/1", "double", "x", "Twice x.", """
            def check(candidate):
                assert candidate(3) == 6
            """), "    return 2 * x\n", True, "passed"),  # the body that continues the prompt
        (problem("t/2", "sub", "a, b", "a minus b.", """
            def check(candidate):
                assert candidate(5, 3) == 2
            """), fence("def sub(a, b):\n    return b - a"), False, "failed: AssertionError"),
        (problem("t/3", "neg", "x", "Minus x.", """
            def check(candidate):
                assert candidate(1) == -1
            """), fence("def neg(x)\n    return -x"), False, "failed: SyntaxError"),
        (problem("t/4", "spin", "x", "Identity.", """
            def check(candidate):
                assert candidate(1) == 1
            """), fence("def spin(x):\n    while True:\n        pass"), False, "timeout"),
        (problem("t/5", "forky", "x", "Identity.", """
            def check(candidate):
                assert candidate(1) == 1
            """), fence("import os\ndef forky(x):\n    while True:\n        os.fork()\n    return x"),
         False, "failed: PermissionError"),
        (problem("t/6", "hog", "x", "Identity.", """
            def check(candidate):
                assert candidate(1) == 1
            """), fence("def hog(x):\n    blocks, size = [], 1 << 20\n    while True:  # 1, 2, 4 ... MiB\n"
                    "        blocks.append(bytearray(size))\n        size *= 2"),
         False, "failed: MemoryError"),
        (problem("t/7", "quitter", "x", "Identity.", """
            def check(candidate):
                assert candidate(1) == 2
            """), fence("def quitter(x):\n    return x\nexit(0)"), False,
         "failed: exited before the tests finished"),
        (problem("t/8", "hard_quit", "x", "Identity.", """
            def check(candidate):
                assert candidate(1) == 2
            """), fence("import os\ndef hard_quit(x):\n    return x\nos._exit(0)"), False,
         "failed: exited before the tests finished"),
        (problem("t/9", "scribble", "x", "Identity.", """
            def check(candidate):
                assert candidate(1) == 1
            """), fence(f"""
                with open({str(outside)!r}, "w") as fh:
                    fh.write("overwritten")
                def scribble(x):
                    return x"""), False, "failed: PermissionError"),
    ]


def write_set(path, problems) -> None:
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))


def fixed(responses: dict[str, list[str]]):
    """A generator answering each prompt with its responses in turn (sample i gets the i-th)."""
    seen: dict[str, int] = {}

    def generator(prompts, progress, sampling=None):
        out = []
        for p in prompts:
            i = seen.get(p, 0)
            seen[p] = i + 1
            out.append(responses[p][i % len(responses[p])])
        return out

    return generator


def test_verdicts_of_ten_problems(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("original")
    chosen = cases(outside)
    path = tmp_path / "he.jsonl"
    write_set(path, [c[0] for c in chosen])
    cfg = EvalConfig(task=[(path, "humaneval")], humaneval_timeout=3.0, pass_k=[1])
    sets = load_eval_sets(cfg)
    out = tmp_path / "out"
    m = evaluate_loaded(None, None, sets, cfg, judge=load_judge("keyword"), out=out, model_name="fake",
                        generator=fixed({c[0]["prompt"]: [c[1]] for c in chosen}))
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [c[0]["task_id"] for c in chosen]
    for r, (p, _, passes, result) in zip(rows, chosen):
        assert (r["score"] == 1.0) is passes, (p["task_id"], r["result"])
        assert r["result"].startswith(result), (p["task_id"], r["result"])
        assert "sample" not in r  # one sample a problem
    assert outside.read_text() == "original"  # the write outside the sample's folder changed nothing
    e = m["task"]["he"]
    assert (e["n"], e["samples"], e["passed"]) == (10, 1, 2)
    assert e["score"] == e["pass@1"] == pytest.approx(0.2)
    saved = json.loads((out / "metrics.json").read_text())["task"]["he"]
    assert saved["pass@1"] == pytest.approx(0.2) and saved["scorer"] == "humaneval"


def test_pass_at_k_matches_hand_computation(tmp_path):
    """n = 5 samples: problem A passes 2 (c = 2), problem B none, problem C all five."""
    a = problem("p/A", "add", "a, b", "Sum.", ADD_TEST)
    b = problem("p/B", "add2", "a, b", "Sum too.", ADD_TEST)
    c = problem("p/C", "add3", "a, b", "Sum three.", ADD_TEST)
    good = {name: fence(f"def {name}(a, b):\n    return a + b") for name in ("add", "add2", "add3")}
    bad = {name: fence(f"def {name}(a, b):\n    return a * b") for name in ("add", "add2", "add3")}
    responses = {a["prompt"]: [bad["add"], good["add"], bad["add"], bad["add"], good["add"]],
                 b["prompt"]: [bad["add2"]] * 5, c["prompt"]: [good["add3"]] * 5}
    path = tmp_path / "pk.jsonl"
    write_set(path, [a, b, c])
    cfg = EvalConfig(task=[(path, "humaneval")], num_samples=5, temperature=0.6, pass_k=[1, 2, 10])
    out = tmp_path / "o"
    m = evaluate_loaded(None, None, load_eval_sets(cfg), cfg, judge=load_judge("keyword"), out=out,
                        generator=fixed(responses))
    e = m["task"]["pk"]
    # by hand: A: pass@1 = c/n = 2/5, pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 7/10; B: 0, 0; C: 1, 1
    assert e["pass@1"] == pytest.approx((0.4 + 0 + 1) / 3)
    assert e["pass@2"] == pytest.approx((0.7 + 0 + 1) / 3)
    assert e["score"] == e["pass@1"]
    assert "pass@10" not in e and e["pass@k_omitted"] == [10]
    assert (e["n"], e["samples"], e["passed"]) == (3, 5, 7)
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and [r["sample"] for r in rows] == [0, 1, 2, 3, 4] * 3
    assert [r["score"] for r in rows[:5]] == [0.0, 1.0, 0.0, 0.0, 1.0]


def test_pass_at_k_estimator_equals_the_combinatorial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_extract_code():
    assert extract_code("x\n```text\nhi\n```\n```python\ndef f():\n    return 1\n```\nbye") == \
        "def f():\n    return 1\n"
    assert extract_code("```\nA\n```\n```python\nB\n```") == "A\n"  # untagged blocks count
    assert extract_code("```py\nunclosed = 1\n") == "unclosed = 1\n"  # stopped at the token limit
    assert extract_code("    return x\n") == "    return x\n"
    p = problem("t", "f", "x", "d", "def check(c):\n    assert c(1) == 1\n")
    assert build_program(p, "    return x") == (p["prompt"] + "    return x\n" + p["test"] + "\ncheck(f)\n")


def test_bad_input(tmp_path, capsys):
    from cli_helpers import expect_error

    ok = problem("t/0", "add", "a, b", "Sum.", ADD_TEST)
    broken = dict(ok)
    del broken["test"]
    path = tmp_path / "he.jsonl"
    write_set(path, [ok, broken])
    with pytest.raises(UserError, match="line 2: no 'test' field") as err:
        load_eval_sets(EvalConfig(task=[(path, "humaneval")]))
    assert err.value.path == str(path)
    # no reference column is needed, but pass@ the first k needs that many samples
    with pytest.raises(UserError, match="--pass-k: the score is pass@10"):
        load_eval_sets(EvalConfig(task=[(path, "humaneval")], pass_k=[10, 1]))
    model = tmp_path / "no-model"
    out = ["eval", "--out", str(tmp_path / "out"), "--model", str(model)]
    expect_error(out + ["--task", str(path), "--scorer", "humaneval"], capsys,
                 "he.jsonl", "line 2: no 'test' field")
    expect_error(out + ["--task", str(path), "--scorer", "humaneval", "--pass-k", "1,x"], capsys,
                 "--pass-k: expected comma-separated integers")
    expect_error(out + ["--task", str(path), "--scorer", "humaneval", "--num-samples", "3"], capsys,
                 "--num-samples above 1 needs --temperature above 0")


# ------------------------------------------------------------------- the sandbox's OS-level layer

def _uid_processes(uid: int) -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid)


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@pytest.mark.skipif(not ROOT, reason="a fresh uid per sample (RLIMIT_NPROC for root) needs root")
def test_fork_bomb_contained_without_the_audit_hook():
    """Forks bounded by RLIMIT_NPROC under a fresh uid; everything killed after the timeout."""
    uid = 1_500_000_000 + os.getpid()
    src = ("import os\ncount = 0\nwhile True:\n    try:\n        os.fork()\n        count += 1\n"
           "    except OSError:\n        pass\n")
    r = run_program(src, Limits(timeout_s=1.5, nproc=16), uid=uid, audit=False)
    assert not r.passed and r.status == "timeout" and r.isolation["uid"] == uid
    assert r.isolation["audit"] is False
    assert _uid_processes(uid) == 0


@pytest.mark.skipif(not ROOT, reason="as root, a sample writes as a fresh uid")
def test_write_outside_refused_without_the_audit_hook(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("original")
    target.chmod(0o666 & ~0o022)  # rw-r--r-- root: no one else may write
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n", audit=False)
    assert not r.passed and r.detail == "PermissionError"
    assert target.read_text() == "original"


def test_memory_limit_without_the_audit_hook():
    r = run_program("x = bytearray(1 << 30)\n", Limits(memory_bytes=256 << 20), audit=False)
    assert not r.passed and r.detail == "MemoryError"


def test_network_namespace():
    """A listening socket of this process is unreachable from a sample (its own network namespace)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    src = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
    try:
        r = run_program(src, audit=False)
        if not r.isolation.get("network"):
            pytest.skip("this kernel refuses a network namespace here: the network is not isolated")
        assert not r.passed and r.detail in ("ConnectionRefusedError", "OSError", "TimeoutError")
        # the same program outside the sandbox reaches it
        assert subprocess.run([sys.executable, "-c", src], timeout=20).returncode == 0
    finally:
        server.close()


def test_parallel_runs_keep_order():
    srcs = [f"assert {i} % 2 == 0\n" for i in range(6)]
    assert [r.passed for r in run_programs(srcs, workers=3)] == [True, False] * 3


def test_writes_inside_the_folder_work_and_output_is_bounded():
    inside = ("import os, tempfile\nos.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('ok')\n"
              "fd, p = tempfile.mkstemp()\nassert os.path.dirname(p) == os.getcwd()\n")
    assert run_program(inside).passed
    flood = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n",
                        Limits(fsize_bytes=1 << 20))
    assert not flood.passed and flood.status == "failed" and flood.detail == "OSError"  # EFBIG
