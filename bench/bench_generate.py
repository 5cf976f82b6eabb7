"""Generation throughput of ssd.generate against transformers' generate; prints markdown tables.

    python bench/bench_generate.py                      # CPU: a random ~31M-parameter Qwen3, fp32
    python bench/bench_generate.py --device cuda        # also decode speed of a Qwen3-4B-shaped model vs bandwidth

Both generators run the same random model (same weights), the same --batch prompts of 50 to 200 random token ids,
--new_tokens new tokens each (no end token: ours gets eos_token_ids=[], transformers' model has no eos_token_id, and
every output is checked to be exactly --new_tokens long), once sampling (T 1.0, top-k 20, top-p 0.8: transformers
with do_sample and its warpers) and once greedy. transformers gets the batch left-padded with an attention mask, as
its batched generate needs. Each measurement is one warm-up run, then the median of --repeats timed runs;
tokens/s counts new tokens only (batch x new_tokens / seconds). Threads: torch's default.

On CUDA, a Qwen3-4B-shaped model (random bf16 weights built on the meta device, so no checkpoint is needed) decodes
at batch 1 and 64. Decode tokens/s = batch x (new_tokens - 1) / (time(new_tokens) - time(1 new token)), so prefill
is left out. The floor is memory bandwidth: each decode step must read every weight once plus the KV cache of every
row up to the current length, so a step takes at least (weight bytes + mean KV bytes per step) / --peak_bandwidth.

--workload longtail (CPU or CUDA): continuous batching against static batches on long-tailed completion lengths.
    python bench/bench_generate.py --workload longtail --repeats 2     # 64 prompts, batch 16, ~10 minutes on 2 cores
Completion lengths are drawn once per prompt (seed 0) from a geometric distribution with mean --mean_new_tokens,
capped at --new_tokens (768): most completions are short and a few run long, as sampled code is. Both generators stop
each prompt at its drawn length through their own end-token path: the end token (the last id) is masked out of every
step's logits except at that prompt's drawn length, where it is the only token left (ours: ssd.sample_next_token
wrapped, the first token included; transformers: a LogitsProcessor). A prompt whose length is the cap ends by the cap.
So both do the same useful work, asserted token for token in count. The wide model samples at T 1.0, top-k 20,
top-p 0.8. transformers runs `generate` with a static cache (`cache_implementation="static"`, its preallocated cache
for --new_tokens) on consecutive fixed batches of --batch prompts in prompt order: a batch decodes until its longest
row ends, its finished rows still computing. Ours is one `ssd.generate` over all prompts with `batch_size=--batch`,
refilling rows as they end; a third run gives it a KV pool of --cache_tokens tokens, too small for every row's
length, so it preempts. Reported: tokens/s (new tokens / wall seconds, prefill included), decode steps against the
ideal (tokens / batch: every step with every row doing useful work), mean rows resident per step, ms per row-step
(seconds / sum over steps of the rows computed, prefill included) and the ratio of tokens/s. Repeats interleave the
three runs; the table gives the median of each.
"""

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ssd  # noqa: E402

