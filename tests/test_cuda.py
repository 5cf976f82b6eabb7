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
    """The CUDA attention backends of prefill and masked decode: every greedy token is the full forward's argmax
    (up to `tol` of logit, for near-ties), with rows of different lengths refilled mid-run."""
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
