"""Next-token sampling: the pure-torch reference that defines the semantics, and the public entry point.

Semantics follow Hugging Face transformers (what users treat as ground truth), in fp32:
    scale by 1/T -> top-k -> top-p (on the top-k survivors) -> min-p (on the top-p survivors) -> draw.
Every filter keeps an upper set of the scaled logits {x >= tau}, so the kept set is always "x >= some threshold".

The draw is a Gumbel-max race over the kept set: token = argmax over kept of x - log(-log(u)), where the uniform u is
a counter-based hash of (seed, sequence id, position, token id). No sort, no host sync, and a sequence's draw does
not depend on its batch slot. Ties in the race go to the lowest token id. The noise uses only +, -, *, integer and
bit operations (a portable log, below), so this reference, the Triton kernel under the interpreter and the compiled
kernel (launched without FMA contraction) compute bit-identical race keys. Tokens can still differ on CUDA in the
float-borderline cases of top-p / min-p, whose masses are summed in a different order there.

Where we deliberately differ from HF: at the top-p boundary, tokens tied in probability are kept or removed together
(rule: keep a token iff the mass of STRICTLY more likely tokens is < p). HF's sorted cumsum keeps an arbitrary subset
of such a tie group. Apart from ties, the rules agree in exact arithmetic; in fp32 they can disagree when a cumulative
mass lies within float rounding (~1e-6 relative) of p, or a probability ratio within rounding of min_p.
Temperature is applied as a multiply by fp32(1/T), which is what torch does on CUDA for `logits / T` (HF on CPU
divides; that can differ by one ulp, again only a borderline effect).
"""

import math
import numbers

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # per-token counter stride (odd, so token -> token * GOLDEN is a bijection mod 2^32)
MIX_MUL1, MIX_MUL2 = 0x7FEB352D, 0x846CA68B  # "lowbias32" integer finaliser constants (C. Wellons)
# log(1 + t) ~= t + t^2 * q(t) on t in [sqrt(1/2) - 1, sqrt(2) - 1]; q fitted in float64 (Chebyshev nodes), stored as
# fp32. Max relative error of the fp32 evaluation ~1.2e-7. Highest degree first (Horner order).
LOG_COEFFS = (0.09004202485084534, -0.14257794618606567, 0.14806459844112396, -0.16575047373771667,
              0.19973105192184448, -0.25001609325408936, 0.33333659172058105, -0.4999999403953552)
LN2 = 0.6931471824645996  # fp32(ln 2)
SQRT2 = 1.4142135381698608  # fp32(sqrt 2)


def check_sampling_args(temperature, top_k, top_p, min_p):
    """Raise ValueError on parameters HF would reject (greedy decoding is a separate path, not temperature 0)."""
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}; use greedy decoding for 0")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 disables it), got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")


def inverse_temperature(temperature):
    """fp32(1) / fp32(T) in fp32, returned as the exactly representable Python float."""
    t = torch.tensor(temperature, dtype=torch.float32)
    return (torch.ones((), dtype=torch.float32) / t).item()


def fp32(value):
    """Round a Python float to the nearest fp32 value (the kernel receives float arguments as fp32)."""
    return torch.tensor(value, dtype=torch.float32).item()


# ---------------------------------------------------------------------------------------------------------------------
# Counter-based randomness. uint32 arithmetic emulated with int64 tensors holding values in [0, 2^32).


