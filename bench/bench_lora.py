"""LoRA against full fine-tuning on the same random model: step time and peak host memory; prints a markdown table.

    python bench/bench_lora.py --threads 1                 # CPU: small and medium random Qwen3s, fp32, r 16
    python bench/bench_lora.py --models medium --lora_r 64 --repeats 1

Each model is written once as a Hugging Face checkpoint (bench_train.write_random_model) and trained by
`ssd.train_phase` (FSDP2 on one rank, activation checkpointing, chunked cross-entropy, hand-written AdamW) for
--steps steps of --batch_size x --seq_len random tokens, once with every weight trained and once with --lora_r on
every attention and MLP projection. Each run is a fresh process, so its peak resident memory (ru_maxrss) is its own;
the runs alternate full, LoRA, full, LoRA (--repeats pairs) so that a change in the machine's load hits both.
Step times are medians over the steps after the first --skip: wall clock (what metrics.jsonl logs) and the process's
CPU time (time.process_time between two steps' starts), which a machine shared with other work disturbs far less.
"state" is the arithmetic the memory comes from: fp32 weights + gradients + two AdamW moments (16 B per trained
parameter) and 4 B per frozen parameter.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_train  # noqa: E402
from bench_train import SHAPES, synthetic_sequences, write_random_model  # noqa: E402

import ssd  # noqa: E402

# (vocab, hidden, intermediate, layers, heads, kv heads, head_dim), added to bench_train's, which writes the model
SHAPES["medium"] = (8192, 1024, 3072, 4, 16, 8, 64)
assert SHAPES is bench_train.SHAPES


def child(args):
    """One training run in this process; prints its step seconds and peak resident memory as JSON."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model_dir, work = Path(args.child), Path(args.work)
    vocab = SHAPES[args.models][0]
    cfg = ssd.Config(max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                     gradient_accumulation_steps=1, max_tokens_per_microbatch=args.batch_size * args.seq_len,
                     learning_rate=1e-4, warmup_steps=1, save_steps=10**9, logging_steps=1, lora_r=args.lora_r,
                     lora_alpha=2 * max(args.lora_r, 1), lora_dropout=0.0, gradient_checkpointing=True)
    _, _, device = ssd.init_distributed()
    work.mkdir()
    starts, plan = [], ssd.step_microbatches

    def timed_plan(*a):  # called once at the start of every step: the CPU time between two calls is one step's
        starts.append(time.process_time())
        return plan(*a)

    with mock.patch.object(ssd, "step_microbatches", timed_plan):
        ssd.train_phase(cfg, str(model_dir), synthetic_sequences(args.batch_size * args.steps, args.seq_len, vocab),
                        work, 0, 1, device)
    torch.distributed.destroy_process_group()
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"seconds": [r["tokens"] / r["tokens_per_s"] for r in rows],
                      "cpu_seconds": [b - a for a, b in zip(starts, starts[1:])],
                      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def counts(name: str, r: int) -> tuple:
    """(parameters, LoRA adapter parameters at rank r) of model `name`, built on the meta device."""
    vocab, hidden, inter, layers, heads, kv, head_dim = SHAPES[name]
    hf = {"model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
          "tie_word_embeddings": True}
    with torch.device("meta"):
        model = ssd.apply_lora(ssd.Transformer(ssd.model_config_from_hf(hf)), ssd.Config(lora_r=r))
    return (sum(p.numel() for p in model.parameters() if not p.requires_grad),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,medium", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="full / LoRA pairs per model")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's, one per core)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.steps <= args.skip:
        ap.error("--steps must be larger than --skip")
    if torch.cuda.is_available():
        ap.error("a CPU benchmark: run it where CUDA is not visible (CUDA_VISIBLE_DEVICES=)")
    rows = []
    for name in args.models.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-lora-{name}-"))
        try:
            write_random_model(name, tmp / "model", torch.device("cpu"), torch.float32)
            runs = {0: [], args.lora_r: []}
            for k in range(args.repeats):
                for r in runs:
                    cmd = [sys.executable, __file__, "--child", str(tmp / "model"), "--work", str(tmp / f"w{k}-{r}"),
                           "--models", name, "--lora_r", str(r), "--steps", str(args.steps), "--batch_size",
                           str(args.batch_size), "--seq_len", str(args.seq_len), "--threads", str(args.threads)]
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or os.cpu_count())}
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if out.returncode:
                        sys.exit(out.stderr[-3000:])
                    runs[r].append(json.loads(out.stdout.strip().splitlines()[-1]))
            frozen, adapter = counts(name, args.lora_r)
            for r, results in runs.items():
                wall = statistics.median(s for res in results for s in res["seconds"][args.skip:])
                cpu = statistics.median(s for res in results for s in res["cpu_seconds"][args.skip:])
                state = 16 * (frozen + adapter) if r == 0 else 4 * frozen + 16 * adapter
                rows.append((name, frozen + adapter, r, adapter if r else frozen + adapter, wall, cpu,
                             max(res["peak_gb"] for res in results), state))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    threads = args.threads or torch.get_num_threads()
    print(f"\n{datetime.date.today()} | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
          f"CPU, {threads} thread{'s' * (threads > 1)}, fp32 | batch {args.batch_size} x {args.seq_len} tokens, "
          f"checkpointing on | median of {args.steps - args.skip} steps x {args.repeats} runs | load "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| model | params | training | trained params | step wall time | step CPU time | CPU vs full | "
          "peak host memory | state |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for i, (name, n, r, trained, wall, cpu, peak, state) in enumerate(rows):
        full_cpu = rows[i - i % 2][5]
        print(f"| {name} | {n / 1e6:.1f}M | {'LoRA r ' + str(r) if r else 'full'} | {trained / 1e6:.2f}M | "
              f"{wall:.3f} s | {cpu:.3f} s | {cpu / full_cpu:.2f}x | {peak:.2f} GB | {state / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
