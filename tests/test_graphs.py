"""GPU-only host logic, run on CPU against honest stand-ins: GraphedDecode under a stand-in for torch.cuda.CUDAGraph
that records the aten ops its capture runs and replays them on the same tensors (as a CUDA graph replays its kernels
on the same memory; a host sync during capture raises, as it does on CUDA), and default_cache_tokens' arithmetic."""

import contextlib
import functools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ssd
from ssd_kernels import fast_paths, paged_decode_attention_reference, sample_next_token_reference
from ssd_kernels.sampling import inverse_temperature, race_keys, row_keys

aten = torch.ops.aten
HOST_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
              aten.masked_select.default, aten.repeat_interleave.Tensor}  # what cannot be captured in a CUDA graph


class RecordedGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() reruns the recorded ops on the tensors they ran on at capture,
    writing each fresh result into the tensor the capture produced (in-place ops and views act on their memory)."""
    captured = []

    def __init__(self):
        self.ops = []
        RecordedGraph.captured.append(self)

    def replay(self):
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(old, torch.Tensor) and old.numel() and \
                        old.untyped_storage().data_ptr() != fresh.untyped_storage().data_ptr():
                    old.copy_(fresh)

    def pool(self):
        return "pool"


class Capture(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func})")
        out = func(*args, **(kwargs or {}))
        self.graph.ops.append((func, args, kwargs or {}, out))
        return out


class Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


@pytest.fixture
def cuda_graph_standin(monkeypatch):
    """GraphedDecode on CPU: torch.cuda's graph and stream API replaced by the recorder above."""
    monkeypatch.setattr(fast_paths, "FAST_PATH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setitem(ssd.FAST_PATHS, "cuda_graphs", True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: Capture(graph))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    RecordedGraph.captured.clear()
    return RecordedGraph.captured


def sync_free_attention(q, k_cache, v_cache, tables, lens):
    """The reference paged attention over every table column, without its one host sync (the longest row): a
    stand-in for the Triton kernel, which syncs nowhere."""
    (batch, heads, dim), (_, kv, block_size, _) = q.shape, k_cache.shape
    length = tables.shape[1] * block_size
    k, v = (c[tables.long()].transpose(1, 2).reshape(batch, kv, length, dim) for c in (k_cache, v_cache))
    scores = q.reshape(batch, kv, heads // kv, dim) / math.sqrt(dim) @ k.transpose(-1, -2)
    inside = torch.arange(length)[None] < lens[:, None].long()
    out = torch.softmax(scores.masked_fill(~inside[:, None, None], float("-inf")), -1) @ v
    return torch.where((lens > 0)[:, None, None, None], out, 0.0).reshape(batch, heads, dim)


host_inverse_temperature = functools.cache(inverse_temperature)  # a CPU scalar: on CUDA it never syncs the device


def sync_free_sampler(logits, *, temperature, top_k, top_p, min_p, seed, seq_ids, positions):
    """The reference's race without filters (no sort, no nonzero): a stand-in for the fused kernel."""
    assert top_k == 0 and top_p == 1.0 and min_p == 0.0
    x = logits.float() * host_inverse_temperature(temperature)
    race = race_keys(x, row_keys(seed, seq_ids, positions)[:, None], torch.arange(x.shape[1]))
    return torch.where(x > float("-inf"), race, float("-inf")).argmax(-1)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)[0]


@pytest.fixture
def sync_free(monkeypatch):
    monkeypatch.setattr(ssd, "paged_decode_attention", sync_free_attention)
    monkeypatch.setattr(ssd, "sample_next_token", sync_free_sampler)
    for name in ("paged_attention", "fused_sampler"):
        monkeypatch.setitem(ssd.FAST_PATHS, name, True)


def test_graph_standins_are_the_references():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen)
    logits[1, ::3] = float("-inf")
    kw = dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0, seed=4, seq_ids=torch.arange(5) * 2**33,
              positions=torch.arange(5))
    assert torch.equal(sync_free_sampler(logits, **kw), sample_next_token_reference(logits, **kw))
    k, v = torch.randn(2, 6, 2, 16, 8, generator=gen)
    q, tables = torch.randn(3, 4, 8, generator=gen), torch.tensor([[5, 1], [2, 0], [3, 4]])
    lens = torch.tensor([20, 0, 7])
    torch.testing.assert_close(sync_free_attention(q, k, v, tables, lens),
                               paged_decode_attention_reference(q, k, v, tables, lens))


