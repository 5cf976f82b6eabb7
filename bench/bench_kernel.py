"""Time one sampling step: the fused Triton kernel against torch's sort-based top-k / top-p (the eager pipeline of
transformers' warpers + softmax + multinomial), at several batch sizes over a Qwen3-sized vocabulary.

    python bench/bench_kernel.py [--vocab 151936] [--batches 1 8 64 256] [--iters 50]

Prints a markdown table. On CUDA it also checks that the fused kernel draws the reference's tokens (the last column:
equal up to float-borderline top-p / min-p decisions). Without CUDA it times the torch reference on CPU only.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd_kernels import sample_next_token, sample_next_token_reference  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
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


if __name__ == "__main__":
    main()
