"""The KV-cached, continuously batched sampler: cache exactness, greedy parity with transformers, reproducible sampling
independent of batching, refilling, and input errors. Sampled tests use ssd_kernels.sample_next_token (torch
reference on CPU)."""

import json

import pytest
import torch
from helpers import ENDOFTEXT_ID, IM_END_ID, LLAMA3_ROPE_SCALING, make_hf_model
from transformers import AutoModelForCausalLM

import ssd

ATOL, RTOL = 5e-5, 1e-5  # fp32: cached decode attends over a masked cache instead of a causal block
MAX_NEW = 40
SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.8)
SAMPLED = dict(max_new_tokens=16, seed=1234, progress=False, **SAMPLING)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny, prompts_path):
    """All 48 prompts through the chat template, as the SSD pipeline tokenizes them."""
    _, tokenizer = tiny
    rows = [json.loads(line) for line in prompts_path.read_text().splitlines()]
    return [ssd.format_prompt(r["messages"], tokenizer, ssd.Config())[0] for r in rows]


@pytest.fixture(scope="module")
def varied(prompts):
    """Six prompts of clearly different lengths (shortest to longest)."""
    by_length = sorted(prompts, key=len)
    picks = [by_length[i] for i in (0, 9, 20, 30, 40, len(by_length) - 1)]
    assert len({len(p) for p in picks}) == len(picks)
    return picks


def hf_greedy(hf, prompt, max_new_tokens, eos_token_id):
    """transformers' greedy continuation of one prompt (batch 1, so no padding), including a final eos."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=eos_token_id, pad_token_id=ENDOFTEXT_ID)
    return out[0, len(prompt):].tolist()


def check_completion(c, eos, max_new_tokens):
    """A completion ends at its first end token (included, stop 'eos') or has exactly max_new_tokens tokens."""
    assert c.stop in ("eos", "length")
    assert not any(t in eos for t in c.tokens[:-1])
    if c.stop == "eos":
        assert c.tokens[-1] in eos and len(c.tokens) <= max_new_tokens
    else:
        assert c.tokens[-1] not in eos and len(c.tokens) == max_new_tokens


def flat(results):
    return [c for row in results for c in row]


# ---------------------------------------------------------------- KV cache ------------------------------------------

def new_cache(model, n_blocks, block_size):
    cfg = model.config
    shape = (cfg.num_layers, n_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
    # Finite garbage, not zeros: the pool is reused, so nothing may depend on what unused slots hold.
    return ssd.PagedKV(torch.randn(shape) * 5, torch.randn(shape) * 5)


def prefill(model, cache, seqs, blocks):
    """Prefill token lists into their blocks as generate() does; returns the logits of each one's last position."""
    groups = [[ssd.Sequence(0, 0, 0, 0, list(s), len(s), list(b))] for s, b in zip(seqs, blocks)]
    return torch.nn.functional.linear(ssd.prefill(model, cache, groups), model.head_weight())


def decode(model, cache, tokens, positions, blocks, window=False):
    """One decode step through ssd.decode_step, with a draw that hands back the logits; window: over a contiguous
    copy of the rows' blocks (copy_rows), as a decode window without the paged kernel does."""
    tables = torch.tensor([b + [0] * (max(map(len, blocks)) - len(b)) for b in blocks], dtype=torch.int32)
    if window:
        cache.rows = ssd.copy_rows(cache, tables, [torch.empty(0)] * 2)  # every slot: the rest is masked
    return ssd.decode_step(model, cache, lambda logits, *_: logits, torch.tensor(tokens), torch.tensor(positions),
                           tables, torch.zeros(len(tokens), dtype=torch.long))


def full_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]), torch.arange(len(seq))[None])[0]