# ~30M-parameter Qwen3 shapes, tied embeddings. "wide": 8 x 2.36M block parameters + a 24576 x 512 embedding = 31.5M;
# "deep", narrow and deep like the real Qwen3s: 24 x 0.79M + a 32768 x 256 embedding = 27.3M. The wide one's step is
# dominated by matrix multiplies both generators share; the deep one shows more of the per-layer overhead.
SHAPES = {
    "wide": dict(vocab_size=24576, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "deep": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=24,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.8)
PROMPT_4B = 128  # prompt tokens per row in the 4B decode measurement


def hf_config(shape: dict) -> dict:
    return {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **shape, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "tie_word_embeddings": True, "max_position_embeddings": 40960}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(device, repeats: int, fn, *args) -> float:
    fn(*args)  # warm-up: allocator, kernel selection, Triton compilation
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def small_models(shape, device, dtype):
    """transformers' Qwen3 with its default random init, and our Transformer holding the same weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    config = {k: v for k, v in hf_config(shape).items() if k not in ("model_type", "architectures")}
    hf = Qwen3ForCausalLM(Qwen3Config(**config, bos_token_id=None, eos_token_id=None, pad_token_id=0))
    hf = hf.to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # nothing ends early: every row generates exactly new_tokens
    cfg = ssd.model_config_from_hf(hf_config(shape))
    with torch.device("meta"):
        ours = ssd.Transformer(cfg).to(dtype)
    ours.to_empty(device=device)
    ours.inv_freq = ssd.rope_inv_freq(cfg).to(device)  # fp32, as load_model leaves it
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    return hf, ours.eval()


def random_prompts(batch: int, vocab: int) -> list:
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(50, 200, batch).round().long().tolist() if batch > 1 else [120]
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def ours_generate(model, prompts, new_tokens, mode):
    settings = dict(greedy=True) if mode == "greedy" else SAMPLING
    out = ssd.generate(model, prompts, max_new_tokens=new_tokens, batch_size=len(prompts), eos_token_ids=[],
                       progress=False, seed=0, **settings)
    assert all(len(c.tokens) == new_tokens for row in out for c in row)


@torch.no_grad()
def hf_generate(model, prompts, new_tokens, mode, device):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: transformers' batched generate continues from the last column
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    settings = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, **SAMPLING)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens, pad_token_id=0,
                         **settings)
    assert out.shape[1] == width + new_tokens


def bench_small(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.batch * args.new_tokens
    for name, shape in SHAPES.items():
        hf, ours = small_models(shape, device, dtype)
        n_params = sum(p.numel() for p in ours.parameters())
        prompts = random_prompts(args.batch, shape["vocab_size"])
        for mode in ("sampled", "greedy"):
            t_ours = median_seconds(device, args.repeats, ours_generate, ours, prompts, args.new_tokens, mode)
            t_hf = median_seconds(device, args.repeats, hf_generate, hf, prompts, args.new_tokens, mode, device)
            yield (f"| Qwen3 {n_params / 1e6:.1f}M random, {name} ({shape['num_hidden_layers']} x "
                   f"{shape['hidden_size']}) | {device.type} | {str(dtype).removeprefix('torch.')} | {mode} | "
                   f"{args.batch} | {args.new_tokens} | {tokens / t_ours:,.0f} | {tokens / t_hf:,.0f} | "
                   f"{t_hf / t_ours:.2f}x |")


def random_4b(device):
    """A Qwen3-4B-shaped Transformer with random bf16 weights, built on the meta device then materialised."""
    cfg = ssd.model_config_from_hf(hf_config(QWEN3_4B))
    with torch.device("meta"):
        model = ssd.Transformer(cfg).to(torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.inv_freq = ssd.rope_inv_freq(cfg).to(device)
    return model.eval()


def bench_4b(args, device) -> list:
    model = random_4b(device)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # keys and values, bf16
    rows = []
    for batch in (1, 64):
        prompts = [torch.randint(1, cfg.vocab_size, (PROMPT_4B,), generator=torch.Generator().manual_seed(b)).tolist()
                   for b in range(batch)]
        t_all = median_seconds(device, args.repeats, ours_generate, model, prompts, args.new_tokens, "sampled")
        t_one = median_seconds(device, args.repeats, ours_generate, model, prompts, 1, "sampled")
        decode = batch * (args.new_tokens - 1) / (t_all - t_one)
        # Every row's cache is read up to the current length; over the run its mean is prompt + new_tokens / 2.
        kv_bytes = batch * (PROMPT_4B + args.new_tokens / 2) * kv_bytes_per_token
        floor = batch / ((weight_bytes + kv_bytes) / args.peak_bandwidth)
        rows.append(f"| Qwen3-4B shape, random bf16 | {batch} | {PROMPT_4B} + {args.new_tokens} | {decode:,.0f} | "
                    f"{floor:,.0f} | {decode / floor:.0%} | {weight_bytes / 1e9:.2f} + {kv_bytes / 1e9:.2f} |")
    return rows



def longtail_lengths(n: int, mean: float, cap: int) -> list:
    """n completion lengths (seed 0): geometric with mean `mean` (P(end) = 1 / mean at every token), capped at `cap`."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (torch.log1p(-u) / math.log1p(-1 / mean)).ceil().clamp(1, cap).long().tolist()


def forced_end_sampler(prompts, lengths, cap: int, end: int, device):
    """ssd.sample_next_token with the end token kept for each sequence's drawn length: masked everywhere else, and the
    draw replaced by it at position len(prompt) + length - 1 (seq id i is prompt i). A capped row ends by the cap."""
    real = ssd.sample_next_token
    ends = torch.tensor([len(p) + k - 1 if k < cap else -1 for p, k in zip(prompts, lengths)], device=device)

    def draw(logits, *, seq_ids, positions, **settings):
        logits[:, end] = float("-inf")
        token = real(logits, seq_ids=seq_ids, positions=positions, **settings)
        return torch.where(positions == ends[seq_ids], end, token)
    return draw


def ours_longtail(model, prompts, lengths, args, cache_tokens: int = 0) -> dict:
    end, stats = model.config.vocab_size - 1, {}
    draw = forced_end_sampler(prompts, lengths, args.new_tokens, end, model.head_weight().device)
    with mock.patch.object(ssd, "sample_next_token", draw):
        out = ssd.generate(model, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch, eos_token_ids=[end],
                           cache_tokens=cache_tokens, progress=False, seed=0, stats=stats, **SAMPLING)
    assert [len(row[0].tokens) for row in out] == lengths, "ours did not stop at the drawn lengths"
    return dict(seconds=stats["seconds"], tokens=stats["tokens"], steps=stats["decode_steps"], rows=stats["rows"],
                row_steps=stats["rows"] * stats["decode_steps"], preemptions=stats["preemptions"])


@torch.no_grad()
def hf_longtail(model, prompts, lengths, args, device) -> dict:
    """transformers' generate with a static cache, on consecutive batches of --batch prompts in prompt order."""
    from transformers import LogitsProcessor, LogitsProcessorList
    end = model.config.vocab_size - 1

    class ForcedEnd(LogitsProcessor):  # the same rule as forced_end_sampler, by row of the batch
        def __init__(self, width, ends):
            self.width, self.ends = width, torch.tensor(ends, device=device)

        def __call__(self, input_ids, scores):
            scores[:, end] = float("-inf")
            hit = self.ends == input_ids.shape[1] - self.width  # index of the token being drawn
            scores[hit] = float("-inf")
            scores[hit, end] = 0.0
            return scores
    t0, steps, row_steps, tokens = time.perf_counter(), 0, 0, 0
    for b in range(0, len(prompts), args.batch):
        batch, want = prompts[b:b + args.batch], lengths[b:b + args.batch]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, p in enumerate(batch):  # left padding, as transformers' batched generate needs
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ends = [k - 1 if k < args.new_tokens else -1 for k in want]
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=args.new_tokens,
                             do_sample=True, **SAMPLING, eos_token_id=end, pad_token_id=0,
                             cache_implementation="static", logits_processor=LogitsProcessorList([ForcedEnd(width,
                                                                                                             ends)]))
        new = out[:, width:].cpu()
        got = [int((row == end).nonzero()[0]) + 1 if (row == end).any() else len(row) for row in new]
        assert got == want, "transformers did not stop at the drawn lengths"
        steps, row_steps, tokens = steps + new.shape[1], row_steps + new.numel(), tokens + sum(got)
    sync(device)
    return dict(seconds=time.perf_counter() - t0, tokens=tokens, steps=steps, rows=row_steps / steps,
                row_steps=row_steps, preemptions=0)


