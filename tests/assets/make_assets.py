"""Build the offline test assets: a tiny random Qwen3 model with a real BPE tokenizer, and prompts.jsonl.

Run `python tests/assets/make_assets.py`. The output is byte-identical on every run with the same
torch/transformers/tokenizers versions, so a rerun shows up in `git diff` only when something really changed.
Nothing is downloaded: the tokenizer is trained here on corpus.txt plus the prompts.
"""

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

ASSETS_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(ASSETS_DIR), str(ASSETS_DIR.parent)]
from helpers import randomize_  # noqa: E402  (shared with make_hf_model: one weight recipe for all test models)
from prompt_texts import PROMPTS  # noqa: E402

MODEL_DIR = ASSETS_DIR / "tiny-qwen3"
MOE_DIR = ASSETS_DIR / "tiny-qwen3-moe"
PROMPTS_PATH = ASSETS_DIR / "prompts.jsonl"
CORPUS_PATH = ASSETS_DIR / "corpus.txt"

VOCAB_SIZE = 2048  # tokenizer size including the special tokens, and the model's vocab_size
# Same order as Qwen: the special tokens come last, after the BPE vocabulary, so no special id is 0
# (0 is what an uninitialised or zero-padded tensor holds, and would hide bugs).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2/Qwen3's pre-tokenizer split: words, single digits, punctuation runs, newlines, whitespace.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# ChatML as Qwen writes it. Extra kwargs such as enable_thinking are accepted and ignored by jinja.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SEED = 1234


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE like Qwen's: every byte is in the alphabet, so any text encodes and decodes exactly.

    No NFC normalizer (Qwen has one): it would make decode(encode(s)) != s for non-normalized unicode.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """tokenizer.json from `tokenizers`, and a hand-written tokenizer_config.json shaped like Qwen3's."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        # True would rewrite " ." as "." on decode and break the exact round trip.
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # The generic class loads tokenizer.json as written; "Qwen2Tokenizer" would rebuild the pipeline with NFC.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    write_json(out_dir / "tokenizer_config.json", config)


def build_model(eos_id: int, eot_id: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,  # a single id, as in real Qwen3 config.json; the full list is in generation_config
        dtype="float32",
    )
    model = Qwen3ForCausalLM(config)  # no seed needed: randomize_ overwrites every parameter
    randomize_(model, SEED)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[eos_id, eot_id], pad_token_id=eot_id)
    return model.eval()


def build_moe_model(eos_id: int, eot_id: int) -> Qwen3MoeForCausalLM:
    """Qwen3-30B-A3B's layout in miniature: every layer sparse, 8 experts of which 2 per token, renormalised
    router probabilities, untied embeddings."""
    config = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos_id, dtype="float32",
    )
    model = Qwen3MoeForCausalLM(config)
    randomize_(model, SEED + 1)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[eos_id, eot_id], pad_token_id=eot_id)
    return model.eval()


def prompt_records() -> list[dict]:
    records = []
    for i, (system, prompt) in enumerate(PROMPTS):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        records.append({"id": i, "prompt": prompt, "messages": messages})
    return records


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    MODEL_DIR.mkdir(exist_ok=True)
    records = prompt_records()
    assert len(records) == 48, len(records)
    with open(PROMPTS_PATH, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    texts = [CORPUS_PATH.read_text(encoding="utf-8")] + [r["prompt"] for r in records]
    tokenizer = train_tokenizer(texts)
    write_tokenizer(tokenizer, MODEL_DIR)

    end_ids = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    build_model(*end_ids).save_pretrained(MODEL_DIR, safe_serialization=True)
    MOE_DIR.mkdir(exist_ok=True)
    write_tokenizer(tokenizer, MOE_DIR)
    build_moe_model(*end_ids).save_pretrained(MOE_DIR, safe_serialization=True)
    print(f"wrote {PROMPTS_PATH}, {MODEL_DIR} and {MOE_DIR}")


if __name__ == "__main__":
    main()
