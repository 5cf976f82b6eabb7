"""Tests for ssd_kernels/: the reference kept set against transformers' warpers, the Triton kernel (under the
interpreter) against the reference token for token, goodness of fit of the draws, and the properties of the
counter-based hash.

Float-borderline rows (a cumulative mass within 1e-5 of top_p, or a probability ratio within 1e-5 of min_p) can
legitimately differ between implementations that sum in different orders; they are detected in float64 and skipped,
and the tests check that such rows are rare.
"""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_kernels import (
    filter_logits,
    portable_log,
    row_keys,
    sample_next_token,
    sample_next_token_reference,
    token_uniform,
)

REPO = Path(__file__).resolve().parents[1]
NEG_INF = float("-inf")


def hf_filter(logits, temperature, top_k, top_p, min_p):
    """transformers' warper pipeline in generate()'s order, min_tokens_to_keep=1 (sampling without beams)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(float(temperature))]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    x = logits.float()
    for warp in warpers:
        x = warp(None, x)
    return x


def borderline_rows(logits, temperature, top_k, top_p, min_p, eps=1e-5, ties=False):
    """Rows whose top-p or min-p decision is within float rounding of flipping (checked in float64). With ties=True
    also rows where a group of equal logits straddles the top-p boundary: there transformers keeps part of the group
    by sort order while we keep all of it (the deliberate difference, tested on designed cases)."""
    x = logits.double() / temperature
    flagged = torch.zeros(x.shape[0], dtype=torch.bool)
    if 0 < top_k < x.shape[1]:
        x = x.masked_fill(x < torch.topk(x, top_k, dim=-1).values[:, -1:], NEG_INF)
    if top_p < 1.0:
        vals, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(vals, dim=-1)  # float64; mass of strictly greater values = prefix sum at tie start
        before = probs.cumsum(-1) - probs
        greater = torch.empty_like(x).scatter(-1, order, before.gather(-1, torch.searchsorted(-vals, -vals)))
        flagged |= ((greater - top_p).abs() < eps).logical_and(greater > 0).any(-1)
        if ties:  # mass of everything else in or above the tie group
            last = torch.searchsorted(-vals, -vals, right=True) - 1
            others = torch.empty_like(x).scatter(-1, order, probs.cumsum(-1).gather(-1, last) - probs)
            kept = (greater < top_p) | (greater == 0)
            flagged |= (kept & (others >= top_p - eps) & (others > greater)).any(-1)
        x = x.masked_fill((greater >= top_p) & (greater > 0), NEG_INF)
    if min_p > 0.0:
        ratio = torch.exp(x - x.amax(-1, keepdim=True))
        flagged |= ((ratio - min_p).abs() < eps * min_p).any(-1)
    return flagged


def chi2_pvalue(observed, expected):
    """Upper tail of the chi-square statistic (df = cells - 1), via the regularised incomplete gamma function."""
    stat = ((observed - expected) ** 2 / expected).sum()
    df = observed.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()


def random_logits(gen, batch, vocab, scale):
    """Random logits with some exact ties and a few -inf entries (as masks produce)."""
    x = torch.randn(batch, vocab, generator=gen) * scale
    x[:, 1::7] = x[:, 0:1]  # ties with the first logit
    x[torch.rand(batch, vocab, generator=gen) < 0.05] = NEG_INF
    return x


# ---------------------------------------------------------------------------------------------------------------------
# (a) reference kept set == transformers


def test_reference_matches_transformers_random():
    gen = torch.Generator().manual_seed(0)
    checked = skipped = 0
    for vocab, scale in [(50, 1.0), (400, 4.0)]:
        logits = random_logits(gen, 8, vocab, scale)
        for t, k, p, mp in itertools.product([0.5, 1.6], [0, 1, 7, 40, vocab + 3],
                                             [1.0, 0.95, 0.8, 0.3, 0.0], [0.0, 0.02, 0.3]):
            ours = filter_logits(logits, t, k, p, mp)
            theirs = hf_filter(logits, t, k, p, mp)
            ok = ~borderline_rows(logits, t, k, p, mp, ties=True)
            assert torch.equal(torch.isfinite(ours[ok]), torch.isfinite(theirs[ok])), (vocab, t, k, p, mp)
            torch.testing.assert_close(ours[ok], theirs[ok], rtol=1e-6, atol=0)  # values: x / T vs x * fp32(1/T)
            checked += int(ok.sum())
            skipped += int((~ok).sum())
    assert skipped <= 0.1 * checked, (skipped, checked)


CASES = [  # logits, (T, k, p, min_p), kept ids; transformers agrees unless marked deliberate
    ([3.0, 2.0, 2.0, 2.0, 1.0, 0.0], (1.0, 2, 1.0, 0.0), [0, 1, 2, 3]),  # ties at the top-k boundary all kept
    ([1.0, NEG_INF, 0.5, NEG_INF, 0.2], (1.0, 4, 1.0, 0.0), [0, 2, 4]),  # k > number of finite logits
    ([1.0, NEG_INF, 0.5, NEG_INF, 0.2], (0.7, 2, 0.99, 0.0), [0, 2]),
    ([0.3, 0.1, 0.2], (1.0, 3, 1.0, 0.0), [0, 1, 2]),  # k == vocab
    ([0.3, 0.1, 0.2], (1.0, 0, 1.0, 0.0), [0, 1, 2]),  # nothing filtered
    ([20.0] + [0.0] * 9, (1.0, 0, 0.9, 0.0), [0]),  # one dominant token
    ([20.0] + [0.0] * 9, (1.0, 0, 1.0, 0.5), [0]),
    ([math.log(v) for v in (0.5, 0.2, 0.2, 0.1)], (1.0, 0, 0.75, 0.0), [0, 1, 2]),  # tie inside the top-p set
    ([math.log(v) for v in (0.5, 0.2, 0.2, 0.1)], (1.0, 0, 0.45, 0.0), [0]),  # tie group outside it
    ([0.0, math.log(0.5), math.log(0.1)], (1.0, 0, 1.0, 0.4), [0, 1]),  # min-p
    ([1.0, 5.0, 5.0, 2.0], (1.0, 0, 0.0, 0.0), [1, 2]),  # p = 0 keeps the most likely (all tied ones: deliberate)
    ([math.log(v) for v in (0.4, 0.3, 0.3)], (1.0, 0, 0.5, 0.0), [0, 1, 2]),  # deliberate: HF keeps one of the 0.3s
    ([1.0, 1.0, 1.0, 1.0], (1.0, 2, 0.5, 0.0), [0, 1, 2, 3]),  # deliberate: HF keeps two of four equal tokens
]
DELIBERATE = {10, 11, 12}  # top-p tie groups straddling the boundary: we keep the whole group (see sampling.py)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_designed_cases(case):
    values, (t, k, p, mp), kept = CASES[case]
    logits = torch.tensor([values])
    ours = torch.isfinite(filter_logits(logits, t, k, p, mp))[0].nonzero().flatten().tolist()
    assert ours == kept
    theirs = torch.isfinite(hf_filter(logits, t, k, p, mp))[0]
    if case in DELIBERATE:
        assert theirs.sum() < len(kept)  # transformers drops part of the tie group by sort order
    else:
        assert theirs.nonzero().flatten().tolist() == kept
    draws = sample_next_token(logits.expand(64, -1), temperature=t, top_k=k, top_p=p, min_p=mp, seed=1,
                              seq_ids=torch.arange(64), positions=torch.zeros(64, dtype=torch.long))
    assert set(draws.tolist()) <= set(kept)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float("inf")),
                                    dict(top_k=-1), dict(top_k=2.0), dict(top_p=1.5), dict(min_p=-0.1)])
def test_invalid_arguments(kwargs):
    args = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kwargs
    with pytest.raises(ValueError):
        sample_next_token(torch.zeros(1, 4), seed=0, seq_ids=torch.zeros(1, dtype=torch.long),
                          positions=torch.zeros(1, dtype=torch.long), **args)


def test_cpu_dispatch_uses_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=gen).bfloat16()
    kw = dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.01, seed=3, seq_ids=torch.arange(5),
              positions=torch.full((5,), 7))
    out = sample_next_token(logits, **kw)
    assert out.dtype == torch.long and out.shape == (5,)
    assert torch.equal(out, sample_next_token_reference(logits, **kw))
    assert sample_next_token(torch.full((1, 4), NEG_INF), **(kw | dict(seq_ids=torch.zeros(1, dtype=torch.long),
                                                                   positions=torch.zeros(1, dtype=torch.long)))) == 0


# ---------------------------------------------------------------------------------------------------------------------
# (b) Triton kernel under TRITON_INTERPRET=1 == reference. Run in a subprocess: the interpreter must be chosen before
# triton decorates the kernels, which another test module may already have imported without it.


def interpreter_checks():
    """Compare the Triton kernel with the reference over many configurations; returns a list of failure strings."""
    from ssd_kernels.triton_sampling import sample_next_token_triton

    gen = torch.Generator().manual_seed(1234)
    failures, rows = [], 0
    configs = [  # vocab, block, splits, (T, k, p, min_p); small blocks so the multi-block and multi-split paths run
        (3000, 256, None, (1.0, 0, 1.0, 0.0)), (1000, 64, 2, (0.7, 0, 1.0, 0.0)),  # race over the whole row
        (1024, 32, 2, (0.7, 8, 1.0, 0.0)), (777, 32, 3, (1.6, 5, 0.8, 0.0)),  # top-k with the block-maxima bound
        (3000, 128, None, (1.1, 5, 0.95, 0.0)), (600, 64, 2, (1.0, 0, 0.9, 0.0)), (1500, 128, 2, (1.3, 0, 0.5, 0.0)),
        (300, 64, 1, (1.0, 0, 0.0, 0.0)), (800, 64, 3, (1.0, 0, 1.0, 0.1)), (1200, 128, 2, (0.8, 0, 0.95, 0.05)),
        (640, 64, 2, (1.3, 50, 0.95, 0.05)),  # top-k without the bound (too few blocks): all finite are candidates
        (100, 16, 2, (1.0, 200, 0.9, 0.0)), (400, 64, 1, (1.0, 1, 1.0, 0.0)), (300, 32, 2, (2.0, 3, 1.0, 0.3)),
        (1300, 256, 2, (0.9, 1100, 0.9, 0.0)),  # k above the bound's limit
    ]
    for i, (vocab, block, splits, (t, k, p, mp)) in enumerate(configs):
        logits = random_logits(gen, 6, vocab, scale=1.0 + i % 4)
        if i % 3 == 1:
            logits = logits.bfloat16()
        if i % 5 == 2:  # a non-contiguous [B, V] view, as logits[:, -1, :] of a [B, T, V] tensor
            logits = torch.stack([logits, logits.flip(1)], dim=1)[:, 0, :]
        logits[0] = NEG_INF if i == 4 else logits[0]  # an all -inf row draws token 0
        kw = dict(temperature=t, top_k=k, top_p=p, min_p=mp, seed=i * 1000 + 7,
                  seq_ids=torch.randint(0, 2**40, (6,), generator=gen), positions=torch.randint(0, 5000, (6,)))
        ref = sample_next_token_reference(logits, **kw)
        out = sample_next_token_triton(logits, block=block, splits=splits, **kw)
        ok = ~borderline_rows(logits.float(), t, k, p, mp)
        rows += int(ok.sum())
        if not torch.equal(ref[ok], out[ok]):
            failures.append(f"config {i}: reference {ref.tolist()} triton {out.tolist()} (checked rows {ok.tolist()})")
        if i % 4:
            continue
        perm = torch.randperm(6, generator=gen)  # a row's draw does not depend on its batch slot
        permuted = sample_next_token_triton(logits[perm], block=block, splits=splits,
                                            **(kw | dict(seq_ids=kw["seq_ids"][perm], positions=kw["positions"][perm])))
        if not torch.equal(permuted, out[perm]):
            failures.append(f"config {i}: permuted rows {permuted.tolist()} != {out[perm].tolist()}")
    if rows < 80:
        failures.append(f"only {rows} rows were away from float borderlines")
    return failures


def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, OMP_NUM_THREADS="1")  # small ops: 1 thread is fastest
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------------------------
# (c) goodness of fit of the draws


def _draw_counts(logits_row, n, cfg, vary="seq"):
    ids = torch.arange(n)
    fixed = torch.full((n,), 5)
    seq_ids, positions = (ids, fixed) if vary == "seq" else (fixed, ids)
    draws = sample_next_token(logits_row.expand(n, -1), seed=11, seq_ids=seq_ids, positions=positions, **cfg)
    return torch.bincount(draws, minlength=logits_row.shape[-1]).double()


@pytest.mark.parametrize("vary", ["seq", "position"])
def test_draws_follow_the_filtered_softmax(vary):
    logits = torch.linspace(3.0, -3.0, 30)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    cfg = dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02)
    n = 40_000
    counts = _draw_counts(logits, n, cfg, vary)
    kept = torch.isfinite(hf_filter(logits[None], 1.3, 20, 0.9, 0.02))[0]
    assert 5 < int(kept.sum()) < 20 and counts[~kept].sum() == 0  # the filters are active; removed never drawn
    target = torch.softmax(logits.double() / 1.3 + torch.where(kept, 0.0, NEG_INF).double(), dim=-1)
    assert chi2_pvalue(counts[kept], n * target[kept]) > 1e-3
    # the same statistic rejects near misses: kept set without renormalising the temperature, or one token fewer
    wrong_t = torch.softmax(logits.double() + torch.where(kept, 0.0, NEG_INF).double(), dim=-1)
    assert chi2_pvalue(counts[kept], n * wrong_t[kept]) < 1e-6
    fewer = kept.clone()
    fewer[torch.where(kept, target, 1.0).argmin()] = False  # drop the least likely kept token
    wrong_set = torch.softmax(logits.double() / 1.3 + torch.where(fewer, 0.0, NEG_INF).double(), dim=-1)
    assert chi2_pvalue(counts[kept], n * wrong_set[kept].clamp_min(1e-9)) < 1e-6


def test_unfiltered_draws_follow_the_softmax():
    logits = torch.randn(25, generator=torch.Generator().manual_seed(3))
    n = 30_000
    counts = _draw_counts(logits, n, dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0))
    target = torch.softmax(logits.double() / 0.8, dim=-1)
    assert chi2_pvalue(counts, n * target) > 1e-3
    assert chi2_pvalue(counts, n * torch.softmax(logits.double(), dim=-1)) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# (d) the counter-based hash


def _draw(seq_ids, positions, seed, vocab=1000):
    logits = torch.zeros(len(seq_ids), vocab)  # flat: every token equally likely
    return sample_next_token(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                             seq_ids=seq_ids, positions=positions)


def test_hash_varies_with_each_input_and_repeats_exactly():
    ids = torch.arange(200)
    zeros = torch.zeros(200, dtype=torch.long)
    assert torch.equal(_draw(ids, zeros, 0), _draw(ids, zeros, 0))
    assert len(set(_draw(ids, zeros, 0).tolist())) > 150  # different sequences
    assert len(set(_draw(zeros, ids, 0).tolist())) > 150  # different positions
    assert len(set(torch.cat([_draw(zeros[:1], zeros[:1], s) for s in range(200)]).tolist())) > 150  # seeds
    high = torch.tensor([5, 5 + 2**32, 5 + 2**33])  # the upper 32 bits of a sequence id count too
    assert len(set(row_keys(0, high, torch.zeros(3, dtype=torch.long)).tolist())) == 3


def test_draw_does_not_depend_on_batch_slot():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 500, generator=gen) * 2
    kw = dict(temperature=1.2, top_k=40, top_p=0.9, min_p=0.0, seed=9)
    seq_ids, positions = torch.randint(0, 10**6, (16,), generator=gen), torch.randint(0, 100, (16,), generator=gen)
    out = sample_next_token(logits, seq_ids=seq_ids, positions=positions, **kw)
    perm = torch.randperm(16, generator=gen)
    permuted = sample_next_token(logits[perm], seq_ids=seq_ids[perm], positions=positions[perm], **kw)
    assert torch.equal(permuted, out[perm])
    single = [sample_next_token(logits[i:i + 1], seq_ids=seq_ids[i:i + 1], positions=positions[i:i + 1], **kw)
              for i in range(16)]
    assert torch.equal(torch.cat(single), out)


def test_uniforms_are_uniform_and_log_is_accurate():
    keys = row_keys(123, torch.arange(64), torch.zeros(64, dtype=torch.long))
    u = token_uniform(keys[:, None].expand(64, 1024).reshape(-1), torch.arange(1024).repeat(64))
    assert 0 < u.min() and u.max() < 1
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    assert chi2_pvalue(counts, torch.full((64,), u.numel() / 64.0, dtype=torch.float64)) > 1e-3
    pairs = u.view(64, 1024)
    corr = torch.corrcoef(torch.stack([pairs[:, :-1].reshape(-1), pairs[:, 1:].reshape(-1)]))[0, 1]
    assert abs(corr) < 0.02  # neighbouring tokens are not correlated
    v = torch.cat([torch.tensor([2.0**-24, 1 - 2.0**-24, 5.96e-8, 16.6]), u[:10000], -torch.log(u[:10000])])
    rel = (portable_log(v).double() - torch.log(v.double())).abs() / torch.log(v.double()).abs().clamp_min(1e-30)
    assert rel.max() < 4e-7


if __name__ == "__main__":  # the interpreter subprocess of test_triton_interpreter_matches_reference
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy's -inf - -inf in masked lanes
    problems = interpreter_checks()
    print("\n".join(problems) or "interpreter checks passed")
    sys.exit(1 if problems else 0)
