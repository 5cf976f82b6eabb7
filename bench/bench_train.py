"""Training throughput of ssd.py's training phase on random models and random token ids; prints markdown tables.

    python bench/bench_train.py                          # CPU: tiny and small random Qwen3s, fp32, both workloads
    python bench/bench_train.py --threads 1              # CPU, one thread: steadier on a machine shared with others
                                                         # (2 threads on 2 busy cores ran up to 20x slower)
    python bench/bench_train.py --threads 1 --workload longtail --steps 16   # CPU: packed vs padded only, 13 steps
    python bench/bench_train.py --models qwen3-1.7b --workload longtail      # CUDA: packed vs padded, 8 x <= 8192
    python bench/bench_train.py --models qwen3-1.7b      # CUDA: Qwen3-1.7B shape, FSDP2 on 1 GPU, bf16, checkpointing

Each model is written as a Hugging Face checkpoint to a temporary folder and trained by `ssd.train_phase` (the code
the CLI runs: FSDP2, activation checkpointing, chunked cross-entropy, hand-written AdamW) for --steps optimizer steps
of --batch_size sequences (an eighth of each sequence is prompt). The first --skip steps (warm-up: allocator, lazy
FSDP init) are left out of the rates. Two workloads (--workload fixed, longtail or both):

fixed: every sequence --seq_len tokens, packed into one micro-batch per step. tokens/s counts every token.
Model FLOP/s = (6 N + 12 L H Q T) * tokens/s, with N parameters, L layers, H heads, Q head_dim, T sequence length
(activation checkpointing's recomputation is not counted); MFU divides it by the dense bf16 peak of
ssd.PEAK_BF16_FLOPS (989e12 on H100).

longtail: sequence lengths drawn (seed 0) from a lognormal with median --max_len/16 and sigma 1, clipped to
[16, --max_len], and one sequence in 16 set to --max_len (length-capped completions). Each model trains twice on the
same sequences, steps and optimizer: `packed` is train_phase as it is (first-fit-decreasing micro-batches of at most
--max_tokens tokens, sequences end to end with document masking); `padded` is the previous design (ssd.py before
packing): train_phase with ssd.pack swapped for the old collate, so each step's --batch_size sequences are one
micro-batch of rows right-padded to the longest and run with layout=None (whole causal rows). tokens/s counts only
real tokens for both; the padded row also shows how much of what it computed was padding. Both runs see the same
sequences in the same steps (asserted) and their losses must agree (printed).
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ssd  # noqa: E402

SHAPES = {  # Qwen3 configs: (vocab, hidden, intermediate, layers, heads, kv heads, head_dim); all tied embeddings
    "tiny": (2048, 64, 128, 2, 4, 2, 16),  # tests/assets/tiny-qwen3
    "small": (8192, 512, 1536, 4, 8, 4, 64),
    "qwen3-1.7b": (151936, 2048, 6144, 28, 16, 8, 128),
}


def write_random_model(name: str, out: Path, device, dtype: torch.dtype) -> ssd.ModelConfig:
    """A random Qwen3 of shape `name` saved as a Hugging Face checkpoint (tiny test tokenizer) in `out`."""
    from transformers import AutoTokenizer
    vocab, hidden, inter, layers, heads, kv, head_dim = SHAPES[name]
    hf = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
          "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": kv, "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
          "tie_word_embeddings": True, "max_position_embeddings": 40960, "eos_token_id": 2047,
          "torch_dtype": str(dtype).removeprefix("torch.")}
    cfg = ssd.model_config_from_hf(hf, {"eos_token_id": [2047]}, [2047])
    with torch.device(device):
        model = ssd.Transformer(cfg)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "assets" / "tiny-qwen3")
    ssd.save_model(model, tokenizer, out, state_dict={k: v.to(dtype) for k, v in model.state_dict().items()})
    del model
    return cfg


def synthetic_sequences(n: int, seq_len: int, vocab: int) -> list:
    """Sequences as train_phase takes them: (random int32 ids, prompt length), every one exactly seq_len long."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (seq_len,), generator=g, dtype=torch.int32), max(1, seq_len // 8))
            for _ in range(n)]


