"""Fused Triton sampling: scale, top-k, top-p, min-p and the Gumbel-max draw, without sorting and without a host sync.

Semantics are those of ssd_kernels/sampling.py (the reference); under TRITON_INTERPRET=1 this returns exactly its
tokens.
Every filter keeps an upper set {x >= tau} of the scaled logits x, so only thresholds are needed:
  _scan_kernel (grid B x S; S vocab splits per row fill the GPU at small batch):
    pass a (HBM): split max m_s and, for top-k, the k-th largest BLOCK maximum: a lower bound on the k-th largest
      value (k distinct elements reach it).
    pass b (mostly L2): Z_s = sum exp(x - m_s) if top-p needs the full normaliser, and compaction of the candidates
      x >= thr_s into this split's segment of a scratch buffer. thr_s is the top-k bound, or m_s - depth with depth
      chosen on the host so that provably no token below it survives top-p / min-p.
  _threshold_kernel (grid B; touches only candidates, for top-k usually under a hundred): every value >= floor =
    max_s thr_s is a candidate. The top-k threshold (exact k-th largest) and the top-p threshold (smallest t with
    mass(x > t) < p * Z) come from bisection on the ordered-integer image of fp32, so they are exact element values
    and ties behave as in the reference; each step partitions the working set into a ping-pong buffer, so later
    steps only read what is still inside the interval, and it stops once one distinct value is left.
  _race_kernel (grid B x S): argmax of x - log(-log(u)) over this split's kept candidates (x >= tau, and
    exp(x - m) >= min_p); the host-side argmax over splits keeps the lowest token id on ties.
  With no filter, _race_all_kernel races over the whole row in one pass instead.
Full-vocabulary passes per row: 2 (one from HBM) with filters, 1 without. Not yet timed on a GPU (see
bench/bench_kernel.py). Slow but exact paths: top_k > 1024 or fewer than k blocks per split (every finite logit is
a candidate), and top-p without top-k on a flat distribution (tens of thousands of candidates for one program).
Scratch memory: about 16 bytes x batch x vocab.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import sampling as ref

_GOLDEN, _MUL1, _MUL2 = (tl.constexpr(c) for c in (ref.GOLDEN, ref.MIX_MUL1, ref.MIX_MUL2))
_LN2, _SQRT2 = tl.constexpr(ref.LN2), tl.constexpr(ref.SQRT2)
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7 = (tl.constexpr(c) for c in ref.LOG_COEFFS)
_INT_MAX = tl.constexpr(2**31 - 1)
_VALUE_STEPS = tl.constexpr(8)  # bisection steps that split the interval by value before switching to bits
MAX_TOPK_BOUND = 1024  # largest k for which kernel 1 keeps the block-maxima bound (a KMAX-wide register list)


# ---------------------------------------------------------------------------------------------------------------------
# Device helpers. Integer hashing in uint32 (wraps like the reference's masked int64), floats in fp32.


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * _MUL1
    h = h ^ (h >> 15)
    h = h * _MUL2
    return h ^ (h >> 16)


@triton.jit
def _row_key(seq_ptr, pos_ptr, row, seed):
    """uint32 key of (seed, sequence id, position): mirrors sampling.row_keys."""
    k = seed.to(tl.uint32)
    seq = tl.load(seq_ptr + row)
    pos = tl.load(pos_ptr + row)
    k = _mix32(k ^ (seq & 0xFFFFFFFF).to(tl.uint32))
    k = _mix32(k ^ ((seq >> 32) & 0xFFFFFFFF).to(tl.uint32))
    k = _mix32(k ^ (pos & 0xFFFFFFFF).to(tl.uint32))
    return _mix32(k ^ ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32))


@triton.jit
def _log(v):
    """Portable natural log of positive normal fp32 values: mirrors sampling.portable_log op for op."""
    bits = v.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    f = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = f > _SQRT2
    f = tl.where(big, f * 0.5, f)
    e = tl.where(big, e + 1, e)
    t = f - 1.0
    q = ((((((t * _C0 + _C1) * t + _C2) * t + _C3) * t + _C4) * t + _C5) * t + _C6) * t + _C7  # Horner
    return e.to(tl.float32) * _LN2 + (t + t * (t * q))


@triton.jit
def _race_key(x, idx, key):
    """x - log(-log(u)) with u the hash uniform of (row key, token id): mirrors sampling.race_keys."""
    h = _mix32(key ^ (idx.to(tl.uint32) * _GOLDEN))
    u = (((h >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08  # odd multiple of 2^-24, in (0, 1)
    return x - _log(-_log(u))


@triton.jit
def _to_key(x):
    """Monotone map fp32 -> int64 (ordered-integer image of the float bits)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)