def _mul32(a, c):
    """(a * c) mod 2^32 for int64 tensor a in [0, 2^32) and a Python constant c, without int64 overflow."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(h):
    """lowbias32 finaliser: a bijection on uint32 with good avalanche (tensor version)."""
    h = h ^ (h >> 16)
    h = _mul32(h, MIX_MUL1)
    h = h ^ (h >> 15)
    h = _mul32(h, MIX_MUL2)
    return h ^ (h >> 16)


def _mix32_int(h):
    """mix32 on a Python int."""
    h ^= h >> 16
    h = (h * MIX_MUL1) & MASK32
    h ^= h >> 15
    h = (h * MIX_MUL2) & MASK32
    return h ^ (h >> 16)


def seed_key(seed):
    """Fold a Python int seed (any size, taken mod 2^64) into a uint32 key."""
    s = seed & ((1 << 64) - 1)
    return _mix32_int(_mix32_int(GOLDEN ^ (s & MASK32)) ^ (s >> 32))


def row_keys(seed, seq_ids, positions):
    """uint32 key per row from (seed, sequence id, position), as int64 tensor; both ids are int64 (all 64 bits used)."""
    k = torch.full_like(seq_ids, seed_key(seed), dtype=torch.int64)
    for v in (seq_ids.long(), positions.long()):
        k = mix32(k ^ (v & MASK32))
        k = mix32(k ^ ((v >> 32) & MASK32))
    return k


def token_uniform(keys, token_ids):
    """Uniform in (0, 1) per (row key, token): 23 hash bits -> odd multiple of 2^-24 (exact in fp32, never 0 or 1)."""
    h = mix32(keys ^ _mul32(token_ids.long(), GOLDEN))
    return (((h >> 9) << 1) | 1).float() * 2.0**-24


def portable_log(v):
    """Natural log of positive normal fp32 values from +, *, and bit operations only, so torch, numpy (the Triton
    interpreter) and CUDA (without FMA contraction) agree bit for bit. v = 2^e * f with f in [sqrt(1/2), sqrt(2))."""
    bits = v.view(torch.int32)
    e = (bits >> 23) - 127
    f = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = f > SQRT2
    f = torch.where(big, f * 0.5, f)
    e = torch.where(big, e + 1, e)
    t = f - 1.0
    q = torch.full_like(t, LOG_COEFFS[0])
    for c in LOG_COEFFS[1:]:
        q = q * t + c
    return e.float() * LN2 + (t + t * (t * q))


def race_keys(x, keys, token_ids):
    """Gumbel-max race key x - log(-log(u)) in fp32, with the same op order as the Triton kernel."""
    u = token_uniform(keys, token_ids)
    return x - portable_log(-portable_log(u))


# ---------------------------------------------------------------------------------------------------------------------
# Reference filter and draw.


def filter_logits(logits, temperature, top_k, top_p, min_p):
    """Scaled fp32 logits [B, V] with every token outside the kept set set to -inf (the reference kept set)."""
    check_sampling_args(temperature, top_k, top_p, min_p)
    x = logits.float() * inverse_temperature(temperature)
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = torch.where(x < kth, neg_inf, x)  # ties with the k-th value are all kept
    if top_p < 1.0:
        # keep a token iff the mass of strictly more likely tokens is < p (the most likely token always survives)
        # sort the finite values only (after top-k there are few); -inf entries sort last and are dropped anyway
        width = int((x > float("-inf")).sum(-1).max()) if 0 < top_k < vocab else vocab
        vals, order = torch.topk(x, max(width, 1), dim=-1) if width < vocab else torch.sort(x, -1, descending=True)
        e = torch.exp(vals - vals[..., :1])  # unnormalised probs, -inf -> 0; the row max is vals[..., 0]
        total = e.cumsum(-1)
        before = torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], dim=-1)  # mass of earlier positions
        first_of_tie = torch.searchsorted(-vals, -vals, right=False)  # first sorted position with an equal value
        greater = before.gather(-1, first_of_tie)  # mass of strictly greater values
        keep_sorted = (greater < fp32(top_p) * total[..., -1:]) | (greater == 0)
        keep = torch.zeros_like(x, dtype=torch.bool).scatter(-1, order, keep_sorted)
        x = torch.where(keep, x, neg_inf)
    if min_p > 0.0:
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))  # prob / max prob on the survivors
        x = torch.where(e >= fp32(min_p), x, neg_inf)
    return x


def sample_next_token_reference(logits, *, temperature, top_k, top_p, min_p, seed, seq_ids, positions):
    """Reference draw: Gumbel-max race over the kept set; ties go to the lowest token id; an all -inf row gives 0."""
    x = filter_logits(logits, temperature, top_k, top_p, min_p)
    rows, cols = torch.nonzero(x > float("-inf"), as_tuple=True)
    keys = row_keys(seed, seq_ids.to(x.device), positions.to(x.device))
    race = torch.full_like(x, float("-inf"))
    race[rows, cols] = race_keys(x[rows, cols], keys[rows], cols)
    return race.argmax(dim=-1)  # first maximum = lowest token id


def sample_next_token(logits, *, temperature, top_k=0, top_p=1.0, min_p=0.0, seed, seq_ids, positions):
    """Draw one token per row of logits [B, V] (any float dtype). Returns LongTensor [B] on logits.device.
    CUDA: fused Triton kernel, no host sync. Other devices: the torch reference."""
    check_sampling_args(temperature, top_k, top_p, min_p)
    if logits.is_cuda:
        from .triton_sampling import sample_next_token_triton  # imported lazily: CPU use never needs Triton

        return sample_next_token_triton(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                        seed=seed, seq_ids=seq_ids, positions=positions)
    return sample_next_token_reference(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       seed=seed, seq_ids=seq_ids, positions=positions)


# ---------------------------------------------------------------------------------------------------------------------
# Self-test: a sampler against the reference on adversarial rows, where every filter decision is far from a float
# borderline, so that a correct kernel must draw exactly the reference's tokens.

SELF_TEST_SETTINGS = ((1.6, 20, 0.8, 0.0), (1.0, 0, 0.95, 0.0), (0.7, 0, 1.0, 0.05), (1.0, 0, 1.0, 0.0),
                      (1.1, 2000, 0.9, 0.01), (1.0, 1, 1.0, 0.0))  # (T, top-k, top-p, min-p): every kernel variant


def adversarial_logits(vocab, device, gen):
    """[10, vocab] fp32 rows: all -inf; one finite token; 50 tokens tied at the max (across the top-k boundary and
    the top-p tie rule); the whole vocabulary tied; three well-separated levels with -inf between them; the max at
    the last id; huge magnitudes; and three LM-like random rows."""
    neg = float("-inf")
    rows = torch.full((10, vocab), neg)
    rows[1, vocab // 3] = 2.0
    rows[2] = -20.0
    rows[2, torch.randperm(vocab, generator=gen)[:50]] = 5.0
    rows[3] = 0.0
    rows[4, ::7], rows[4, 3::101], rows[4, 5::1009] = 1.0, 6.0, 9.0
    rows[5] = -5.0
    rows[5, -1], rows[5, :40] = 3.0, 2.5
    rows[6] = torch.randn(vocab, generator=gen) * 3e3
    rows[7:] = torch.randn(3, vocab, generator=gen) * 2.5
    rows[7:].scatter_add_(1, torch.randint(0, vocab, (3, 40), generator=gen), torch.rand(3, 40, generator=gen) * 12)
    return rows.to(device)


def check_sampler(sample, device, vocab=151_936, extra=()):
    """Raise AssertionError unless sample(logits, ...) draws the reference's tokens, in fp32 and bf16, for every
    setting of SELF_TEST_SETTINGS and `extra`, at seq ids and positions that use all 64 bits of the hash input."""
    gen = torch.Generator().manual_seed(0)
    base = adversarial_logits(vocab, "cpu", gen)
    seq_ids = torch.tensor([0, 1, 2**40 + 3, 7, 2**33, 5, 6, 9, 2**62, 11], device=device)
    positions = torch.tensor([0, 5, 1, 2**35, 9, 4, 3, 65535, 2, 8], device=device)
    for dtype in (torch.float32, torch.bfloat16):
        logits = base.to(dtype).to(device)
        for t, k, p, min_p in SELF_TEST_SETTINGS + tuple(extra):
            kw = dict(temperature=t, top_k=k, top_p=p, min_p=min_p, seed=1234, seq_ids=seq_ids, positions=positions)
            got, want = sample(logits, **kw), sample_next_token_reference(logits, **kw)
            if got.shape != want.shape or not torch.equal(got.cpu(), want.cpu()):
                raise AssertionError(f"tokens {got.tolist()} != reference {want.tolist()} at T={t} top_k={k} "
                                     f"top_p={p} min_p={min_p}, {dtype}, vocab {vocab}")
