"""Tests for ssd_kernels/paged_attention.py: the reference against a plain per-row float64 attention, and the Triton
kernel (under the interpreter, in a subprocess) against the reference.

Every case is built adversarially: block tables are shuffled, share blocks between rows and carry random valid block
indices past each row's used blocks, and every pool slot no row reads holds large finite garbage, so any read that
is not masked by position shows up as a large error.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_kernels import paged_decode_attention, paged_decode_attention_reference

REPO = Path(__file__).resolve().parents[1]
GARBAGE = 1e30  # finite in fp32 and bf16; a single leaked score or value would swamp the output


def make_case(gen, lens, heads, kv_heads, dim, block_size, dtype=torch.float32, extra_width=2, index=torch.int32):
    """(q, k_cache, v_cache, block_tables, seq_lens) for rows of the given lengths, tables shuffled over the pool."""
    need = [-(-n // block_size) for n in lens]
    width = max(need + [1]) + extra_width
    num_blocks = sum(need) + 3  # a few blocks no row uses
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=gen)  # arbitrary valid entries past the end
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[used:used + n]
        used += n
        if b % 2 and need[b - 1] >= 2 and n >= 2:  # prefix sharing: this row reuses its neighbour's first block
            tables[b, 0] = tables[b - 1, 0]
    shape = (num_blocks, kv_heads, block_size, dim)
    k_cache = (torch.randn(shape, generator=gen) * GARBAGE).to(dtype)
    v_cache = (torch.randn(shape, generator=gen) * GARBAGE).to(dtype)
    for b, n in enumerate(lens):  # real keys and values at every (block, offset) some row attends to
        t = torch.arange(n)
        blocks, offsets = tables[b, t // block_size], t % block_size
        k_cache[blocks, :, offsets] = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        v_cache[blocks, :, offsets] = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables.to(index), torch.tensor(lens, dtype=index)


def naive_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Dense attention written out per row and per query head in float64, each token gathered from its block."""
    batch, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        t = torch.arange(n)
        blocks, offsets = block_tables[b, t // block_size].long(), t % block_size
        k = k_cache[blocks, :, offsets].double()  # (n, KV, D)
        v = v_cache[blocks, :, offsets].double()
        for h in range(heads):
            kv = h // (heads // kv_heads)
            weights = torch.softmax(k[:, kv] @ q[b, h].double() * scale, dim=0)
            out[b, h] = weights @ v[:, kv]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# (a) reference == naive


GQA = [(4, 4), (8, 4), (8, 2), (16, 2)]  # (query heads, kv heads): ratios 1, 2, 4, 8
SHAPES = [(16, 16), (64, 256), (128, 16), (16, 256)]  # (head_dim, block_size)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("dim, block_size", SHAPES)
@pytest.mark.parametrize("heads, kv_heads", GQA)
def test_reference_matches_naive_attention(heads, kv_heads, dim, block_size, dtype, tol):
    gen = torch.Generator().manual_seed(heads * 1000 + kv_heads * 100 + dim + block_size)
    bs = block_size
    lens = [0, 1, bs, 3 * bs, 2 * bs - 1, 5 * bs + 7] + ([40 * bs + 3] if bs == 16 else [])  # idle, 1, exact, many
    index = torch.int64 if dim == 64 else torch.int32
    case = make_case(gen, lens, heads, kv_heads, dim, block_size, dtype, index=index)
    out = paged_decode_attention_reference(*case)
    assert out.dtype == dtype and out.shape == case[0].shape
    expected = naive_attention(*case)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # idle row: exact zeros, no NaN
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_reference_scale_width_and_cpu_dispatch():
    """An explicit scale; a table much wider than any row (only the used columns are gathered); an all-idle batch;
    and the public entry point on CPU is the reference."""
    gen = torch.Generator().manual_seed(7)
    case = make_case(gen, [5, 33, 17], 8, 2, 32, 16, extra_width=50)
    out = paged_decode_attention_reference(*case, scale=0.3)
    torch.testing.assert_close(out.double(), naive_attention(*case, scale=0.3), atol=1e-5, rtol=1e-5)
    assert torch.equal(paged_decode_attention(*case, scale=0.3), out)
    q, k, v, tables, _ = case
    assert torch.equal(paged_decode_attention_reference(q, k, v, tables, torch.zeros(3, dtype=torch.int32)),
                       torch.zeros_like(q))


def test_reference_reads_a_layer_view_of_a_multi_layer_pool():
    """ssd.py passes cache.k[layer] of a (layers, blocks, KV, block_size, D) pool: a strided view, not a copy."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, tables, lens = make_case(gen, [20, 9], 4, 2, 16, 16)
    pool_k, pool_v = torch.stack([k * 0 + GARBAGE, k]), torch.stack([v, v * 0 - GARBAGE])
    out = paged_decode_attention_reference(q, pool_k[1], pool_v[0], tables, lens)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, tables, lens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# (b) Triton kernel under TRITON_INTERPRET=1 == reference. Run in a subprocess: the interpreter must be chosen before
# triton decorates the kernels, which another test may already have done without it.


def interpreter_checks():
    """Compare the Triton kernel with the reference over several launch shapes; returns a list of failure strings."""
    from ssd_kernels.paged_attention import choose_splits, paged_decode_attention_triton

    gen = torch.Generator().manual_seed(99)
    failures = []
    configs = [  # heads, kv_heads, dim, block_size, lens, dtype, kwargs
        (4, 4, 16, 16, [0, 1, 16, 37], torch.float32, {}),  # G = 1; B * KV fills the 4 "SMs": one split, no merge
        (8, 2, 32, 16, [5, 100, 0, 48], torch.float32, dict(num_splits=3)),  # short rows: splits past seq_len
        (8, 1, 64, 32, [64, 33, 1], torch.bfloat16, dict(num_splits=4, block_n=16)),  # 2 chunks per block, bf16
        (16, 2, 128, 16, [70, 0], torch.float32, {}),  # automatic splits on a small batch, head_dim 128
        (32, 1, 16, 16, [23, 50], torch.float32, dict(num_splits=2)),  # G = 32 > 16
        (8, 4, 48, 16, [17, 31, 2], torch.bfloat16, dict(num_splits=5)),  # head_dim not a power of two
        (4, 2, 16, 16, [0, 0], torch.float32, dict(num_splits=2)),  # every row idle, through the merge
    ]
    for i, (heads, kv_heads, dim, bs, lens, dtype, kw) in enumerate(configs):
        case = make_case(gen, lens, heads, kv_heads, dim, bs, dtype, index=torch.int64 if i % 2 else torch.int32)
        splits, _ = choose_splits(len(lens), kv_heads, case[3].shape[1], 4, kw.get("num_splits"))
        ref = paged_decode_attention_reference(*case)
        out = paged_decode_attention_triton(*case, **kw)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        if out.dtype != dtype or not torch.isfinite(out).all():
            failures.append(f"config {i}: dtype {out.dtype} or non-finite output")
        elif not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
            err = (out.float() - ref.float()).abs().max().item()
            failures.append(f"config {i} ({splits} splits): max abs error {err:.3g} > {tol}")
        if i == 0 and splits != 1 or i == 3 and splits < 2:
            failures.append(f"config {i}: expected {'one split' if i == 0 else 'several splits'}, got {splits}")
    return failures


def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_kernels_compile_for_cuda(monkeypatch):
    """The interpreter runs the kernels as Python, so it cannot catch what only the GPU compiler rejects. Triton ships
    ptxas, so the launches the wrapper really makes are compiled here for sm_90 (H100) on any machine, no GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ssd_kernels import paged_attention

    kernels, launches = paged_attention._kernels(), []

    class Recorder:  # stands in for a JITFunction: kernel[grid](*args, **meta) records instead of launching
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.fn, args, meta))

    monkeypatch.setattr(paged_attention, "_kernels", lambda: tuple(Recorder(k) for k in kernels))
    gen = torch.Generator().manual_seed(5)
    for dtype, heads, kv_heads, dim, bs, kw in [(torch.bfloat16, 32, 8, 128, 256, dict(num_splits=2)),
                                                (torch.float32, 4, 2, 16, 16, dict(num_splits=1))]:
        paged_attention.paged_decode_attention_triton(*make_case(gen, [300, 5], heads, kv_heads, dim, bs, dtype), **kw)
    assert len(launches) == 3  # split + merge, then one split that writes the output itself
    names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
    for fn, args, meta in launches:
        signature = {name: f"*{names[a.dtype]}" if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float)
                     else "i32" for name, a in zip(fn.arg_names, args)}
        options = {k: meta.pop(k) for k in ("num_warps", "enable_fp_fusion")}
        constexprs = meta | ({"DOT_FP32": False} if "DOT_FP32" in meta else {})  # the value a CUDA launch passes
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        if signature["q_ptr" if "q_ptr" in signature else "out_ptr"] == "*bf16" and "BLOCK_N" in meta:
            assert "mma" in compiled.asm["ptx"]  # bf16 scores and values go through tensor cores


def test_split_choice_depends_on_shapes_only():
    from ssd_kernels.paged_attention import choose_splits

    assert choose_splits(256, 8, 128, 132) == (1, 128)  # a full batch: one split per row, no merge kernel
    assert choose_splits(1, 8, 128, 132) == (32, 4)  # one long row: 33 splits wanted, rounded to 32 ranges of 4 blocks
    assert choose_splits(1, 8, 3, 132) == (3, 1)  # never more splits than blocks
    assert choose_splits(2, 2, 7, 4, num_splits=3) == (3, 3) and choose_splits(2, 2, 7, 4, num_splits=5) == (4, 2)


if __name__ == "__main__":  # the interpreter subprocess of test_triton_interpreter_matches_reference
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy's overflow in masked lanes
    problems = interpreter_checks()
    print("\n".join(problems) or "interpreter checks passed")
    sys.exit(1 if problems else 0)
