"""Time ssd's kernels. Sampling: one sampling step, the fused Triton kernel against torch's sort-based top-k / top-p
(the eager pipeline of transformers' warpers + softmax + multinomial), at several batch sizes over a Qwen3-sized
vocabulary. Attention: one layer of paged decode attention on Qwen3-4B's shape (32 query heads, 8 kv heads, head_dim
128, bf16, blocks of 256 tokens), the Triton flash-decoding kernel against the H100's memory floor and the reference.

    python bench/bench_kernel.py [--kernels sampling attention] [--vocab 151936] [--batches 1 8 64 256] [--iters 50]

Prints markdown tables. On CUDA the sampling table also checks that the fused kernel draws the reference's tokens (its
last column: equal up to float-borderline top-p / min-p decisions). Without CUDA it times the torch references on CPU.
"""

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd_kernels import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_reference,
    sample_next_token,
    sample_next_token_reference,
)
from ssd_kernels.paged_attention import choose_splits  # noqa: E402

H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 peak: the floor for a kernel that must read every K/V byte once

CONFIGS = {  # name -> sampling parameters (the paper's data-generation setting first)
    "T=1.6 k=20 p=0.8": dict(temperature=1.6, top_k=20, top_p=0.8, min_p=0.0),
    "T=1.0 p=0.95": dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0),
    "T=0.7 min_p=0.05": dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.05),
    "T=1.0": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
}


def lm_like_logits(batch, vocab, device, gen):
    """Roughly language-model shaped rows: a Gaussian bulk and a few dozen boosted tokens per row."""
    x = torch.randn(batch, vocab, generator=gen) * 2.5
    boost = torch.rand(batch, 40, generator=gen) * 12.0
    x.scatter_add_(1, torch.randint(0, vocab, (batch, 40), generator=gen), boost)
    return x.to(device)


def torch_sort_sample(logits, temperature, top_k, top_p, min_p):
    """The usual eager pipeline: warpers with a full sort for top-p, then softmax and torch.multinomial."""
    x = logits.float() / temperature
    if top_k > 0:
        x = x.masked_fill(x < torch.topk(x, top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        vals, order = torch.sort(x, dim=-1)
        remove = vals.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        x = x.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1).squeeze(1)


def time_ms(fn, iters, cuda):
    """Median milliseconds per call after a warmup (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_sampling(args, cuda, device):
    gen = torch.Generator().manual_seed(0)
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}, vocab {args.vocab}, fp32 logits, median of {args.iters}\n")
        print("| config | batch | fused Triton (us) | torch sort-based (us) | speed-up | same token as reference |")
        print("|---|---|---|---|---|---|")
    else:
        print(f"no CUDA device: timing the torch reference on CPU only (vocab {args.vocab}); the fused-kernel and "
              "sort-based CUDA rows need a GPU\n")
        print("| config | batch | torch reference on CPU (ms) |")
        print("|---|---|---|")
    for name, cfg in CONFIGS.items():
        for batch in args.batches if cuda else [b for b in args.batches if b <= 8]:
            logits = lm_like_logits(batch, args.vocab, device, gen)
            ids = dict(seed=0, seq_ids=torch.arange(batch, device=device),
                       positions=torch.full((batch,), 100, device=device))
            if not cuda:
                step = functools.partial(sample_next_token_reference, logits, **cfg, **ids)
                ms = time_ms(step, max(3, args.iters // 10), False)
                print(f"| {name} | {batch} | {ms:.1f} |")
                continue
            fused = time_ms(functools.partial(sample_next_token, logits, **cfg, **ids), args.iters, True)
            eager = time_ms(functools.partial(torch_sort_sample, logits, **cfg), args.iters, True)
            same = (sample_next_token(logits, **cfg, **ids) == sample_next_token_reference(logits, **cfg, **ids))
            print(f"| {name} | {batch} | {fused * 1e3:.0f} | {eager * 1e3:.0f} | {eager / fused:.1f}x | "
                  f"{same.float().mean().item():.3f} |")


def decode_batch(batch, context, device, dtype, pool_blocks, table_sets=1, heads=32, kv_heads=8, dim=128,
                 block_size=256):
    """Every row at `context` tokens, its blocks drawn at random from a pool of `pool_blocks`. Returns q, the caches,
    `table_sets` block tables (a timing loop cycles through them, so consecutive calls read different blocks and even
    small batches are timed from HBM rather than from L2) and the lengths."""
    width = context // block_size
    k, v = (torch.randn(pool_blocks, kv_heads, block_size, dim, device=device, dtype=dtype) for _ in "kv")
    tables = [torch.randint(0, pool_blocks, (batch, width), device=device, dtype=torch.int32)
              for _ in range(table_sets)]
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    return torch.randn(batch, heads, dim, device=device, dtype=dtype), k, v, tables, lens


def time_cycling(attention, q, k, v, tables, lens, iters):
    """Median microseconds of attention on CUDA, each call with the next of the block tables."""
    turn = itertools.cycle(tables)
    return time_ms(lambda: attention(q, k, v, next(turn), lens), iters, True) * 1e3


def bench_attention(args, cuda, device):
    heads, kv_heads, dim, block_size = 32, 8, 128, 256
    if not cuda:
        print("\nno CUDA device: timing the paged-attention reference on CPU only (Qwen3-4B shape, fp32); the Triton "
              "rows (time, GB/s, fraction of the H100 floor) need a GPU\n")
        print("| batch | context | reference on CPU (ms) |")
        print("|---|---|---|")
        for batch, context in [(1, 1024), (1, 4096), (8, 1024), (8, 4096)]:
            q, k, v, (tables,), lens = decode_batch(batch, context, device, torch.float32, batch * context // 256)
            step = functools.partial(paged_decode_attention_reference, q, k, v, tables, lens)
            print(f"| {batch} | {context} | {time_ms(step, max(3, args.iters // 10), False):.1f} |")
        return
    print(f"\npaged decode attention, one layer: H {heads}, KV {kv_heads}, D {dim}, bf16, block {block_size}, every "
          f"row at the context, median of {args.iters}. K/V come from a 4 GiB pool (random blocks, 32 table sets in "
          "turn). GB/s counts the K/V bytes the rows attend to; the floor is reading them at 3.35 TB/s (H100 SXM)\n")
    print("| batch | context | splits | Triton (us) | GB/s | of the H100 floor | reference (us) |")
    print("|---|---|---|---|---|---|---|")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for batch in (1, 64, 256):
        for context in (1024, 8192, 32768):
            case = decode_batch(batch, context, device, torch.bfloat16, 4096, table_sets=32)
            us = time_cycling(paged_decode_attention, *case, iters=args.iters)
            kv_bytes = 2 * batch * context * kv_heads * dim * 2
            ref = "-"  # the reference gathers the rows' K/V and upcasts them to fp32: skipped where that would not fit
            if 3 * kv_bytes <= 12 * 2**30:
                ref = f"{time_cycling(paged_decode_attention_reference, *case, iters=5):.0f}"
            splits = choose_splits(batch, kv_heads, context // block_size, sms)[0]
            print(f"| {batch} | {context} | {splits} | {us:.0f} | {kv_bytes / us / 1e3:.0f} | "
                  f"{kv_bytes / H100_BYTES_PER_S * 1e6 / us:.2f} | {ref} |")
            del case
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=["sampling", "attention"], default=["sampling", "attention"])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256], help="sampling batch sizes")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if "sampling" in args.kernels:
        bench_sampling(args, cuda, device)
    if "attention" in args.kernels:
        bench_attention(args, cuda, device)


if __name__ == "__main__":
    main()
