"""Paged decode attention: one new query token per row against that row's keys and values in a shared block pool.

Layout (one layer's pool): k_cache, v_cache are (num_blocks, KV, block_size, D), so each (block, kv head) is one
contiguous (block_size, D) tile. Row b's token t lives at block block_tables[b, t // block_size], offset
t % block_size; the row attends to its tokens 0 .. seq_lens[b] - 1 (the current token is already written). Table
entries past a row's used blocks, and pool slots no row uses, may hold anything valid / finite: both are masked by
position, never by value. Blocks may be shared between rows and appear in any order. A row with seq_lens[b] == 0 is
idle and gets zeros. GQA: query head h reads kv head h // (H // KV). Softmax in fp32, output in q.dtype.

  paged_decode_attention_reference: defines the semantics (one gather of the used table columns, one batched fp32
    attention); ssd.py's CPU decode instead copies the rows once per window of steps and attends over that copy.
  paged_decode_attention_triton: flash-decoding for CUDA. Grid (B, KV, splits): a program takes one kv head with all
    G = H / KV query heads as the M side of tl.dot (padded to 16), walks its contiguous range of the row's blocks
    with an online softmax, and writes a partial (acc, max, sum); a merge kernel combines the splits by log-sum-exp.
    The launch depends on shapes only (no host sync), so it can be captured in a CUDA graph.
  paged_decode_attention: Triton on CUDA, the reference elsewhere.
"""

import functools
import math

import torch

MAX_SPLITS = 64  # more splits than this buys nothing at decode sizes and makes the merge wider