def bench_longtail(args, device) -> list:
    """Ours (default pool), ours with a pool that forces preemption, transformers' static batches: interleaved
    repeats, the median of each; one table row each."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf, ours = small_models(SHAPES["wide"], device, dtype)
    prompts = random_prompts(args.prompts, SHAPES["wide"]["vocab_size"] - 1)  # ids below the end token
    lengths = longtail_lengths(args.prompts, args.mean_new_tokens, args.new_tokens)
    print(f"{args.prompts} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens; completion lengths "
          f"mean {statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, max {max(lengths)}, "
          f"{sum(k == args.new_tokens for k in lengths)} at the cap {args.new_tokens}\n")
    runs = {"ours": lambda: ours_longtail(ours, prompts, lengths, args),
            f"ours, {args.cache_tokens:,}-token pool": lambda: ours_longtail(ours, prompts, lengths, args,
                                                                             args.cache_tokens),
            "transformers, static batches": lambda: hf_longtail(hf, prompts, lengths, args, device)}
    warm = max(1, args.batch)  # warm-up: one batch of short completions through each generator
    ours_longtail(ours, prompts[:warm], [min(k, 8) for k in lengths[:warm]], args)
    hf_longtail(hf, prompts[:warm], [min(k, 8) for k in lengths[:warm]], args, device)
    results = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            results[name].append(fn())
            res = results[name][-1]
            print(f"repeat {r + 1}: {name}: {res['seconds']:.1f} s, {res['steps']} steps, "
                  f"{res['preemptions']} preemptions", flush=True)
    assert len({res["tokens"] for rs in results.values() for res in rs}) == 1, "the generators did different work"
    med = {name: {k: statistics.median(res[k] for res in rs) for k in rs[0]} for name, rs in results.items()}
    hf_rate = med["transformers, static batches"]["tokens"] / med["transformers, static batches"]["seconds"]
    rows = []
    for name, m in med.items():
        rate, ideal = m["tokens"] / m["seconds"], m["tokens"] / args.batch
        rows.append(f"| {name} | {m['tokens']:,.0f} | {m['seconds']:.1f} | {rate:,.0f} | {m['steps']:,.0f} | "
                    f"{ideal:,.0f} | {m['steps'] / ideal:.2f} | {m['rows']:.1f} | {m['preemptions']:.0f} | "
                    f"{1e3 * m['seconds'] / m['row_steps']:.2f} | {rate / hf_rate:.2f}x |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", choices=("fixed", "longtail"), default="fixed")
    parser.add_argument("--new_tokens", type=int, default=None, help="fixed: new tokens per row (256); longtail: "
                        "the length cap (768)")
    parser.add_argument("--batch", type=int, default=None, help="rows decoded together (fixed: 8, longtail: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--peak_bandwidth", type=float, default=3.35e12, help="bytes/s; H100 SXM HBM3 by default")
    parser.add_argument("--prompts", type=int, default=64, help="longtail: number of prompts")
    parser.add_argument("--mean_new_tokens", type=float, default=170, help="longtail: mean of the geometric lengths")
    parser.add_argument("--cache_tokens", type=int, default=4096, help="longtail: the KV pool of the preempting run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    longtail = args.workload == "longtail"
    args.new_tokens = args.new_tokens or (768 if longtail else 256)
    args.batch = args.batch or (16 if longtail else 8)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    load = f" | load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"# ssd.generate vs transformers.generate\n\n{datetime.date.today()} | {name} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads{load} | `python {' '.join(sys.argv)}`\n")
    if longtail:
        rows = bench_longtail(args, device)
        print(f"\nload after: {os.getloadavg()[0]:.2f}\n")
        print(f"| engine (batch {args.batch}, cap {args.new_tokens}) | new tokens | s | tok/s | decode steps | ideal "
              "(tokens / batch) | steps / ideal | mean rows resident | preemptions | ms per row-step | vs HF |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        return
    print("| model | device | dtype | decoding | batch | new tokens | ours tok/s | transformers tok/s | ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in bench_small(args, device):
        print(row, flush=True)
    if device.type == "cuda":
        print(f"\n| model | batch | prompt + new | decode tok/s | bandwidth floor tok/s (peak "
              f"{args.peak_bandwidth / 1e12:.2f} TB/s) | of floor | GB read per step (weights + mean KV) |")
        print("|---|---|---|---|---|---|---|")
        for row in bench_4b(args, device):
            print(row, flush=True)


if __name__ == "__main__":
    main()
