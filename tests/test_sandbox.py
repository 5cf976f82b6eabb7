"""The sandbox in the setups that once made it run programs as root (issue 15), built for real: a venv in a fresh 0700
directory under /tmp and one behind a 0700 directory outside it, each symlinked to the running interpreter as
`python -m venv` makes it, graded as root. The strongest setup must be chosen and contain hostile programs with
nothing left behind; a forced failure of the uid setup must be refused, and the opt-in must run and be recorded.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_eval import sandbox_processes  # noqa: E402

import eval as ev  # noqa: E402

if os.geteuid() != 0:
    pytest.skip("these setups matter as root, where programs get a uid of their own", allow_module_level=True)
if refused := ev._unshare_refused():
    pytest.skip(f"the kernel refuses mount/network namespaces here ({refused})", allow_module_level=True)

MARK = "ssd-sandbox-test-mark"
# Each then prints a + b (read-around only when it found nothing to leak); what they did to the host is checked after.
HOSTILE = {
    "fork-bomb": "import os\nwhile True:\n    os.fork()",
    "kill-the-parent": "import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
                       "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n",
    "setsid-grandchild": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                         "        while True:\n            time.sleep(0.01)\n    os._exit(0)\n",
    "write-outside": "for path in TARGETS:\n    try:\n        open(path, 'w').write('escaped')\n"
                     "    except OSError:\n        pass\n",  # its private /tmp takes some: the host must have none
    "network": "import socket\nprint('NET', socket.if_nameindex()) if socket.if_nameindex() != [(1, 'lo')] else None\n",
    "read-around": "import glob, os, sys\nseen = [p for p in SECRETS if os.path.exists(p)]\n"
                   "seen += ['env'] * any('hunter2' in v for v in os.environ.values())\n"
                   "for path in glob.glob('/proc/*/environ'):\n    try:\n"
                   "        seen += ['proc'] * (b'hunter2' in open(path, 'rb').read())\n"
                   "    except OSError:\n        pass\n"
                   "print('SAW', seen) if seen else None\n",
}
GOOD = "a, b = map(int, input().split())\nprint(a + b)"
FORGED = ("class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
          "class Solution:\n    def countPairs(self, nums, target):\n        return Any()")
# Run in the venv's interpreter: grade every program, print the verdicts and the sandbox record as JSON.
GRADER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import eval as ev
if __name__ == "__main__":
    spec = json.loads(sys.argv[2])
    problems = {"sum": ev.Problem("sum", "stdin", "A + B", tests=[("2 3\\n", "5\\n")]),
                "pairs": ev.Problem("pairs", "functional", "pairs", tests=[("[-1,1,2,3,1]\\n2", "3")],
                                    func_name="countPairs")}
    records = [{"task_id": t, "completion": f"```python\\n{p}\\n```"} for t, p in spec["programs"]]
    sandbox = ev.grade(problems, records, ev.Limits(2.0, 256, 8, 32), 2, hide=spec["hide"], tmp_dir=spec["tmp"],
                       progress=False)
    print(json.dumps({"verdicts": [r["verdict"] for r in records], "tests": [r["tests"] for r in records],
                      "sandbox": sandbox}))
"""


def make_venv(parent: Path) -> Path:
    """A venv in a fresh 0700 directory, its bin/python a symlink to the running interpreter (python -m venv)."""
    home = Path(tempfile.mkdtemp(prefix="ssd-venv-", dir=parent))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(home / "venv")],
                   check=True)
    assert (home / "venv" / "bin" / "python").is_symlink() and os.stat(home).st_mode & 0o777 == 0o700
    return home


def sandbox_leftovers(*dirs) -> list:
    """Processes of the sandbox uids, and entries of `dirs` and the world-writable places that a sandbox uid owns."""
    found = [f"pid {p}" for p in sandbox_processes()]
    for d in filter(os.path.isdir, (*dirs, "/tmp", "/var/tmp", "/dev/shm")):
        for entry in os.scandir(d):
            try:
                found += [entry.path] if ev.UID_BASE <= entry.stat(follow_symlinks=False).st_uid < ev.UID_BASE + \
                    ev.UID_COUNT else []
            except FileNotFoundError:  # other processes come and go in /tmp
                pass
    return found


@pytest.fixture(params=["tmp", "home"], ids=["venv-in-fresh-tmp-dir", "venv-behind-0700-home-dir"])
def venv_home(request):
    home = make_venv(Path("/tmp") if request.param == "tmp" else Path.home())
    yield home
    shutil.rmtree(home)