def _check(q, k_cache, v_cache, block_tables, seq_lens):
    """Shape checks shared by both paths (shapes only: nothing here reads device memory)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q (B, H, D) and caches (num_blocks, KV, block_size, D), got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    (batch, heads, dim), (_, kv_heads, _, cache_dim) = q.shape, k_cache.shape
    if cache_dim != dim or heads % kv_heads:
        raise ValueError(f"head_dim {dim} vs cache {cache_dim}, or {heads} query heads not a multiple of {kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"block_tables must be (B, W) and seq_lens (B,) with B = {batch}, got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if block_tables.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_tables and seq_lens must be int32 or int64")


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """q (B, H, D); caches (num_blocks, KV, block_size, D); block_tables (B, W); seq_lens (B,). Returns (B, H, D)."""
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    (batch, heads, dim), (_, kv_heads, block_size, _) = q.shape, k_cache.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    # The only host sync: how many table columns any row uses.
    width = min(-(-int(seq_lens.max()) // block_size), block_tables.shape[1]) if batch else 0
    if width == 0:
        return q.new_zeros(q.shape)
    # One gather straight into (B, KV, width, block_size, D): index the pool by (block, kv head) pairs, so each kv
    # head's tokens come out contiguous and no per-query-head copy of the cache is ever made.
    blocks = block_tables[:, None, :width].long()
    kv = torch.arange(kv_heads, device=q.device)[None, :, None]
    length = width * block_size
    k = k_cache[blocks, kv].reshape(batch, kv_heads, length, dim).float()
    v = v_cache[blocks, kv].reshape(batch, kv_heads, length, dim).float()
    # GQA by folding each kv head's group of query heads into the query axis: (B, KV, G, D) @ (B, KV, D, L).
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).float() * scale
    scores = qg @ k.transpose(-1, -2)
    lens = seq_lens.to(q.device).long()
    inside = torch.arange(length, device=q.device)[None, :] < lens[:, None]  # masked by position: garbage is ignored
    scores = scores.masked_fill(~inside[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # finite garbage times an exact 0 weight is 0
    out = torch.where((lens > 0)[:, None, None, None], out, 0.0)  # an idle row's softmax is all NaN
    return out.reshape(batch, heads, dim).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Triton. The kernels are defined inside functions so that importing ssd_kernels never imports triton (CPU use needs
# none), and so that TRITON_INTERPRET is read at first use rather than at import.


@functools.cache
def _kernels():
    """(split_kernel, merge_kernel), built once."""
    return _split_kernel(), _merge_kernel()


def _split_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, acc_ptr, m_ptr, l_ptr,
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                     stride_tb, stride_ob, stride_oh, width, blocks_per_split, qk_scale,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                     DOT_FP32: tl.constexpr):
        """One (row, kv head, split): the G query heads of this kv head over the split's blocks of the row."""
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GP)
        heads = kvh * G + g
        d = tl.arange(0, BLOCK_D)
        q_mask = (g < G)[:, None] & (d < D)[None, :]
        q = tl.load(q_ptr + row.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask,
                    other=0.0)  # padded head rows are zeros: finite scores, never stored
        if DOT_FP32:  # Triton 3.9's interpreter multiplies bf16 dot operands as raw bits; fp32 holds them exactly
            q = q.to(tl.float32)
        # Token range: this split's blocks, cut at the row's length. Empty (no iteration) when the split lies past
        # seq_len, leaving max -inf and sum 0, which contribute nothing to the merge.
        lo = split * blocks_per_split * BLOCK_SIZE
        hi = tl.minimum(split * blocks_per_split + blocks_per_split, width) * BLOCK_SIZE
        end = tl.minimum(hi, tl.load(lens_ptr + row).to(tl.int32))
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BLOCK_D], tl.float32)
        n = tl.arange(0, BLOCK_N)
        table_row = table_ptr + row.to(tl.int64) * stride_tb
        k_head = k_ptr + kvh.to(tl.int64) * stride_kh
        v_head = v_ptr + kvh.to(tl.int64) * stride_vh
        for start in range(lo, end, BLOCK_N):  # BLOCK_N divides BLOCK_SIZE: a chunk never straddles two blocks
            block = tl.load(table_row + start // BLOCK_SIZE).to(tl.int64)
            tok = start % BLOCK_SIZE + n
            valid = start + n < end  # every chunk has >= 1 valid token, so the running max stays finite
            kv_mask = valid[:, None] & (d < D)[None, :]
            k = tl.load(k_head + block * stride_kb + tok[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units: exp2 below
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser sums the fp32 probabilities
            v = tl.load(v_head + block * stride_vb + tok[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
            p = p.to(v.dtype)  # the probabilities enter the tensor-core dot in the cache dtype, as in flash attention
            if DOT_FP32:
                p, v = p.to(tl.float32), v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        if DIRECT:  # a single split: normalise here and skip the merge (an idle row has l = 0 and acc = 0)
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + row.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=q_mask)
        else:  # scratch (B, H, S[, D]) in fp32
            part = (row.to(tl.int64) * tl.num_programs(1) * G + heads) * tl.num_programs(2) + split
            tl.store(m_ptr + part, m_i, mask=g < G)
            tl.store(l_ptr + part, l_i, mask=g < G)
            tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=q_mask)
    return split_kernel


def _merge_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, stride_ob, stride_oh, H, S,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, SP: tl.constexpr):
        """One (row, query head): log-sum-exp merge of the split partials; all splits empty gives zeros."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, BLOCK_D)
        part = (row.to(tl.int64) * H + head) * S + s
        m_s = tl.load(m_ptr + part, mask=s < S, other=float("-inf"))
        l_s = tl.load(l_ptr + part, mask=s < S, other=0.0)
        m = tl.max(m_s, 0)
        m = tl.where(m > float("-inf"), m, 0.0)  # idle row: exp2(-inf - 0) = 0 weights, no -inf - -inf
        w = tl.exp2(m_s - m)
        total = tl.sum(w * l_s, 0)
        acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=(s < S)[:, None] & (d < D)[None, :], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row.to(tl.int64) * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
                 mask=d < D)
    return merge_kernel


@functools.cache
def _num_sms(device):  # on CPU (interpreter runs) a small number, so that small test shapes get several splits
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def choose_splits(batch, kv_heads, width, num_sms, num_splits=None):
    """(splits, blocks per split) from shapes only, never from seq_lens: the same grid for the same shapes keeps the
    launch sync-free and CUDA-graph capturable. Aim for >= 2 programs per SM: a batch that already gives B * KV that
    many keeps one split per row (no merge); a small batch with long tables splits each row's table into contiguous
    ranges of whole blocks. Splits past a row's actual length exit at once, so a table wider than the rows costs
    little. Trailing empty splits are dropped by rounding the count to whole ranges."""
    if num_splits is None:
        num_splits = -(-2 * num_sms // max(1, batch * kv_heads))
    num_splits = max(1, min(num_splits, width, MAX_SPLITS))
    per_split = -(-width // num_splits)
    return -(-width // per_split), per_split


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale=None, *, num_splits=None,
                                  block_n=None, num_warps=4):
    """Triton version of paged_decode_attention_reference (same arguments). num_splits / block_n override the launch
    shape (tests use them to exercise several splits and several chunks per block under the interpreter)."""
    import triton

    _check(q, k_cache, v_cache, block_tables, seq_lens)
    (batch, heads, dim), (_, kv_heads, block_size, _) = q.shape, k_cache.shape
    width = block_tables.shape[1]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and caches must share a dtype (tl.dot), got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:  # never copy the pool: it is most of the GPU's memory
        raise ValueError("k_cache and v_cache must be contiguous along head_dim")
    # Tokens per step: the (block_n, D) K and V tiles live in registers. ptxas for sm_90 at 4 warps: bf16 D 128 takes
    # 227 registers at 64 and spills at 128; fp32 D 128 spills at 64, not at 32.
    block_n = block_n or min(block_size, 64 if dim * q.element_size() <= 256 else 32)
    if block_n < 16 or block_n & (block_n - 1) or block_size % block_n:
        raise ValueError(f"block_n must be a power of two in [16, block_size], got {block_n}")
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    if batch == 0 or width == 0:  # no table columns: every row must be idle
        return out.zero_()
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    group = heads // kv_heads
    splits, per_split = choose_splits(batch, kv_heads, width, _num_sms(q.device), num_splits)
    scratch = dict(acc=out, m=out, l=out)  # unused placeholders when one split writes the output itself
    if splits > 1:
        scratch = dict(acc=torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device),
                       m=torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device),
                       l=torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device))
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    split_kernel, merge_kernel = _kernels()
    launch = dict(num_warps=num_warps, enable_fp_fusion=True)  # FMA on, explicitly: Triton 3.10 makes off the default
    block_d = max(16, triton.next_power_of_2(dim))
    split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, scratch["acc"], scratch["m"], scratch["l"],
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), width, per_split, scale * math.log2(math.e),
        G=group, GP=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, DIRECT=splits == 1, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_FP32=not q.is_cuda, **launch)
    if splits > 1:
        merge_kernel[(batch, heads)](scratch["acc"], scratch["m"], scratch["l"], out, out.stride(0), out.stride(1),
                                     heads, splits, D=dim, BLOCK_D=block_d, SP=max(2, triton.next_power_of_2(splits)),
                                     **(launch | dict(num_warps=1)))
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Decode attention over a paged KV cache (see the module docstring for the layout). Returns (B, H, D) in q.dtype.
    CUDA: the Triton flash-decoding kernel, no host sync. Other devices: the torch reference."""
    if q.is_cuda:
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)


def check_paged_attention(attend, device, heads=32, kv_heads=8, dim=128, block_size=256, dtype=torch.bfloat16):
    """Raise AssertionError unless attend(q, k_cache, v_cache, tables, lens) matches the reference within bf16
    tolerance: rows idle, of one token, of exactly one block and longer; shuffled tables with a shared block;
    1e30 wherever no row attends. A few rows (split across the table, merged) and many (one split, no merge)."""
    gen = torch.Generator().manual_seed(0)
    for lens in ([0, 1, block_size, 3 * block_size + 5, 2 * block_size - 1, 17], [1 + i % 40 for i in range(40)]):
        batch, width = len(lens), -(-max(lens) // block_size)
        num_blocks = batch * width + 3
        tables = torch.randperm(num_blocks, generator=gen)[:batch * width].view(batch, width)
        tables[1::2, 0] = tables[0::2, 0]  # odd rows share their neighbour's first block (as a prompt's samples do)
        k, v = (torch.full((num_blocks, kv_heads, block_size, dim), 1e30) for _ in "kv")
        for b, n in enumerate(lens):
            t = torch.arange(n)
            for cache in (k, v):
                cache[tables[b, t // block_size], :, t % block_size] = torch.randn(n, kv_heads, dim, generator=gen)
        q = torch.randn(batch, heads, dim, generator=gen)
        args = [x.to(device, dtype) for x in (q, k, v)] + [tables.int().to(device), torch.tensor(lens).int().to(device)]
        got, want = attend(*args), paged_decode_attention_reference(*args)
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2):
            err = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else got.shape
            raise AssertionError(f"paged attention differs from the reference by {err} (H {heads}, KV {kv_heads}, "
                                 f"D {dim}, block {block_size}, lens {lens})")