@pytest.mark.parametrize("which", ["tiny-qwen3", "llama-gqa4-llama3rope", "qwen2-untied"])
@pytest.mark.parametrize("window", [False, True], ids=["paged", "window"])
@torch.no_grad()
def test_cached_decode_matches_full_forward(which, window, tiny, tmp_path):
    """Prefill rows of different lengths (one exactly a block) into scattered blocks of a pool full of garbage, decode
    them token by token, and hand one row's blocks to a shorter new sequence mid-way (the stale keys past its length
    must stay unread): every step's logits equal a full forward over the whole sequence."""
    if which == "tiny-qwen3":
        model = tiny[0]
    else:
        family, overrides = ("llama", dict(num_key_value_heads=1, rope_scaling=dict(LLAMA3_ROPE_SCALING))) \
            if which.startswith("llama") else ("qwen2", {})
        path, _ = make_hf_model(family, tmp_path, seed=11, **overrides)
        model = ssd.load_model(str(path), "cpu", torch.float32)[0]
    g = torch.Generator().manual_seed(0)
    lengths, steps, bs = [5, 37, 16], 30, 16
    seqs = [torch.randint(0, 2048, (n + steps,), generator=g).tolist() for n in lengths]
    cache = new_cache(model, 16, bs)
    order = torch.randperm(15, generator=g).add(1).tolist()  # scattered, out-of-order blocks (0 is the spare)
    blocks = [order[0:3], order[3:8], order[8:11]]  # 5 + 30, 37 + 30 and 16 + 30 tokens, in blocks of 16
    logits = prefill(model, cache, [s[:n] for s, n in zip(seqs, lengths)], blocks)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        torch.testing.assert_close(logits[b], full_logits(model, s[:n])[-1], atol=ATOL, rtol=RTOL)
    pos = list(lengths)
    fulls = [full_logits(model, s) for s in seqs]
    worst = 0.0
    for step in range(steps):
        if step == 12:  # row 1 ends; a new 3-token prompt takes its blocks over (stale keys past its length)
            new = torch.randint(0, 2048, (3 + steps,), generator=g).tolist()
            seqs[1], pos[1], fulls[1] = new, 3, full_logits(model, new)
            blocks[1] = blocks[1][::-1]
            torch.testing.assert_close(prefill(model, cache, [new[:3]], [blocks[1]])[0], fulls[1][2], atol=ATOL,
                                       rtol=RTOL)
        out = decode(model, cache, [s[p] for s, p in zip(seqs, pos)], pos, blocks, window)
        for b in range(len(seqs)):
            worst = max(worst, (out[b] - fulls[b][pos[b]]).abs().max().item())
            torch.testing.assert_close(out[b], fulls[b][pos[b]], atol=ATOL, rtol=RTOL)
        pos = [p + 1 for p in pos]
    print(f"[cache] {which}: max |cached decode - full forward| = {worst:.3e}")


# ---------------------------------------------------------------- greedy vs transformers ----------------------------

@pytest.fixture(scope="module")
def greedy_default(tiny, varied):
    return ssd.generate(tiny[0], varied, max_new_tokens=MAX_NEW, greedy=True, batch_size=4, progress=False)


def test_greedy_matches_transformers(tiny, hf_tiny, varied, greedy_default):
    model, _ = tiny
    assert model.config.eos_token_ids == [IM_END_ID, ENDOFTEXT_ID]
    for prompt, (c,) in zip(varied, greedy_default):
        check_completion(c, {IM_END_ID, ENDOFTEXT_ID}, MAX_NEW)
        assert c.tokens == hf_greedy(hf_tiny, prompt, MAX_NEW, [IM_END_ID, ENDOFTEXT_ID])


def pick_end_tokens(results):
    """Two ids that end some of these (eos-free) greedy completions early and leave at least one untouched:
    a token a few steps into completion 0, and the first token of a later completion that lacks it."""
    tokens = [c.tokens for (c,) in results]
    a = tokens[0][3]
    for t in tokens[1:]:
        if a not in t[:1] and t[0] not in tokens[0][:4]:
            return [a, t[0]]
    raise AssertionError("no second end token found; the tiny model's greedy outputs changed")


def test_greedy_eos_matches_transformers(tiny, hf_tiny, varied, greedy_default):
    """Both end ids stop a completion; it ends with the id it drew; the others run to exactly max_new_tokens."""
    eos = pick_end_tokens(greedy_default)
    results = ssd.generate(tiny[0], varied, max_new_tokens=MAX_NEW, greedy=True, batch_size=4, eos_token_ids=eos,
                           progress=False)
    for prompt, (c,) in zip(varied, results):
        check_completion(c, set(eos), MAX_NEW)
        assert c.tokens == hf_greedy(hf_tiny, prompt, MAX_NEW, eos)
    ends = [c.tokens[-1] for (c,) in results if c.stop == "eos"]
    assert set(ends) == set(eos), f"each end id must stop some completion: {ends} vs {eos}"
    assert any(c.stop == "length" for (c,) in results)
    # No end ids at all: every completion runs to the limit.
    none = ssd.generate(tiny[0], varied[:3], max_new_tokens=MAX_NEW, greedy=True, eos_token_ids=[], progress=False)
    assert all(c.stop == "length" and len(c.tokens) == MAX_NEW for c in flat(none))


