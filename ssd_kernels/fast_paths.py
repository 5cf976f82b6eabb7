"""The fast paths: code only CUDA has, each standing in for a torch reference that computes the same thing.

There are five, each with an ssd.py flag of its name: the fused Triton sampler and the Triton paged decode attention
(in this package), and, in ssd.py's engine and model, decode steps replayed as CUDA graphs, flash attention's varlen
kernel for packed bf16 rows and F.grouped_mm over all MoE experts at once. FAST_PATHS says which are in use: code
with a fast path takes it while its entry is on, its reference otherwise.

Self-test: before any weights load, self_test runs each path the flags allow once on a small input against its
reference (the same computation with the path off) and keeps it only if the two agree; off CUDA every path is off,
and a path that fails on any rank is off on every rank.

Fall-back: a path that fails its self-test, raises a Triton error later in the run (call_fast) or cannot capture a
CUDA graph is off for the rest of the run, with one warning line, and its reference takes over. FAST_PATH_STATUS
says what happened to each path; ssd.py records it in ssd_config.json.

The checks of the model's paths take the ssd.py code they run as arguments: this package never imports ssd (ssd.py
runs as __main__, and `import ssd` would run a second copy of it).
"""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

# The fast paths in use: ssd.py's flags, less any that failed its self-test or, detectably, later in the run.
FAST_PATHS = dict.fromkeys(("fused_sampler", "paged_attention", "cuda_graphs", "flash_varlen", "grouped_mm"), True)
FAST_PATH_DEVICES = ("cuda",)  # the device types that have them; every other device runs the torch references
FAST_PATH_STATUS = {}  # path -> "ok", "off (why)" or "fell back (error)": what self_test found, and any fall-back since


class CudaContextBroken(RuntimeError):
    """A self-test's kernel faulted and left the CUDA context unusable: the run cannot go on (the message says how)."""


def fall_back(name: str, error: BaseException, when: str = "during the run"):
    """Turn fast path `name` off for the rest of the run, with one warning line naming it and the error."""
    FAST_PATHS[name] = False
    if not FAST_PATH_STATUS.get(name, "").startswith("fell back"):
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        FAST_PATH_STATUS[name] = f"fell back ({reason})"
        print(f"warning: fast path {name} failed {when} ({reason}); its torch reference replaces it for the rest of "
              f"the run (--no-{name} skips it)", file=sys.stderr, flush=True)


def call_fast(name: str, fast, reference, *args, **kwargs):
    """`fast` while FAST_PATHS[name] is on, else `reference`. Triton raises its errors (out of resources, a failed
    compile) on the host before anything is launched, so the reference can take over at once, safely."""
    if FAST_PATHS[name]:
        try:
            return fast(*args, **kwargs)
        except Exception as e:
            if not type(e).__module__.startswith("triton"):
                raise
            fall_back(name, e)
    return reference(*args, **kwargs)


# Self-test: each path runs once on a small input against its torch reference, before any weights load.

def agree(name: str, run, tol: float):
    """The tensors run() returns with fast path `name` on must match those with it off (its reference)."""
    FAST_PATHS[name] = True
    fast = run()
    if not FAST_PATHS[name]:
        raise RuntimeError(f"{name} fell back while it ran")  # its warning named the error
    FAST_PATHS[name] = False
    reference = run()
    FAST_PATHS[name] = True
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def check_graphs(device, Transformer, model_config_from_hf, generate):
    """Decode windows of a tiny random model replayed from CUDA graphs (padding rows, several batch sizes, refills,
    rows ending early) against the same steps launched one by one: the same tokens. The model and generate() are
    ssd.py's, passed in."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Transformer(model_config_from_hf(dict(
            model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256))).to(device)
        model.model.embed_tokens.weight.data.mul_(0.2)  # tied head: logits spread enough for the draws to vary
        prompts = [torch.randint(0, 256, (n,)).tolist() for n in (3, 17, 40, 9, 25, 1, 33)]
    kw = dict(max_new_tokens=20, num_samples=2, temperature=1.0, seed=1, batch_size=5, block_size=16,
              cache_tokens=10 * 16, eos_token_ids=list(range(24)), progress=False)  # small: it preempts too
    agree("cuda_graphs", lambda: [torch.tensor(c.tokens) for cs in generate(model, prompts, **kw) for c in cs], 0)


def check_varlen_and_grouped_mm(device, name: str, MoE, document_attention, Documents):
    """Packed bf16 rows through flash attention's varlen kernel (with GQA) against one SDPA per sequence, or MoE
    experts through F.grouped_mm against the loop over experts (some get no token): outputs and gradients. The
    MoE layer, the attention and its packed-rows description are ssd.py's, passed in."""
    g = torch.Generator(device).manual_seed(0)
    moe = MoE(SimpleNamespace(hidden_size=64, num_experts=16, experts_per_token=2, moe_intermediate_size=32,
                              norm_topk_prob=True)).to(device, torch.bfloat16)
    for p in moe.parameters():
        p.data.normal_(0, 0.2, generator=g)
    lens = [1, 37, 128, 90]
    docs = Documents(F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(device, torch.int32), lens)
    qkv = [torch.randn(1, sum(lens), h, 64, generator=g, device=device, dtype=torch.bfloat16) for h in (8, 2, 2)]

    def run():
        leaves = [t.clone().requires_grad_() for t in ([qkv[0][:, :6, 0]] if name == "grouped_mm" else qkv)]
        y = moe(*leaves) if name == "grouped_mm" else document_attention(*leaves, docs)
        weights = [moe.gate_up_proj, moe.down_proj] if name == "grouped_mm" else []
        return [y, *torch.autograd.grad(y.float().square().sum(), leaves + weights)]
    agree(name, run, 5e-2)


def self_test(device, enabled: dict, checks: dict) -> dict:
    """Run the checks (path -> a function that raises if the path disagrees with its reference) of the paths
    `enabled` allows and the device has; set FAST_PATHS and return each one's status. One that fails on any rank is
    off on every rank. CUDA graphs need both Triton paths: their references sync with the host."""
    status = FAST_PATH_STATUS
    status.clear()
    for name, check in checks.items():
        FAST_PATHS[name] = bool(enabled[name])
        if not FAST_PATHS[name] or device.type not in FAST_PATH_DEVICES:
            status[name] = "off (flag)" if not FAST_PATHS[name] else f"off ({device.type})"
        elif name == "cuda_graphs" and not (FAST_PATHS["fused_sampler"] and FAST_PATHS["paged_attention"]):
            FAST_PATHS[name], status[name] = False, "off (its references sync with the host)"
        else:
            try:
                check()
                status[name] = "ok"
            except Exception as e:
                if device.type == "cuda":  # a kernel that faulted leaves the context broken: stop, don't fall back
                    try:
                        torch.cuda.synchronize(device)
                    except Exception:
                        raise CudaContextBroken(f"fast path {name} broke the CUDA context in its self-test ({e}); "
                                                f"rerun with --no-{name}") from None
                fall_back(name, e, "its self-test")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give back what the checks took: the KV pool is sized from the free memory
    if dist.is_initialized() and dist.get_world_size() > 1:
        on = torch.tensor([FAST_PATHS[n] for n in checks], dtype=torch.int32, device=device)
        dist.all_reduce(on, op=dist.ReduceOp.MIN)
        for name, ok in zip(checks, on.tolist()):
            if FAST_PATHS[name] and not ok:
                FAST_PATHS[name], status[name] = False, "fell back (on another rank)"
    return dict(status)