@torch.no_grad()
def test_graphed_decode_replays_every_bucket(tiny, cuda_graph_standin, sync_free):
    """One GraphedDecode of 20 rows, called with batches that fall in every bucket, shrinking and growing, windows
    of 1 to 8 steps and tables narrower than the graph's: each call draws what eager_decode draws from the same
    cache; each bucket is captured once and replayed from then on."""
    cfg, bs, width, rows = tiny.config, 16, 6, 20
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.num_layers, rows * width + 1, cfg.num_kv_heads, bs, cfg.head_dim)
    cache = ssd.PagedKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))

    def draw(logits, seq_ids, positions):
        return ssd.call_fast("fused_sampler", ssd.sample_next_token, sample_next_token_reference, logits,
                             temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, seq_ids=seq_ids,
                             positions=positions)

    def step(*state):
        return ssd.decode_step(tiny, cache, draw, *state)
    graphed, eager = ssd.GraphedDecode(step, width, rows, "cpu"), ssd.eager_decode(step)
    assert graphed.sizes == [1, 2, 4, 8, 16, 20]
    for n, steps in [(20, 8), (13, 8), (16, 3), (9, 8), (8, 1), (5, 8), (3, 8), (2, 5), (1, 8), (17, 8), (4, 2),
                     (20, 8), (7, 8)]:
        positions = torch.randint(0, 4 * bs - steps, (n,), generator=gen)
        used = -(-(positions.max().item() + steps) // bs)
        tables = (1 + torch.randperm(rows * width, generator=gen)[:n * used]).view(n, used).int()
        state = [torch.randint(0, cfg.vocab_size, (n,), generator=gen), positions, tables,
                 torch.randint(0, 2**40, (n,), generator=gen)]
        before = cache.k.clone(), cache.v.clone()
        out = graphed(*state, steps)
        after = cache.k.clone(), cache.v.clone()
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
        expected = eager(*state, steps)
        assert torch.equal(out, expected), (n, steps)
        # the graph wrote the same keys and values (its padding rows write block 0 only, which nobody reads), up to
        # the rounding of a matmul over the padded batch (BLAS may block 4 rows unlike 3)
        for got, want in zip(after, (cache.k, cache.v)):
            torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    assert sorted(graphed.graphs) == graphed.sizes and len(cuda_graph_standin) == len(graphed.sizes)


@torch.no_grad()
def test_graphed_generate_equals_eager_with_preemption_and_refills(tiny, cuda_graph_standin, sync_free,
                                                                  monkeypatch):
    """Whole generate() runs: more sequences than rows, rows ending early at sampled end tokens, a pool small enough
    to preempt, so rows shrink and grow across buckets: the graphed samples equal the eager ones token for token."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2045, (n,), generator=gen).tolist() for n in (5, 30, 12, 50, 3, 21, 40, 8, 17)]
    kw = dict(max_new_tokens=40, num_samples=3, temperature=1.0, seed=7, batch_size=12, block_size=16,
              cache_tokens=10 * 16, eos_token_ids=list(range(0, 2045, 40)), progress=False)
    made = []

    class Kept(ssd.GraphedDecode):  # keeps each instance, to see which buckets were captured
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)
    monkeypatch.setattr(ssd, "GraphedDecode", Kept)
    stats = {}
    graphed = ssd.generate(tiny, prompts, stats=stats, **kw)
    ssd.FAST_PATHS["cuda_graphs"] = False
    eager = ssd.generate(tiny, prompts, **kw)
    assert graphed == eager and ssd.FAST_PATHS["fused_sampler"] and ssd.FAST_PATHS["paged_attention"]
    lengths = {len(c.tokens) for row in graphed for c in row}
    assert stats["preemptions"] > 0 and len(lengths) > 5 and len(made) == 1
    assert len(made[0].graphs) >= 4, sorted(made[0].graphs)  # several buckets captured, each replayed


def test_self_test_of_cuda_graphs_catches_a_replay_that_runs_nothing(cuda_graph_standin, sync_free, monkeypatch):
    """The startup check of cuda_graphs (fast_paths.check_graphs, with ssd's model and generate) under the stand-in:
    the graphed decode passes against eager; a replay that reruns nothing (each step repeats the captured tokens)
    fails it."""
    check = functools.partial(fast_paths.check_graphs, "cpu", ssd.Transformer, ssd.model_config_from_hf, ssd.generate)
    check()
    assert len(cuda_graph_standin) > 1 and ssd.FAST_PATHS["cuda_graphs"]  # it captured graphs of several sizes
    monkeypatch.setattr(RecordedGraph, "replay", lambda self: None)
    with pytest.raises(AssertionError):  # assert_close: the completions' lengths or tokens differ
        check()


@torch.no_grad()
def test_graph_capture_error_falls_back_to_eager(tiny, cuda_graph_standin, monkeypatch, capsys):
    """The reference paged attention syncs with the host, which a capture refuses: GraphedDecode warns once, turns
    cuda_graphs off and decodes eagerly, with the same samples as an eager run."""
    monkeypatch.setattr(ssd, "sample_next_token", sync_free_sampler)
    monkeypatch.setitem(ssd.FAST_PATH_STATUS, "cuda_graphs", "ok")
    prompts = [[5, 6, 7], list(range(100, 130)), [9] * 11]
    kw = dict(max_new_tokens=20, num_samples=2, temperature=1.0, seed=2, batch_size=4, block_size=16,
              progress=False)
    graphed = ssd.generate(tiny, prompts, **kw)
    err = capsys.readouterr().err
    assert err.count("warning: fast path cuda_graphs failed to capture a decode graph") == 1, err
    assert "not permitted when stream is capturing" in err and not ssd.FAST_PATHS["cuda_graphs"]
    assert ssd.FAST_PATH_STATUS["cuda_graphs"].startswith("fell back (RuntimeError")
    assert graphed == ssd.generate(tiny, prompts, **kw)


def test_default_cache_tokens_on_cuda_fills_80_percent_of_free_memory(tiny, monkeypatch):
    """The CUDA branch's arithmetic, with torch.cuda.mem_get_info and the weight's device stood in: the pool of that
    many tokens (k and v, every layer, in the weights' dtype) takes at most 80% of the free memory, one token more
    would not fit."""
    cfg, free = tiny.config, 37 * 2**30 + 12345

    class Weight:
        device, dtype = torch.device("cuda", 0), torch.bfloat16

        def element_size(self):
            return 2
    monkeypatch.setattr(tiny, "head_weight", lambda: Weight())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2**30))
    tokens = ssd.default_cache_tokens(tiny, 64, 4096)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    assert tokens * per_token <= 0.8 * free < (tokens + 1) * per_token
    monkeypatch.undo()
    assert ssd.default_cache_tokens(tiny, 64, 4096) == 64 * 4096  # CPU: every row at full length


def test_fsdp_bf16_compute_keeps_fp32_master_weights(tiny_model_dir):
    """shard_model's CUDA branch (its device is used for that choice only, so a stand-in with type "cuda" takes it
    on CPU): FSDP2 computes in bf16 from fp32 master weights and hands back fp32 gradients, close to fp32 training's
    (one CPU rank: the plain model, which FSDP does not wrap)."""
    from types import SimpleNamespace

    from test_train import tiny_seqs
    rank, world, device = ssd.init_distributed()
    try:
        inputs, positions, targets, docs = ssd.pack(tiny_seqs(n=3), "cpu")
        results = []
        for standin in (SimpleNamespace(type="cuda"), torch.device("cpu")):
            model, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32,
                                      shard=lambda m, d=standin: ssd.shard_model(m, ssd.Config(), d))
            seen = []
            model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o, s=seen: s.append(i[0].dtype))
            loss = model(inputs, positions, docs, targets=targets)
            loss.backward()
            params = list(model.parameters())
            local = [(ssd.local_shard(p)[0], ssd.local_shard(p.grad)[0]) for p in params]  # one rank: whole
            assert all(w.dtype == torch.float32 and g.dtype == torch.float32 for w, g in local)
            results.append((seen[0], loss.item(), [g for _, g in local]))
        (bf16_dtype, bf16_loss, bf16_grads), (fp32_dtype, fp32_loss, fp32_grads) = results
        assert (bf16_dtype, fp32_dtype) == (torch.bfloat16, torch.float32)
        assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2) and bf16_loss != fp32_loss
        for g, ref in zip(bf16_grads, fp32_grads):  # bf16's 8-bit mantissa, through 2 layers of 6x-gain weights
            assert (g - ref).norm() <= 0.1 * ref.norm() + 1e-6
    finally:
        ssd.dist.destroy_process_group()