def test_greedy_ignores_temperature(tiny, varied, greedy_default):
    again = ssd.generate(tiny[0], varied, max_new_tokens=MAX_NEW, greedy=True, temperature=0.0, batch_size=64,
                         progress=False)
    assert again == greedy_default


@pytest.mark.parametrize("batch_size", [64, 2])
def test_every_row_ending_at_its_first_token(tiny, varied, greedy_default, batch_size):
    """max_new_tokens=1, or an end id drawn first by every row: all rows end at prefill and must still be refilled."""
    run = dict(greedy=True, batch_size=batch_size, progress=False)
    results = ssd.generate(tiny[0], varied, max_new_tokens=1, **run)
    assert results == [[ssd.Completion(c.tokens[:1], "length")] for (c,) in greedy_default]
    firsts = [c.tokens[0] for (c,) in greedy_default]
    results = ssd.generate(tiny[0], varied, max_new_tokens=MAX_NEW, eos_token_ids=firsts, **run)
    assert results == [[ssd.Completion([t], "eos")] for t in firsts]


# ---------------------------------------------------------------- continuous batching -------------------------------

def test_refill_keeps_order_and_calls_on_finish_once(tiny, varied, greedy_default, monkeypatch):
    """batch_size 2 with 6 prompts: two cache rows serve every sequence, each row refilled as soon as its sequence
    ends (end ids make them end at different steps); results are complete and in order, on_finish fires once each."""
    model, _ = tiny
    eos = pick_end_tokens(greedy_default)
    run = dict(max_new_tokens=MAX_NEW, greedy=True, eos_token_ids=eos, progress=False)
    alone = [ssd.generate(model, [p], **run)[0][0] for p in varied]
    assert len({len(c.tokens) for c in alone}) > 2  # sequences really end at different steps
    calls = []
    hidden = model.hidden

    def spy(input_ids, positions, cache=None):  # a prefill packs its sequences in one row
        calls.append((cache.docs is not None, len(cache.docs.lens) if cache.docs else input_ids.shape[0]))
        return hidden(input_ids, positions, cache)

    monkeypatch.setattr(model, "hidden", spy)
    results = ssd.generate(model, varied, batch_size=2, **run)
    monkeypatch.undo()
    assert results == [[c] for c in alone]
    prefills = [rows for is_prefill, rows in calls if is_prefill]
    assert prefills[0] == 2 and sum(prefills) == len(varied) and 1 in prefills  # one row refilled, one decoding on
    assert max(rows for is_prefill, rows in calls if not is_prefill) == 2  # never more than batch_size rows
    # num_samples > 1: every (prompt, sample) finishes exactly once, in results[prompt][sample].
    finished = []
    results = ssd.generate(model, varied, num_samples=2, batch_size=2,
                           on_finish=lambda i, j, c: finished.append((i, j, c)), **run)
    assert results == [[c] * 2 for c in alone]
    assert sorted((i, j) for i, j, _ in finished) == [(i, j) for i in range(len(varied)) for j in range(2)]
    assert all(results[i][j] is c for i, j, c in finished)