def test_strongest_setup_contains_hostile_programs_from_a_venv(venv_home, tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_EVAL_SECRET", "hunter2")
    (problems := tmp_path / "problems").mkdir()
    (secret := problems / "expected.txt").write_text("5")
    (other := Path(tempfile.mkdtemp(prefix="ssd-other-"))).joinpath(MARK).write_text("x")  # another user of /tmp
    sandbox_tmp = Path(tempfile.mkdtemp(prefix="ssd-sandbox-"))
    venv = venv_home / "venv"
    targets = [str(venv / MARK), str(venv_home / MARK), str(problems / MARK), f"/tmp/{MARK}", f"/var/tmp/{MARK}",
               f"/dev/shm/{MARK}", str(ROOT / MARK)]
    secrets = [str(secret), str(other / MARK), str(sandbox_tmp)]  # hidden, and the host /tmp
    programs = [("sum", f"TARGETS = {targets!r}\nSECRETS = {secrets!r}\n{HOSTILE[name]}\n{GOOD}") for name in HOSTILE]
    programs += [("pairs", FORGED), ("sum", GOOD)]
    spec = {"programs": programs, "hide": [str(problems)], "tmp": str(sandbox_tmp)}
    try:
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", GRADER, str(ROOT), json.dumps(spec)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.splitlines()[-1])
        sandbox = out["sandbox"]
        assert sandbox["setup"] == "uid + namespaces" and sandbox["failed"] == {}, sandbox
        assert str(venv) in sandbox["protections"]["shown_read_only"]
        verdicts = dict(zip([*HOSTILE, "forged", "good"], out["verdicts"]))
        # the fork bomb may meet its process limit or the wall clock first, depending on the load: either contains it
        assert verdicts.pop("fork-bomb") in ("passed", "runtime_error", "time_limit"), out["tests"][0]
        assert verdicts == {**{k: "passed" for k in HOSTILE if k != "fork-bomb"}, "forged": "wrong_answer",
                            "good": "passed"}, [t[0].get("detail") for t in out["tests"]]
        assert [t for t in targets if os.path.exists(t)] == []
        assert sandbox_leftovers(tmp_path, sandbox_tmp, venv_home, venv) == []
        assert os.listdir(sandbox_tmp) == [], "the sandbox left its temporary directories behind"
    finally:
        shutil.rmtree(other)
        shutil.rmtree(sandbox_tmp, ignore_errors=True)


def probe_without_uid(tmp_path) -> dict:
    """The probe, in a process of its own, with the uid setup made to fail: no free uid."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import eval as ev\n"
            "def no_uid():\n    raise ev.SandboxError('forced: no free sandbox uid')\n"
            "ev._claim_uid = no_uid\nprint(json.dumps(ev.probe_setups(ev.Limits(2.0, 256, 8, 32), [], sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_failed_uid_setup_is_refused_and_the_opt_in_runs_and_is_recorded(tmp_path, monkeypatch, capsys):
    record = probe_without_uid(tmp_path)
    assert record["setup"] == "namespaces" and set(record["failed"]) == {"uid + namespaces", "uid"}, record
    with pytest.raises(ev.EvalError) as refusal:
        ev.check_sandbox(dict(record), allow_weak=False)
    message = str(refusal.value)
    assert "\n" not in message and "without a sandbox uid" in message and "forced: no free sandbox uid" in message
    assert "--allow_weak_sandbox" in message

    # the CLI: refused before anything runs or is written, in one line; with the opt-in, graded and recorded
    monkeypatch.setattr(ev, "decide_sandbox", lambda limits, hide, tmp_dir=None, allow_weak=False: ev.check_sandbox(
        dict(record), allow_weak))
    fixtures, out = ROOT / "tests" / "fixtures", tmp_path / "out"
    args = ["--problems", str(fixtures / "lcb_mini.jsonl"), "--samples", str(fixtures / "lcb_samples.jsonl"),
            "--output_dir", str(out), "--workers", "1", "--timeout", "2"]
    assert ev.main(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: refusing to run untrusted programs as root without"), err
    assert ev.main(args + ["--allow_weak_sandbox"]) == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sandbox"]["allow_weak_sandbox"] is True and summary["settings"]["allow_weak_sandbox"] is True
    assert summary["sandbox"]["weaker_than_allowed"] == ["a sandbox uid"]
    assert summary["sandbox"]["protections"]["sandbox_uid"] is False
    assert summary["results"][0]["pass@1"] == 0.5  # graded for real, in namespaces without a uid
    (line,) = [ln for ln in printed.out.splitlines() if ln.startswith("sandbox: namespaces: ")]
    assert line.endswith(" --allow_weak_sandbox") and "OFF sandbox_uid" in line and "forced" in line
    assert "warning: --allow_weak_sandbox: programs run as root without a sandbox uid" in printed.err


def test_uid_alone_is_refused_while_the_files_to_hide_are_readable_by_others():
    """Where the kernel refuses namespaces (plain docker as root) a sandbox uid alone is the best setup, but nothing
    then hides the problem files: refused while another user can reach them, accepted once they are closed."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # /tmp is searchable by all; pytest's tmp_path is not
        os.chmod(top, 0o755)
        (shown := Path(top) / "problems").mkdir(mode=0o755)
        check_uid_alone(Path(top), shown)


def check_uid_alone(tmp_path: Path, shown: Path):
    assert ev.readable_by_others([str(shown), str(tmp_path / "absent")]) == [str(shown)]
    record = {"setup": "uid", "failed": {"uid + namespaces": "EPERM"}, "namespaces_refused": "unshare: EPERM",
              "protections": {}, "readable_by_others": ev.readable_by_others([str(shown)])}
    with pytest.raises(ev.EvalError) as refusal:
        ev.check_sandbox(dict(record), allow_weak=False)
    assert "\n" not in str(refusal.value) and f"namespaces to hide {shown}" in str(refusal.value)
    os.chmod(shown, 0o750)
    closed = ev.check_sandbox(dict(record, readable_by_others=ev.readable_by_others([str(shown)])), allow_weak=False)
    assert closed["weaker_than_allowed"] == []
