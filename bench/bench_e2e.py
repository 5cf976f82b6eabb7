"""End to end: `python ssd.py` (one process) against TRL's SSDTrainer, whole processes timed in turn; prints a table.

    python bench/bench_e2e.py --trl_python /work/trl-venv/bin/python            # ~5 minutes on 2 cores
    python bench/bench_e2e.py --ssd ssd.py /work/wt-engine/ssd.py --trl_python ''  # two ssd.py versions, no TRL

TRL is never a dependency of this project: install it apart, e.g.
    python -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 trl==1.15.0
and pass that interpreter as --trl_python. Without one, TRL is skipped with one line.

The setup: a random 26.2M-parameter Qwen3 (8 layers x 512 hidden, 8 heads, 4 kv heads, head_dim 64, MLP 1536, tied
embeddings, transformers' default init, fp32) with the tiny tokenizer of tests/assets/tiny-qwen3 (vocab 2,048, its
chat template), saved once as a Hugging Face checkpoint; the first 32 chat prompts of tests/assets/prompts.jsonl;
one completion of at most 256 new tokens per prompt at T 1.6, top-k 20, top-p 0.8 (the paper's 4B-Instruct
setting), the empty/stub filter on; then 8 optimizer steps of 4 sequences (one rank, no accumulation), cross-entropy
on the completion tokens, gradient checkpointing, AdamW (betas 0.9 / 0.95, weight decay 0.1, clipping 1.0), warmup 1
step then cosine, fp32 on CPU; then the final model is saved. Every run uses --threads torch threads
(OMP_NUM_THREADS and MKL_NUM_THREADS) and is offline.

TRL runs `SSDTrainer` with those settings made explicit in TRL_DRIVER below: generation_batch_size 32 (all 32
prompts generated in one `generate` call from the model before the first step, then split into the 8 steps of 4, as
ssd.py samples everything first; TRL's default would generate 4 at a time before each step), bf16 False (TRL's
default is True, autocast on CPU; ssd.py runs fp32 on CPU), save_strategy "no" and one `save_model` at the end
(ssd.py writes no intermediate checkpoint in 8 steps either), no evaluation, no reporting.

Each process is started fresh and timed whole, imports included: wall seconds from spawn to exit, and its peak
resident memory (ru_maxrss from wait4 on that child alone). Runs interleave (ssd, TRL, ssd, TRL, ...) for
--repeats rounds; the table gives the median of each. The check that both did comparable work: the number of
samples, their mean completion length, the optimizer steps and the sequences per step are printed per run and must
match across runs of ssd.py (asserted) and between ssd.py and TRL (samples, steps and batch asserted; mean lengths
printed, as each samples its own tokens).
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "tiny-qwen3"
PROMPTS = ROOT / "tests" / "assets" / "prompts.jsonl"
SHAPE = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64)
RUN = dict(prompts=32, new_tokens=256, steps=8, batch=4, temperature=1.6, top_k=20, top_p=0.8, lr=1e-5, seed=42)

TRL_DRIVER = r'''
import json, sys, time
t0 = time.perf_counter()
import datasets
from trl.experimental.ssd import SSDConfig, SSDTrainer
model_dir, prompts_file, out, run = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
rows = [json.loads(line) for line in open(prompts_file)][:run["prompts"]]
dataset = datasets.Dataset.from_list([{"prompt": r["messages"]} for r in rows])
config = SSDConfig(
    output_dir=out, max_steps=run["steps"], per_device_train_batch_size=run["batch"], gradient_accumulation_steps=1,
    generation_batch_size=run["prompts"], num_iterations=1, max_prompt_length=4096,
    max_completion_length=run["new_tokens"], temperature=run["temperature"], top_k=run["top_k"], top_p=run["top_p"],
    filter_empty=True, learning_rate=run["lr"], lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.1,
    adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, gradient_checkpointing=True, bf16=False,
    use_cpu=True, save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1, seed=run["seed"],
    dataloader_num_workers=0, disable_tqdm=True)
t1 = time.perf_counter()
trainer = SSDTrainer(model=model_dir, args=config, train_dataset=dataset)
t2 = time.perf_counter()
trainer.train()
t3 = time.perf_counter()
trainer.save_model(out)
t4 = time.perf_counter()
logs = [row for row in trainer.state.log_history if "completions/mean_length" in row]
print("E2E " + json.dumps({"steps": trainer.state.global_step, "batch": config.per_device_train_batch_size,
                           "samples": trainer.args.generation_batch_size,
                           "mean_completion_tokens": logs[0]["completions/mean_length"],
                           "phases_s": {"imports": t1 - t0, "model load": t2 - t1, "generate + train": t3 - t2,
                                        "save": t4 - t3}}))
'''


def write_model(out: Path):
    """The random 26.2M Qwen3 (transformers' init, seed 0), fp32, with the tiny tokenizer and its end tokens."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    config = Qwen3Config(**SHAPE, tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1e6,
                         rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=[2047, 2045], pad_token_id=2045)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [2047, 2045], 2045
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def timed(cmd: list, env: dict, log: Path) -> tuple:
    """(wall seconds, peak RSS in MiB, stdout) of one fresh child process; fails loudly if it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd[:3]))} ... failed (exit {proc.returncode}); its output is in {log}:\n"
                 + text[-3000:])
    return seconds, usage.ru_maxrss / 1024, text  # Linux reports KiB


def run_ssd(ssd_py: Path, model: Path, work: Path, env: dict) -> dict:
    out = work / "ssd-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ssd_py), "--model_name_or_path", str(model), "--dataset_path", str(PROMPTS),
           "--prompt_column", "messages", "--max_prompts", str(RUN["prompts"]), "--output_dir", str(out),
           "--max_completion_length", str(RUN["new_tokens"]), "--temperature", str(RUN["temperature"]),
           "--top_k", str(RUN["top_k"]), "--top_p", str(RUN["top_p"]), "--max_steps", str(RUN["steps"]),
           "--per_device_train_batch_size", str(RUN["batch"]), "--gradient_accumulation_steps", "1",
           "--learning_rate", str(RUN["lr"]), "--warmup_steps", "1", "--seed", str(RUN["seed"])]
    seconds, rss, text = timed(cmd, env, work / "ssd.log")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "model.safetensors").is_file(), "ssd.py saved no model"
    kept = [s for s in samples if s["keep"]]
    return dict(seconds=seconds, rss=rss, samples=len(samples), kept=len(kept), steps=len(metrics),
                batch=RUN["batch"], mean_tokens=statistics.mean(s["completion_tokens"] for s in samples),
                phases=[line for line in text.splitlines() if line.startswith(("phase", "[phase"))])


def run_trl(python: str, model: Path, work: Path, env: dict) -> dict:
    out = work / "trl-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [python, "-c", TRL_DRIVER, str(model), str(PROMPTS), str(out), json.dumps(RUN)]
    seconds, rss, text = timed(cmd, env, work / "trl.log")
    line = next(line for line in text.splitlines() if line.startswith("E2E "))
    report = json.loads(line[4:])
    assert (out / "model.safetensors").is_file(), "TRL saved no model"
    return dict(seconds=seconds, rss=rss, samples=report["samples"], kept=None, steps=report["steps"],
                batch=report["batch"], mean_tokens=report["mean_completion_tokens"],
                phases=[f"{k} {v:.1f} s" for k, v in report["phases_s"].items()])


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl_python", default="/work/trl-venv/bin/python",
                        help="an interpreter with trl==1.15.0 installed ('' skips TRL)")
    parser.add_argument("--ssd", nargs="+", type=Path, default=[ROOT / "ssd.py"],
                        help="one or more ssd.py files to time, each as its own row")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    for ssd_py in args.ssd:
        if not ssd_py.is_file():
            sys.exit(f"--ssd {ssd_py}: no such file; pass the path of an ssd.py")
    trl = args.trl_python
    if trl and subprocess.run([trl, "-c", "import trl.experimental.ssd"], capture_output=True).returncode:
        print(f"TRL skipped: {trl} cannot import trl.experimental.ssd (install trl==1.15.0 there)")
        trl = ""
    elif not trl:
        print("TRL skipped: no --trl_python")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    n_params = write_model(work / "model")
    print(f"# ssd.py vs TRL SSDTrainer, end to end\n\n{datetime.date.today()} | {args.threads} threads | random "
          f"Qwen3 {n_params / 1e6:.1f}M | load before {load()} | `python {' '.join(sys.argv)}`\n", flush=True)
    runs = {f"ssd.py ({p})": (lambda p=p: run_ssd(p.resolve(), work / "model", work, env)) for p in args.ssd}
    if trl:
        runs["TRL 1.15 SSDTrainer"] = lambda: run_trl(trl, work / "model", work, env)
    results = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            res = fn()
            results[name].append(res)
            print(f"repeat {r + 1}: {name}: {res['seconds']:.1f} s, peak {res['rss']:,.0f} MiB, {res['samples']} "
                  f"samples (mean {res['mean_tokens']:.0f} tokens), {res['steps']} steps of {res['batch']}; load "
                  f"{load()}" + "".join(f"\n    {p}" for p in res["phases"]), flush=True)
    for name, rs in results.items():
        work_done = {(res["samples"], res["steps"], res["batch"]) for res in rs}
        assert work_done == {(RUN["prompts"], RUN["steps"], RUN["batch"])}, f"{name} did other work: {work_done}"
    base = next(iter(results))
    med = {name: {k: statistics.median(res[k] for res in rs) for k in ("seconds", "rss", "mean_tokens")}
           for name, rs in results.items()}
    print(f"\nload after {load()}\n\n| run | wall s (median of {args.repeats}) | peak RSS MiB | samples x mean "
          f"new tokens | steps x batch | wall vs {base} | memory vs {base} |\n|---|---|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['seconds']:.1f} | {m['rss']:,.0f} | {RUN['prompts']} x {m['mean_tokens']:.0f} | "
              f"{RUN['steps']} x {RUN['batch']} | {m['seconds'] / med[base]['seconds']:.2f}x | "
              f"{m['rss'] / med[base]['rss']:.2f}x |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