@triton.jit
def _from_key(k):
    b = k.to(tl.int32)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)


@triton.jit
def _load_scaled(row_ptr, offs, end, inv_t):
    """Scaled fp32 logits, -inf past the end; -0.0 becomes +0.0 so equal values have equal integer keys."""
    x = tl.load(row_ptr + offs, mask=offs < end, other=float("-inf")).to(tl.float32) * inv_t
    return tl.where(x == 0.0, 0.0, x)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel 1: per (row, split) statistics and candidate compaction, or the full race when nothing is filtered.


@triton.jit(do_not_specialize=["k"])
def _scan_kernel(logits_ptr, stride_row, V, inv_t, depth, k, chunk, seg_val_ptr, seg_idx_ptr, seg_w,
                 stat_ptr, cnt_ptr, S, KTH_BOUND: tl.constexpr, NEED_Z: tl.constexpr, KMAX: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * chunk
    end = tl.minimum(lo + chunk, V)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK)
    # pass a: split max; for top-k the KMAX-wide list of the k largest block maxima (inactive slots hold +inf)
    m = float("-inf")
    slots = tl.arange(0, KMAX)
    top_maxima = tl.where(slots < k, float("-inf"), float("inf"))
    for start in range(lo, end, BLOCK):
        x = _load_scaled(row_ptr, start + lanes, end, inv_t)
        block_max = tl.max(x, 0)
        m = tl.maximum(m, block_max)
        if KTH_BOUND:
            at = tl.argmin(top_maxima, 0)  # replace the smallest kept maximum if this block beats it
            top_maxima = tl.where(slots == at, tl.maximum(top_maxima, block_max), top_maxima)
    if KTH_BOUND:
        thr = tl.min(top_maxima, 0)  # k-th largest block maximum, -inf if fewer than k blocks
    else:
        thr = m - depth

    # pass b: normaliser and compaction of x >= thr (finite only) into this split's segment, in token order
    n = 0
    z = 0.0
    seg = row.to(tl.int64) * seg_w + lo
    for start in range(lo, end, BLOCK):
        offs = start + lanes
        x = _load_scaled(row_ptr, offs, end, inv_t)
        finite = x > float("-inf")
        if NEED_Z:
            z += tl.sum(tl.where(finite, tl.exp(x - m), 0.0), 0)
        keep = finite & (x >= thr)
        kept = tl.sum(keep.to(tl.int32), 0)
        if kept > 0:
            pos = seg + n + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(seg_val_ptr + pos, x, mask=keep)
            tl.store(seg_idx_ptr + pos, offs, mask=keep)
            n += kept
    stat = stat_ptr + (row * S + split) * 3
    tl.store(stat, m)
    tl.store(stat + 1, z)
    tl.store(stat + 2, thr)
    tl.store(cnt_ptr + row * S + split, n)


