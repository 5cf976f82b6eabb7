"""`python ssd.py --preflight`: first contact with a GPU machine, in about 8 minutes on one H100 (Triton compiles
included). The fast paths' self-tests, the CUDA tests, the kernel and decode benchmarks and a packed bf16 training
step with its MFU, as one table (each check: ok / off / fell back / failed, with its figure), printed and written with
every command's full output to preflight-<date>-<time>.md in the current directory. Exits 1 if anything failed or
fell back. Flags are ssd.py's (--no-cuda_graphs etc. route around a fast path; --model_name_or_path sets the head
shape the paged kernel is tested with).
"""

import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ssd  # noqa: E402

CHECKS = (  # (what, command, seconds it may take): 8 minutes on one H100 in all, with the self-tests' half minute
    ("CUDA tests", "-m pytest -q -x tests/test_cuda.py", 210),
    ("kernel benchmarks", "bench/bench_kernel.py --iters 20 --batches 1 64 256", 60),
    ("decode benchmark", "bench/bench_generate.py --device cuda --repeats 1", 120),
    ("packed bf16 training step", "bench/bench_train.py --models qwen3-1.7b --workload fixed --steps 4 --skip 2", 60),
)


def run_check(command: str, limit: int) -> tuple:
    """(result, the figure to show: the last markdown table row or pytest's summary line, full output)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *shlex.split(command)], cwd=ROOT, text=True, capture_output=True,
                           timeout=limit)
        out, result = p.stdout + p.stderr, "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
    except subprocess.TimeoutExpired as e:
        text = [x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
        out, result = "".join(text), f"failed (over {limit} s)"
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    figure = next((line for line in reversed(lines) if line.startswith("| ") or " passed" in line), "")
    return f"{result}, {time.perf_counter() - t0:.0f} s", figure.strip("| ").replace(" | ", ", "), out


def main(cfg: ssd.Config, device=None, checks=CHECKS) -> int:
    device = device or torch.device("cuda")
    t0 = time.perf_counter()
    status = ssd.self_test(device, {name: getattr(cfg, name) for name in ssd.FAST_PATHS}, cfg.model_name_or_path)
    took = f"{time.perf_counter() - t0:.0f} s for all"
    rows, logs = [(f"self-test: {name}", s, took) for name, s in status.items()], []
    for what, command, limit in checks:
        result, figure, out = run_check(command, limit)
        rows.append((what, result, figure))
        logs.append(f"\n## {what}: python {command}\n\n```\n{out}\n```\n")
    table = "| check | result | figure |\n|---|---|---|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    path = Path(f"preflight-{time.strftime('%Y%m%d-%H%M%S')}.md")
    path.write_text(f"# ssd.py --preflight on {name}, torch {torch.__version__}\n\n{table}" + "".join(logs))
    print(f"{table}\nwritten to {path}")
    return 0 if all(r[1].startswith(("ok", "off")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(ssd.parse_args(sys.argv[1:] + ["--preflight"])))