def longtail_sequences(n: int, max_len: int, vocab: int) -> list:
    """n (ids, prompt length) sequences of long-tailed lengths: lognormal, median max_len / 16, sigma 1, clipped to
    [16, max_len]; one in 16 (at least one) exactly max_len. The prompt is an eighth of each."""
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randn(n, generator=g) + torch.log(torch.tensor(max_len / 16))).exp().round().clamp(16, max_len)
    lengths[torch.randperm(n, generator=g)[:max(1, n // 16)]] = max_len
    return [(torch.randint(0, vocab, (int(k),), generator=g, dtype=torch.int32), max(1, int(k) // 8))
            for k in lengths]


def padded_rows(seqs: list, device) -> tuple:
    """ssd.pack's stand-in for the padded baseline: the collate of ssd.py before packing (git show 4762832:ssd.py),
    rows right-padded to the longest, targets -100 on prompts, padding and last positions; layout None = causal rows."""
    width = max(len(ids) for ids, _ in seqs)
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.full_like(inputs, -100)
    for b, (ids, n_prompt) in enumerate(seqs):
        inputs[b, :len(ids)] = torch.as_tensor(ids)
        targets[b, n_prompt - 1:len(ids) - 1] = inputs[b, n_prompt:len(ids)]  # position t predicts token t + 1
    positions = torch.arange(width).expand(len(seqs), -1)
    return inputs.to(device), positions.to(device), targets.to(device), None


def train(cfg: ssd.Config, model_dir: Path, seqs: list, work: Path, device, padded: bool = False) -> list:
    """ssd.train_phase on one rank (padded: with ssd.pack swapped for padded_rows); its metrics.jsonl rows."""
    work.mkdir()
    with mock.patch.object(ssd, "pack", padded_rows) if padded else contextlib.nullcontext():
        ssd.train_phase(cfg, str(model_dir), seqs, work, 0, 1, device)
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def bench_longtail(name: str, mcfg: ssd.ModelConfig, tmp: Path, args, device) -> list:
    """Packed and padded training of model `name` (in tmp / "model") on the same long-tailed sequences: one result
    per layout."""
    cuda = device.type == "cuda"
    seqs = longtail_sequences(args.batch_size * args.steps, args.max_len, mcfg.vocab_size)
    lengths = [len(ids) for ids, _ in seqs]
    packed = ssd.Config(max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                        gradient_accumulation_steps=1, max_tokens_per_microbatch=args.max_tokens,
                        learning_rate=1e-5, warmup_steps=1, save_steps=10**9, logging_steps=1,
                        gradient_checkpointing=not args.no_checkpointing, bf16=True)
    # A cap no step can reach: first-fit puts a step's batch_size sequences in one micro-batch, as the old
    # collate did for batches under its cap.
    padded = dataclasses.replace(packed, max_tokens_per_microbatch=args.batch_size * args.max_len)
    results = []
    for layout, cfg in (("packed", packed), ("padded", padded)):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rows = train(cfg, tmp / "model", seqs, tmp / f"longtail-{layout}", device, layout == "padded")[args.skip:]
        computed = 0
        for r in rows:
            for mb in ssd.step_microbatches(lengths, r["step"] - 1, cfg, 1)[0]:
                widths = [lengths[i] for i in mb]
                computed += len(mb) * max(widths) if layout == "padded" else sum(widths)
        results.append({"layout": layout, "model": name, "sequences": args.batch_size * len(rows),
                        "tokens": sum(r["tokens"] for r in rows), "computed": computed,
                        "seconds": sum(r["tokens"] / r["tokens_per_s"] for r in rows),
                        "micro_batches": sum(r["micro_batches"] for r in rows), "losses": [r["loss"] for r in rows],
                        "peak_gb": max(r["peak_memory_gb"] for r in rows) if cuda else None})
    assert results[0]["tokens"] == results[1]["tokens"], "packed and padded trained on different tokens"
    return results


def bench(name: str, mcfg: ssd.ModelConfig, tmp: Path, args, device) -> dict:
    """The fixed workload on model `name` (in tmp / "model")."""
    cuda = device.type == "cuda"
    vocab, hidden, inter, layers, heads, kv, head_dim = SHAPES[name]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = ssd.Config(max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                     gradient_accumulation_steps=1, max_tokens_per_microbatch=args.batch_size * args.seq_len,
                     learning_rate=1e-5, warmup_steps=1, save_steps=10**9, logging_steps=1,
                     gradient_checkpointing=not args.no_checkpointing, bf16=True)
    seqs = synthetic_sequences(args.batch_size * args.steps, args.seq_len, vocab)
    rows = train(cfg, tmp / "model", seqs, tmp / "fixed", device)[args.skip:]
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    rate = tokens / seconds
    n_params = param_count(mcfg)
    threads = torch.get_num_threads()
    flops_per_token = 6 * n_params + 12 * layers * heads * head_dim * args.seq_len
    result = {"model": name, "params": n_params, "tokens/s": rate, "flops": flops_per_token * rate,
              "device": torch.cuda.get_device_name(device) if cuda else f"CPU, {threads} thread{'s' * (threads > 1)}",
              "dtype": "bf16 on fp32 master weights" if cuda else "fp32"}
    if cuda:
        peak = next((v for k, v in ssd.PEAK_BF16_FLOPS.items() if k in result["device"]), None)
        result["mfu"] = flops_per_token * rate / peak if peak else None
        result["peak_gb"] = max(r["peak_memory_gb"] for r in rows)
    return result


def param_count(mcfg: ssd.ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in ssd.Transformer(mcfg).parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help=f"comma-separated, of {', '.join(SHAPES)} "
                    "(default: tiny,small on CPU, qwen3-1.7b on CUDA)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the rate")
    ap.add_argument("--batch_size", type=int, default=0, help="sequences per step (default 4 on CPU, 8 on CUDA)")
    ap.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (default 256 on CPU, 2048 on CUDA)")
    ap.add_argument("--no_checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's, one per core)")
    ap.add_argument("--workload", default="both", choices=["fixed", "longtail", "both"])
    ap.add_argument("--max_len", type=int, default=0,
                    help="longtail: longest sequence (default 1024 on CPU, 8192 on CUDA)")
    ap.add_argument("--max_tokens", type=int, default=0,
                    help="longtail, packed: --max_tokens_per_microbatch (default --max_len, as ssd's defaults: 65536 "
                    "tokens per micro-batch, 65536-token completions)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps <= args.skip:
        ap.error("--steps must be larger than --skip")
    cuda = torch.cuda.is_available()
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.seq_len = args.seq_len or (2048 if cuda else 256)
    args.max_len = args.max_len or (8192 if cuda else 1024)
    args.max_tokens = args.max_tokens or args.max_len
    if args.max_len < 16:
        ap.error("--max_len must be at least 16")
    models = args.models.split(",") if args.models else (["qwen3-1.7b"] if cuda else ["tiny", "small"])
    if any(m not in SHAPES for m in models):
        ap.error(f"--models: choose from {', '.join(SHAPES)}")

    _, _, device = ssd.init_distributed()  # a one-rank group, as the CLI makes
    fixed, longtail = [], []
    try:
        for name in models:  # each model is written once, for both workloads
            tmp = Path(tempfile.mkdtemp(prefix=f"bench-train-{name}-"))
            try:
                mcfg = write_random_model(name, tmp / "model", device,
                                          torch.bfloat16 if device.type == "cuda" else torch.float32)
                if args.workload != "longtail":
                    fixed.append(bench(name, mcfg, tmp, args, device))
                if args.workload != "fixed":
                    longtail.append(bench_longtail(name, mcfg, tmp, args, device))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        torch.distributed.destroy_process_group()

    threads = torch.get_num_threads()
    where = f"{torch.cuda.get_device_name(device)}, bf16" if cuda else \
        f"CPU, {threads} thread{'s' * (threads > 1)}, fp32"
    head = (f"{datetime.date.today()} | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
            f"checkpointing {'off' if args.no_checkpointing else 'on'} | {args.steps - args.skip} timed steps after "
            f"{args.skip}")
    if fixed:
        print(f"\n{head} | batch {args.batch_size} x {args.seq_len} tokens\n")
        print("| model | params | device | dtype | tokens/s | model TFLOP/s | MFU | peak memory |")
        print("|---|---:|---|---|---:|---:|---:|---:|")
        for r in fixed:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            mem = f"{r['peak_gb']:.1f} GiB" if "peak_gb" in r else "-"
            print(f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['device']} | {r['dtype']} | {r['tokens/s']:,.0f} | "
                  f"{r['flops'] / 1e12:.3g} | {mfu} | {mem} |")
    if longtail:
        lengths = sorted(len(ids) for ids, _ in longtail_sequences(args.batch_size * args.steps, args.max_len, 1))
        print(f"\n{head} | {where} | long-tailed lengths: {len(lengths)} sequences, batch {args.batch_size}, mean "
              f"{sum(lengths) / len(lengths):.0f}, median {lengths[len(lengths) // 2]}, max {lengths[-1]} "
              f"({sum(k == args.max_len for k in lengths)} at max) | packed micro-batches <= {args.max_tokens} "
              "tokens\n")
        print("| layout | model | sequences | real tokens | padded tokens computed (share) | micro-batches | seconds | "
              "real tokens/s | packed/padded | peak memory |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for packed, padded in longtail:
            for r in (packed, padded):
                pad = r["computed"] - r["tokens"]
                ratio = f"{packed['tokens'] / packed['seconds'] / (padded['tokens'] / padded['seconds']):.2f}x" \
                    if r is packed else "1.00x"
                mem = f"{r['peak_gb']:.1f} GiB" if r["peak_gb"] is not None else "-"
                print(f"| {r['layout']} | {r['model']} | {r['sequences']} | {r['tokens']:,} | {pad:,} "
                      f"({100 * pad / r['computed']:.0f}%) | {r['micro_batches']} | {r['seconds']:.2f} | "
                      f"{r['tokens'] / r['seconds']:,.0f} | {ratio} | {mem} |")
        for packed, padded in longtail:
            diff = max(abs(a - b) for a, b in zip(packed["losses"], padded["losses"]))
            print(f"\n{packed['model']}: max |packed - padded| step loss over the timed steps: {diff:.2e}", end="")
        print()


if __name__ == "__main__":
    main()