def test_small_cache_and_prefill_chunks_change_nothing(tiny, prompts, monkeypatch):
    """A pool that fits only 3 sequences, small blocks, prefill chunks of a single prompt, and any retire interval
    give the same tokens."""
    model, _ = tiny
    some = prompts[:10]
    ref = ssd.generate(model, some, max_new_tokens=12, greedy=True, progress=False)
    blocks = -(-(max(map(len, some)) + 12) // 16)
    assert ssd.generate(model, some, max_new_tokens=12, greedy=True, block_size=16, cache_tokens=3 * blocks * 16,
                        progress=False) == ref
    for every in (1, 5):
        monkeypatch.setattr(ssd, "RETIRE_EVERY", every)
        assert ssd.generate(model, some, max_new_tokens=12, greedy=True, batch_size=4, progress=False) == ref
    monkeypatch.setattr(ssd, "PREFILL_TOKENS", 1)
    assert ssd.generate(model, some, max_new_tokens=12, greedy=True, batch_size=4, progress=False) == ref


def test_preempted_sequences_come_out_as_uninterrupted_ones(tiny, prompts):
    """A pool of blocks of 16 with room for the longest sequence and 3 blocks more, for up to 8 rows: sequences are
    preempted (their blocks freed, their tokens kept) and resumed by one prefill of everything they have; sampled
    tokens equal a run with room."""
    model, _ = tiny
    some = prompts[:8]
    kw = dict(max_new_tokens=48, num_samples=2, seed=5, progress=False, **SAMPLING)
    ref = ssd.generate(model, some, batch_size=16, **kw)
    stats, blocks = {}, -(-(max(map(len, some)) + 48) // 16) + 3
    tight = ssd.generate(model, some, batch_size=8, block_size=16, cache_tokens=blocks * 16, stats=stats, **kw)
    assert stats["preemptions"] >= 3 and tight == ref
    assert stats["prefill_tokens"] > sum(map(len, some))  # resumed sequences were prefilled again


def test_samples_of_a_prompt_share_one_prefill(tiny, prompts, monkeypatch):
    """num_samples 4: each prompt is prefilled once and its blocks shared (the partial last block copied), with the
    same completions as rows that each prefill their own copy. One prompt is exactly two blocks long."""
    model, _ = tiny
    some = [prompts[0][:32]] + prompts[1:5]
    kw = dict(max_new_tokens=20, num_samples=4, seed=9, block_size=16, progress=False, **SAMPLING)
    stats = {}
    shared = ssd.generate(model, some, batch_size=64, stats=stats, **kw)
    assert stats["prefill_tokens"] == sum(map(len, some)) and stats["peak_rows"] == 20
    alone = {}
    assert ssd.generate(model, some, batch_size=1, stats=alone, **kw) == shared
    assert alone["prefill_tokens"] == 4 * sum(map(len, some)) and alone["peak_rows"] == 1
    assert len({tuple(c.tokens) for c in shared[1]}) > 1  # the samples of one prompt still differ


def test_stats_count_rows_and_tokens(tiny, varied):
    stats = {}
    out = ssd.generate(tiny[0], varied, max_new_tokens=12, greedy=True, batch_size=3, stats=stats, progress=False)
    assert stats["tokens"] == sum(len(c.tokens) for c in flat(out)) and stats["preemptions"] == 0
    assert 1 <= stats["rows"] <= stats["peak_rows"] == 3 and stats["decode_steps"] >= 12 and stats["seconds"] > 0


# ---------------------------------------------------------------- sampling ------------------------------------------

@pytest.fixture(scope="module")
def sampled_prompts(varied):
    return [varied[i] for i in (0, 2, 3, 5)]


@pytest.fixture(scope="module")
def sampled(tiny, sampled_prompts):
    """Reference sampled run: 4 prompts x 3 samples, every sequence in the batch at once."""
    return ssd.generate(tiny[0], sampled_prompts, num_samples=3, batch_size=64, **SAMPLED)


@pytest.mark.parametrize("batch_size", [1, 7, 4])
def test_sampling_independent_of_batching(tiny, sampled_prompts, sampled, batch_size):
    """Same seed, same completions whether rows are decoded alone, or 7 / 4 at a time with refills (12 sequences)."""
    assert ssd.generate(tiny[0], sampled_prompts, num_samples=3, batch_size=batch_size, **SAMPLED) == sampled


@torch.no_grad()
def test_sampled_tokens_use_sequence_id_and_position(tiny, sampled_prompts, sampled):
    """Each token of sample j of prompt i is sample_next_token on the full-forward logits of everything before it,
    with seq_ids = i * num_samples + j and positions = the position the drawn token takes in the sequence."""
    from ssd_kernels import sample_next_token
    model, _ = tiny
    for i in (0, 3):
        for j in range(3):
            prompt, tokens = sampled_prompts[i], sampled[i][j].tokens
            logits = full_logits(model, prompt + tokens[:-1])[len(prompt) - 1:]
            n = len(tokens)
            redrawn = sample_next_token(logits, seed=SAMPLED["seed"], seq_ids=torch.full((n,), i * 3 + j),
                                        positions=torch.arange(len(prompt), len(prompt) + n), min_p=0.0, **SAMPLING)
            assert redrawn.tolist() == tokens


def test_sampling_seed_and_samples_differ(tiny, sampled_prompts, sampled):
    model, _ = tiny
    n = SAMPLED["max_new_tokens"]
    for c in flat(sampled):
        check_completion(c, set(model.config.eos_token_ids), n)
    other = ssd.generate(model, sampled_prompts, num_samples=3, **{**SAMPLED, "seed": 1235})
    same = sum(a == b for a, b in zip(flat(sampled), flat(other)))
    assert same <= 1, f"{same} of 12 completions unchanged by a new seed"
    for row in sampled:  # the samples of one prompt use different sequence ids
        assert len({tuple(c.tokens) for c in row}) > 1
    greedy = ssd.generate(model, sampled_prompts, max_new_tokens=n, greedy=True, progress=False)
    assert sum(g[0] == row[0] for g, row in zip(greedy, sampled)) <= 1  # T=1 really samples


def test_prompt_ids_set_sequence_ids(tiny, sampled_prompts, sampled):
    """Sample j of prompt i uses sequence id prompt_ids[i] * num_samples + j: a prompt generated alone with its index
    as prompt_ids reproduces its samples from the full batch, and a slice with shifted ids reproduces the slice."""
    model, p = tiny[0], sampled_prompts
    run = dict(num_samples=3, **SAMPLED)
    assert ssd.generate(model, [p[3]], prompt_ids=[3], **run) == [sampled[3]]
    assert ssd.generate(model, p[1:3], prompt_ids=[1, 2], batch_size=2, **run) == sampled[1:3]
    assert ssd.generate(model, [p[3], p[1]], prompt_ids=[3, 1], **run) == [sampled[3], sampled[1]]
    assert ssd.generate(model, [p[0]], **run) == [sampled[0]]  # prompt_ids defaults to range(len(prompts))
    assert ssd.generate(model, [p[2]], **run) != [sampled[2]]  # ... so alone it is sequence 0, not 2 * 3 + j


def test_sampling_with_top_k_1_or_tiny_top_p_is_greedy(tiny, varied, greedy_default):
    model, _ = tiny
    run = dict(max_new_tokens=MAX_NEW, seed=7, progress=False)
    assert ssd.generate(model, varied, temperature=1.5, top_k=1, **run) == greedy_default
    assert ssd.generate(model, varied, temperature=0.7, top_p=1e-6, **run) == greedy_default
    with_min_p = dict(num_samples=2, **{**SAMPLED, "min_p": 0.3})
    assert ssd.generate(model, varied[:3], **with_min_p) == ssd.generate(model, varied[:3], batch_size=3, **with_min_p)


# ---------------------------------------------------------------- errors --------------------------------------------

def assert_one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, f"SSDError message spans lines: {message!r}"
    for w in words:
        assert w.lower() in message.lower(), f"{w!r} not in {message!r}"


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive_unless_greedy(tiny, varied, temperature):
    with pytest.raises(ssd.SSDError) as e:
        ssd.generate(tiny[0], varied[:2], max_new_tokens=4, temperature=temperature, progress=False)
    assert_one_line(e, "temperature", "greedy")


def test_no_prompts(tiny):
    with pytest.raises(ssd.SSDError) as e:
        ssd.generate(tiny[0], [], max_new_tokens=4, greedy=True, progress=False)
    assert_one_line(e, "prompt")


def test_empty_prompt(tiny, varied):
    with pytest.raises(ssd.SSDError) as e:
        ssd.generate(tiny[0], [varied[0], []], max_new_tokens=4, greedy=True, progress=False)
    assert_one_line(e, "empty prompt")


def test_cache_too_small(tiny, varied):
    length = len(varied[-1]) + 8
    enough = -(-length // 16) * 16  # whole blocks of 16
    with pytest.raises(ssd.SSDError) as e:
        ssd.generate(tiny[0], varied, max_new_tokens=8, greedy=True, block_size=16, cache_tokens=enough - 1,
                     progress=False)
    assert_one_line(e, "cache", str(enough - 1), str(length), "blocks of 16", "--cache_tokens")
    # Exactly one sequence's worth is enough.
    ok = ssd.generate(tiny[0], varied, max_new_tokens=8, greedy=True, block_size=16, cache_tokens=enough,
                      progress=False)
    assert all(len(c.tokens) == 8 or c.stop == "eos" for c in flat(ok))


def test_sequences_past_the_context_are_refused(tiny, varied):
    """The tiny model has 2,048 positions: rotary angles past them were never trained, so this is an error."""
    room = tiny[0].config.max_position_embeddings - max(map(len, varied))
    with pytest.raises(ssd.SSDError) as e:
        ssd.generate(tiny[0], varied, max_new_tokens=room + 1, greedy=True, progress=False)
    assert_one_line(e, "max_position_embeddings (2048)", f"+ {room + 1} new tokens")