@triton.jit(do_not_specialize=["seed"])
def _race_all_kernel(logits_ptr, stride_row, V, inv_t, chunk, seq_ptr, pos_ptr, seed, key_ptr, idx_ptr, S,
                     BLOCK: tl.constexpr):
    """No filter: the race over every finite logit of the split; kernel output is the split's winner."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * chunk
    end = tl.minimum(lo + chunk, V)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    rkey = _row_key(seq_ptr, pos_ptr, row, seed)
    best_key = float("-inf")
    best_idx = lo
    for start in range(lo, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _load_scaled(row_ptr, offs, end, inv_t)
        key = tl.where(x > float("-inf"), _race_key(x, offs, rkey), float("-inf"))
        block_key = tl.max(key, 0)
        block_idx = tl.min(tl.where(key == block_key, offs, _INT_MAX), 0)
        better = block_key > best_key  # blocks come in token order, so an equal key keeps the lower id
        best_key = tl.where(better, block_key, best_key)
        best_idx = tl.where(better, block_idx, best_idx)
    tl.store(key_ptr + row * S + split, best_key)
    tl.store(idx_ptr + row * S + split, best_idx)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels 2 and 3: exact thresholds on the candidates, then the race over them.


@triton.jit
def _gather(seg_val, cnt_row, S, chunk, floor, m, work, BLOCK: tl.constexpr):
    """Copy the candidates >= floor into work[0:n]; returns n, their min and their mass sum(exp(x - m))."""
    n = 0
    vmin = float("inf")
    mass = 0.0
    for s in range(0, S):
        count = tl.load(cnt_row + s)
        for j in range(0, count, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            v = tl.load(seg_val + s * chunk + offs, mask=offs < count, other=float("-inf"))
            keep = (offs < count) & (v >= floor)
            tl.store(work + n + tl.cumsum(keep.to(tl.int32), 0) - 1, v, mask=keep)
            n += tl.sum(keep.to(tl.int32), 0)
            vmin = tl.minimum(vmin, tl.min(tl.where(keep, v, float("inf")), 0))
            mass += tl.sum(tl.where(keep, tl.exp(v - m), 0.0), 0)
    tl.debug_barrier()  # the work buffer is read back by other threads
    return n, vmin, mass


@triton.jit
def _bisect(work, V, n, lo, hi, target, m, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """Largest integer key t in [lo, hi) with A(t) >= target, where A(t) = number (WEIGHTED: mass exp(x - m)) of
    working values x >= float(t). Needs A(lo) >= target; hi counts as failing. The working set, every value in
    [float(lo), float(hi)), starts as work[0:n] (half 0 of the ping-pong buffer work[2, V]); each step partitions it
    at the midpoint, keeps the side holding the answer and folds the part above the interval into `above`."""
    src = 0
    start = 0
    above = 0.0
    step = 0
    while hi - lo > 1:
        mid = _to_key(0.5 * _from_key(lo) + 0.5 * _from_key(hi))  # split by value first: drops more values
        use_value = (mid > lo) & (mid < hi) & (step < _VALUE_STEPS)
        mid = tl.where(use_value, mid, lo + (hi - lo) // 2)
        t = _from_key(mid)
        src_ptr = work + src * V + start
        dst_ptr = work + (1 - src) * V
        upper_sum = 0.0
        n_low = 0
        n_up = 0
        w_min = float("inf")
        w_max = float("-inf")
        for j in range(0, n, BLOCK):
            lanes = tl.arange(0, BLOCK)
            valid = j + lanes < n
            v = tl.load(src_ptr + j + lanes, mask=valid, other=float("-inf"))
            up = valid & (v >= t)
            low = valid & (v < t)
            if WEIGHTED:
                upper_sum += tl.sum(tl.where(up, tl.exp(v - m), 0.0), 0)
            else:
                upper_sum += tl.sum(up.to(tl.float32), 0)
            low_rank = tl.cumsum(low.to(tl.int32), 0)
            tl.store(dst_ptr + n_low + low_rank - 1, v, mask=low)  # lower part grows from the front
            tl.store(dst_ptr + V - 1 - (n_up + lanes - low_rank), v, mask=up)  # upper part from the back
            n_low += tl.sum(low.to(tl.int32), 0)
            n_up += tl.sum(up.to(tl.int32), 0)
            w_min = tl.minimum(w_min, tl.min(tl.where(valid, v, float("inf")), 0))
            w_max = tl.maximum(w_max, tl.max(v, 0))
        tl.debug_barrier()
        src = 1 - src
        if n == 0:  # A is constant on [lo, hi): every key there is an answer
            lo = hi - 1
        elif w_min == w_max:  # one distinct value v: A(t) = above for t > v, and A(v) >= target
            lo = tl.where(above >= target, hi - 1, _to_key(w_min))
            hi = lo + 1
        elif above + upper_sum >= target:  # answer >= mid: keep the upper part
            lo = mid
            start = V - n_up
            n = n_up
        else:  # answer < mid: fold the upper part into `above`, keep the lower part
            hi = mid
            above += upper_sum
            start = 0
            n = n_low
        step += 1
    return lo


@triton.jit(do_not_specialize=["k"])
def _threshold_kernel(seg_val_ptr, seg_w, chunk, stat_ptr, cnt_ptr, S, work_ptr, V, k, p, tau_ptr,
                      HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: merge the split statistics, find the exact top-k and top-p thresholds, store (tau, row max)."""
    row = tl.program_id(0)
    splits = tl.arange(0, SP)
    stat = stat_ptr + (row * S + splits) * 3
    m_s = tl.load(stat, mask=splits < S, other=float("-inf"))
    z_s = tl.load(stat + 1, mask=splits < S, other=0.0)
    thr_s = tl.load(stat + 2, mask=splits < S, other=float("-inf"))
    m = tl.max(m_s, 0)
    z = tl.sum(tl.where(m_s > float("-inf"), z_s * tl.exp(m_s - m), 0.0), 0)
    tau = tl.max(thr_s, 0)  # every value >= tau is a candidate, and no kept token is below it
    seg_val = seg_val_ptr + row.to(tl.int64) * seg_w
    cnt_row = cnt_ptr + row * S
    work = work_ptr + row.to(tl.int64) * 2 * V
    if HAS_TOPK:
        n, vmin, _ = _gather(seg_val, cnt_row, S, chunk, tau, m, work, BLOCK)
        kth = float("-inf")  # fewer than k finite logits: top-k keeps them all
        if n >= k:
            kth = _from_key(_bisect(work, V, n, _to_key(vmin), _to_key(m) + 1, k.to(tl.float32), m, False, BLOCK))
        tau = tl.maximum(tau, kth)
    if HAS_TOPP:
        n, vmin, mass = _gather(seg_val, cnt_row, S, chunk, tau, m, work, BLOCK)
        if HAS_TOPK:
            z = mass  # top-p renormalises over the top-k survivors, which are exactly the gathered values
        top_p = _from_key(_bisect(work, V, n, _to_key(vmin), _to_key(m) + 1, p * z, m, True, BLOCK))
        tau = tl.maximum(tau, top_p)
    tl.store(tau_ptr + row * 2, tau)
    tl.store(tau_ptr + row * 2 + 1, m)


