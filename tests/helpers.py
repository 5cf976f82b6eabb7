"""Random tiny Hugging Face checkpoints of each supported family, for loader and forward-pass tests."""

import copy
import json
import shutil
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-qwen3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_SIZE = 2048
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 2045, 2046, 2047

# Llama 3.1's rope scaling, with original_max_position_embeddings shrunk so that short test sequences
# already reach the wavelengths it rescales.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

_COMMON = dict(
    vocab_size=TOKENIZER_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=IM_END_ID,
)
# Each family's defaults follow its real checkpoints: Qwen3 sets head_dim explicitly and ties embeddings
# in small models; Qwen2 derives head_dim and has q/k/v biases (always on in its modeling code);
# Llama 3 uses rope_theta 5e5 and untied embeddings.
FAMILIES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1_000_000.0, tie_word_embeddings=False)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(head_dim=16, rope_theta=500_000.0, tie_word_embeddings=False)),
    # Qwen3-30B-A3B's choices, scaled down: untied, renormalised top-k router probabilities, every layer sparse.
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(head_dim=16, rope_theta=1_000_000.0,
                                                            tie_word_embeddings=False, num_experts=8,
                                                            num_experts_per_tok=2, moe_intermediate_size=32,
                                                            norm_topk_prob=True)),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (used by make_hf_model and by tests/assets/make_assets.py).

    The default init has zero biases and unit norm weights, which would let a loader that drops them pass, and
    std 0.02 weights that give near-uniform logits. Here norm weights are perturbed around 1, biases are random,
    and embeddings with std 0.3 give logits with std ~2.5 (entropy ~4.8 nats of 7.6 at vocab 2048), peaked
    enough for top-k/top-p tests to bite. With tied embeddings the current token's own embedding favours
    repeating it, so the layers that write into the residual stream (o_proj, down_proj) get 6x gain: greedy
    decoding then depends on the context instead of looping on one token.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                value = 1.0 + 0.2 * noise
            elif "embed" in name:
                value = 0.3 * noise
            elif param.dim() == 1:  # biases
                value = 0.2 * noise
            else:  # matrices (out, in) and stacked experts (experts, out, in): scaled by the fan-in
                gain = 6.0 if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else 1.0
                value = gain * noise / param.shape[-1] ** 0.5
            param.copy_(value.to(param.dtype))


def to_transformers4_config(config: dict) -> dict:
    """Rewrite a transformers-5 config.json dict in the form that checkpoints on the hub (saved by transformers 4)
    carry: top-level `rope_theta` and `rope_scaling` instead of `rope_parameters`, `torch_dtype` instead of `dtype`."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config["torch_dtype"] = config.pop("dtype")
    return config


def make_hf_model(
    family: str,
    tmp_path: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    legacy_config: bool = False,
    **overrides,
):
    """Build a random tiny `family` model, save it with the tiny tokenizer under tmp_path/family, return
    (path, hf_model). overrides go to the config (vocab_size >= 2048, tie_word_embeddings, num_attention_heads,
    num_key_value_heads, head_dim, hidden_size, rope_scaling=LLAMA3_ROPE_SCALING, ...). legacy_config writes
    config.json in the transformers-4 form of real hub checkpoints instead of transformers 5's; loaders must read both.
    dtype is the dtype of the saved weights (real checkpoints are bfloat16)."""
    config_cls, model_cls, defaults = FAMILIES[family]
    kwargs = copy.deepcopy({**_COMMON, **defaults, **overrides})  # configs write into dicts they are given
    if kwargs["vocab_size"] < TOKENIZER_SIZE:
        raise ValueError(f"vocab_size must be >= the tiny tokenizer's {TOKENIZER_SIZE}")
    model = model_cls(config_cls(**kwargs))
    randomize_(model, seed)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID)

    path = Path(tmp_path) / family
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_MODEL_DIR / name, path / name)
    if legacy_config:
        config_path = path / "config.json"
        config = to_transformers4_config(json.loads(config_path.read_text()))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path, model
