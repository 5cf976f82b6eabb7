"""Checks only a GPU can make: the compiled Triton kernel against the reference, and the sampler and a training step
on CUDA. They skip on machines without CUDA (CI); a session with a GPU runs them with `python -m pytest
tests/test_cuda.py` (see bench/gpu_all.sh)."""

import pytest
import torch

import ssd
from ssd_kernels import sample_next_token_reference
from ssd_kernels.triton_sampling import sample_next_token_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SETTINGS = [dict(temperature=1.6, top_k=20, top_p=0.8, min_p=0.0), dict(temperature=1.0, top_k=0, top_p=0.95,
            min_p=0.0), dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.05), dict(temperature=1.0, top_k=0,
            top_p=1.0, min_p=0.0), dict(temperature=1.1, top_k=2000, top_p=0.9, min_p=0.01)]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("vocab", [1000, 151936])
def test_compiled_kernel_draws_the_reference_token(settings, vocab):
    """Race keys are bit-identical by construction; tokens may differ only where a top-p / min-p decision sits within
    float rounding of its threshold (masses are summed in another order), which must be rare."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = 512
    logits = torch.randn(rows, vocab, device="cuda", generator=g) * 3  # LM-like spread: a few dominant tokens
    seq_ids = torch.arange(rows, device="cuda") * 7919
    positions = torch.arange(rows, device="cuda") % 300
    kw = dict(**settings, seed=1234, seq_ids=seq_ids, positions=positions)
    ours = sample_next_token_triton(logits, **kw)
    ref = sample_next_token_reference(logits, **kw)
    assert (ours != ref).sum().item() <= max(1, rows // 500)


def test_generate_and_train_on_cuda(tiny_model_dir, prompts_path, tmp_path):
    """The pipeline's CUDA paths: bf16 sampling with the Triton kernel, then FSDP + bf16 training, saved model."""
    ssd.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(prompts_path), "--prompt_column",
              "messages", "--max_prompts", "16", "--max_completion_length", "64", "--max_steps", "4",
              "--learning_rate", "1e-4", "--output_dir", str(tmp_path)])
    model, _ = ssd.load_model(str(tmp_path), "cuda", torch.float32)
    logits = model(torch.tensor([[1, 2, 3]], device="cuda"), torch.arange(3, device="cuda")[None])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
@torch.no_grad()
def test_cached_greedy_decode_on_cuda_follows_the_full_forward(tiny_model_dir, prompts_path, dtype, tol):
    """The CUDA attention backends of prefill (SDPA) and decode (the Triton paged kernel in a CUDA graph): every
    greedy token is the full forward's argmax (up to `tol` of logit, for near-ties), rows refilled mid-run."""
    import json
    model, tok = ssd.load_model(str(tiny_model_dir), "cuda", dtype)
    rows = [json.loads(line) for line in open(prompts_path)][:6]
    prompts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    prompts = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    out = ssd.generate(model, prompts, max_new_tokens=48, greedy=True, batch_size=4, progress=False)
    for p, (c,) in zip(prompts, out):
        seq = torch.tensor([p + c.tokens], device="cuda")
        logits = model(seq, torch.arange(seq.shape[1], device="cuda")[None])[0, len(p) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(c.tokens, device="cuda")[:, None])[:, 0]
        assert (logits.max(1).values - chosen).max().item() <= tol