@triton.jit(do_not_specialize=["seed"])
def _race_kernel(seg_val_ptr, seg_idx_ptr, seg_w, chunk, cnt_ptr, S, tau_ptr, min_p, seq_ptr, pos_ptr, seed,
                 key_ptr, idx_ptr, HAS_MINP: tl.constexpr, BLOCK: tl.constexpr):
    """Per (row, split): the race over this split's candidates x >= tau (and exp(x - m) >= min_p)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    tau = tl.load(tau_ptr + row * 2)
    m = tl.load(tau_ptr + row * 2 + 1)
    seg = row.to(tl.int64) * seg_w + split * chunk
    count = tl.load(cnt_ptr + row * S + split)
    rkey = _row_key(seq_ptr, pos_ptr, row, seed)
    best_key = float("-inf")
    best_idx = 0
    for j in range(0, count, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        v = tl.load(seg_val_ptr + seg + offs, mask=offs < count, other=float("-inf"))
        kept = (offs < count) & (v >= tau)
        if HAS_MINP:
            kept = kept & (tl.exp(v - m) >= min_p)
        if tl.sum(kept.to(tl.int32), 0) > 0:  # with top-k most blocks of a wide candidate set hold no kept token
            idx = tl.load(seg_idx_ptr + seg + offs, mask=offs < count, other=0)
            key = tl.where(kept, _race_key(v, idx, rkey), float("-inf"))
            block_key = tl.max(key, 0)
            block_idx = tl.min(tl.where(kept & (key == block_key), idx, _INT_MAX), 0)
            better = block_key > best_key  # candidates are in token order: an equal key keeps the lower id
            best_key = tl.where(better, block_key, best_key)
            best_idx = tl.where(better, block_idx, best_idx)
    tl.store(key_ptr + row * S + split, best_key)
    tl.store(idx_ptr + row * S + split, best_idx)


# ---------------------------------------------------------------------------------------------------------------------
# Host side: pick the specialisation and launch; only Python scalars are inspected (no host sync).


def _depth(vocab, top_p, min_p, has_topp, has_minp):
    """Distance below the row max below which top-p / min-p keep nothing (inf if neither applies). top-p: below m - D
    lies mass <= V e^-D against >= 1 above, so D = log V + log(p / (1 - p)) + 1 leaves mass > p * Z above m - D."""
    top_p_depth = math.log(vocab) + math.log(top_p) - math.log1p(-top_p) + 1.0 if 0 < top_p < 1 else 1.0
    min_p_depth = -math.log(min_p) + 0.01 if has_minp else math.inf  # exp(x - m) >= min_p => x >= m + log(min_p)
    return min(top_p_depth if has_topp else math.inf, min_p_depth)


@functools.cache
def _num_sms(device):  # on CPU (interpreter runs) any small number exercises the multi-split path
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def sample_next_token_triton(logits, *, temperature, top_k=0, top_p=1.0, min_p=0.0, seed, seq_ids, positions,
                             block=None, splits=None):
    """Triton version of sampling.sample_next_token (same arguments); `block` and `splits` override the launch
    shape (tests use small blocks so the multi-block paths run under TRITON_INTERPRET=1 on CPU tensors)."""
    ref.check_sampling_args(temperature, top_k, top_p, min_p)
    top_k = int(top_k)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    (batch, vocab), dev = logits.shape, logits.device
    seq_ids, positions = (ids.to(device=dev, dtype=torch.int64).contiguous() for ids in (seq_ids, positions))
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    block = block or 1024
    small_block = min(block, 256)  # kernels 2 and 3 when the top-k bound leaves few candidates: cheaper reductions
    has_topk, has_topp, has_minp = 0 < top_k < vocab, top_p < 1.0, min_p > 0.0
    kth_bound = has_topk and top_k <= MAX_TOPK_BOUND
    cap = max(1, triton.cdiv(vocab, block) // (2 * top_k)) if kth_bound else vocab  # bound wants 2k blocks/split
    splits = splits or max(1, min(triton.cdiv(2 * _num_sms(dev), batch), cap))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block) * block
    splits = triton.cdiv(vocab, chunk)
    inv_t = ref.inverse_temperature(temperature)
    skey = ref.seed_key(seed)
    launch = dict(num_warps=4, enable_fp_fusion=False)  # no FMA contraction: bit-exact race keys
    keys = torch.empty(batch, splits, dtype=torch.float32, device=dev)
    idx = torch.empty(batch, splits, dtype=torch.int32, device=dev)
    if not (has_topk or has_topp or has_minp):
        _race_all_kernel[(batch, splits)](logits, logits.stride(0), vocab, inv_t, chunk, seq_ids, positions, skey,
                                          keys, idx, splits, BLOCK=block, **launch)
    else:
        depth = math.inf if has_topk else _depth(vocab, top_p, min_p, has_topp, has_minp)
        seg_val = torch.empty(batch, splits * chunk, dtype=torch.float32, device=dev)
        seg_idx = torch.empty(batch, splits * chunk, dtype=torch.int32, device=dev)
        stats = torch.empty(batch, splits, 3, dtype=torch.float32, device=dev)
        counts = torch.empty(batch, splits, dtype=torch.int32, device=dev)
        tau = torch.empty(batch, 2, dtype=torch.float32, device=dev)
        work = torch.empty(batch, 2, vocab, dtype=torch.float32, device=dev) if has_topk or has_topp else seg_val
        _scan_kernel[(batch, splits)](logits, logits.stride(0), vocab, inv_t, depth, top_k, chunk, seg_val, seg_idx,
                                      splits * chunk, stats, counts, splits, KTH_BOUND=kth_bound,
                                      NEED_Z=has_topp and not has_topk, BLOCK=block, **launch,
                                      KMAX=max(16, triton.next_power_of_2(top_k)) if kth_bound else 16)
        _threshold_kernel[(batch,)](seg_val, splits * chunk, chunk, stats, counts, splits, work, vocab, top_k,
                                    ref.fp32(top_p), tau, HAS_TOPK=has_topk, HAS_TOPP=has_topp,
                                    SP=triton.next_power_of_2(splits), BLOCK=small_block if kth_bound else block,
                                    **launch)
        _race_kernel[(batch, splits)](seg_val, seg_idx, splits * chunk, chunk, counts, splits, tau, ref.fp32(min_p),
                                      seq_ids, positions, skey, keys, idx, HAS_MINP=has_minp,
                                      BLOCK=small_block if kth_bound else block, **launch)
    return idx.gather(1, keys.argmax(dim=1, keepdim=True)).squeeze(1).long()  # first max: lowest split, lowest id