def paged_case(batch, max_len, dtype, gen, garbage=True, heads=32, kv_heads=8, dim=128, block_size=256):
    """A Qwen3-4B-like decode batch on CUDA: mixed lengths up to max_len (idle, 1, one block, full), shuffled tables,
    each odd row sharing its neighbour's first block, and with `garbage` 1e30 wherever no row attends."""
    lens = torch.randint(0, max_len + 1, (batch,), device="cuda", generator=gen)
    lens[:4] = torch.tensor([0, 1, block_size, max_len])
    width = -(-max_len // block_size)
    num_blocks = batch * width + 8
    tables = torch.randperm(num_blocks, device="cuda", generator=gen)[:batch * width].view(batch, width)
    tables[1::2, 0] = tables[0::2, 0]
    shape = (num_blocks, kv_heads, block_size, dim)
    k, v = (torch.randn(shape, device="cuda", generator=gen).mul_(1e30 if garbage else 1).to(dtype) for _ in "kv")
    rows, pos = torch.nonzero(torch.arange(width * block_size, device="cuda")[None] < lens[:, None], as_tuple=True)
    blocks, offsets = tables[rows, pos // block_size], pos % block_size
    k[blocks, :, offsets] = torch.randn(len(rows), kv_heads, dim, device="cuda", generator=gen).to(dtype)
    v[blocks, :, offsets] = torch.randn(len(rows), kv_heads, dim, device="cuda", generator=gen).to(dtype)
    q = torch.randn(batch, heads, dim, device="cuda", generator=gen).to(dtype)
    return q, k, v, tables.int(), lens.int()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_compiled_paged_attention_matches_the_reference(dtype, tol):
    """Qwen3-4B decode shapes (H 32, KV 8, D 128, block 256), 64 rows of mixed lengths up to 8K, no host sync."""
    from ssd_kernels import paged_decode_attention_reference
    from ssd_kernels.paged_attention import paged_decode_attention_triton

    case = paged_case(64, 8192, dtype, torch.Generator(device="cuda").manual_seed(0))
    torch.cuda.set_sync_debug_mode("error")  # the kernel path must not synchronise with the host
    try:
        out = paged_decode_attention_triton(*case)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = paged_decode_attention_reference(*case)
    assert out.dtype == dtype and torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    one = paged_decode_attention_triton(*case, num_splits=1)  # the single-split path (no merge) agrees too
    torch.testing.assert_close(one.float(), ref.float(), atol=tol, rtol=tol)


def test_paged_attention_replays_in_a_cuda_graph():
    """Captured once, replayed with new queries, lengths and block tables in the same tensors (the engine's decode
    graph): every replay matches the reference. 8 rows of 16 blocks take several splits, so the merge is captured."""
    from ssd_kernels import paged_decode_attention_reference
    from ssd_kernels.paged_attention import paged_decode_attention_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, tables, lens = paged_case(8, 4096, torch.bfloat16, gen, garbage=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        paged_decode_attention_triton(q, k, v, tables, lens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention_triton(q, k, v, tables, lens)
    for step in range(4):
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen))
        lens.copy_(torch.randint(0, 4097, lens.shape, device="cuda", generator=gen))
        lens[step] = 0
        tables.copy_(torch.randint(0, k.shape[0], tables.shape, device="cuda", generator=gen))
        graph.replay()
        ref = paged_decode_attention_reference(q, k, v, tables, lens)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def chat_prompts(tok, prompts_path, n):
    import json
    rows = [json.loads(line) for line in open(prompts_path)][:n]
    return [tok(tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False).input_ids for r in rows]


@torch.no_grad()
def test_graphed_decode_draws_what_eager_decode_draws(tiny_model_dir, prompts_path, monkeypatch):
    """The CUDA graphs replay exactly the eager steps: the same samples, token for token, with a pool small enough
    to preempt and more sequences than rows (padded graph batches, refills)."""
    model, tok = ssd.load_model(str(tiny_model_dir), "cuda", torch.float32)
    prompts = chat_prompts(tok, prompts_path, 12)
    kw = dict(max_new_tokens=96, num_samples=3, temperature=1.6, top_k=20, top_p=0.8, seed=5, batch_size=20,
              cache_tokens=6 * 512, block_size=64, progress=False)
    stats = {}
    graphed = ssd.generate(model, prompts, stats=stats, **kw)
    assert stats["preemptions"] > 0
    monkeypatch.setattr(ssd, "GraphedDecode", lambda step, width, rows, device: ssd.eager_decode(step))
    eager = ssd.generate(model, prompts, **kw)
    assert graphed == eager


@torch.no_grad()
def test_samples_on_cuda_barely_depend_on_the_batch(tiny_model_dir, prompts_path):
    """On CPU the samples are bit-identical across batch sizes (tests/test_generate.py). On CUDA, cuBLAS may pick
    another kernel for another batch, so a near-tie can flip; in fp32 with TF32 off that must stay rare."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = ssd.load_model(str(tiny_model_dir), "cuda", torch.float32)
    prompts = chat_prompts(tok, prompts_path, 16)
    kw = dict(max_new_tokens=64, num_samples=2, temperature=1.0, top_k=20, seed=3, progress=False)
    runs = [ssd.generate(model, prompts, batch_size=b, **kw) for b in (1, 7, 64)]
    same = [sum(a == b for ra, rb in zip(runs[0], r) for a, b in zip(ra, rb)) for r in runs[1:]]
    assert min(same) >= 0.9 * len(prompts) * 2, same


@torch.no_grad()
def test_moe_grouped_matmul_matches_the_expert_loop():
    """bf16 on CUDA runs the experts through F.grouped_mm over padded groups; fp32 takes the per-expert loop. The
    same weights give the same output (bf16 rounding aside), some experts receiving no token at all."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(hidden_size=64, num_experts=16, experts_per_token=4, moe_intermediate_size=32,
                          norm_topk_prob=True)
    torch.manual_seed(0)
    moe = ssd.MoE(cfg).cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 64, device="cuda")  # 10 tokens x 4 choices: at most 40 of 16 experts' slots, some empty
    loop = moe(x)
    grouped = moe.to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(grouped.float(), loop, atol=5e-2, rtol=5e-2)


def test_self_test_passes_every_fast_path_on_cuda(tiny_model_dir):
    """The startup self-test on this GPU: every fast path compiles, runs and agrees with its reference (a failure
    here is what a run would warn about and route around)."""
    status = ssd.self_test(torch.device("cuda"), dict.fromkeys(ssd.FAST_PATHS, True), str(tiny_model_dir))
    assert status == dict.fromkeys(ssd.FAST_PATHS, "ok"), status
