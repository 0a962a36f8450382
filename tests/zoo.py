"""Tiny seeded models, one per supported family, saved as real Hugging Face folders with a tokenizer."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_COMMON, **_IDS),
    "mistral": lambda: T.MistralConfig(**_COMMON, **_IDS),
    "qwen2": lambda: T.Qwen2Config(**_COMMON, **_IDS),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, **_IDS, head_dim=16),
    "gemma": lambda: T.GemmaConfig(**_COMMON, **_IDS, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, **_IDS, head_dim=16),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_COMMON, **_IDS, head_dim=16),
    "phi3": lambda: T.Phi3Config(**_COMMON, **_IDS),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, **_IDS),
    "opt": lambda: T.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        **_IDS,
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        **_IDS,
    ),
    "bert": lambda: T.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
    ),
}
CAUSAL = [k for k in CONFIGS if k != "bert"]


def training_text() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())[:20]


@cache
def tokenizer() -> T.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB entries, trained locally in well under a second."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(training_text(), trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int | None = None) -> torch.nn.Module:
    config = CONFIGS[family]()
    if layers is not None:  # rebuilt, so that per-layer fields (layer_types) follow the new depth
        fields = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
        config = type(config)(**{**fields, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    auto = T.AutoModel if family == "bert" else T.AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype).eval()
    # Non-trivial norms and biases so that every tensor matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
    return model


def save(
    family: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int | None = None
) -> Path:
    model = build(family, seed, dtype, layers)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def save_llama(folder: Path, **sizes: int) -> Path:
    """A Llama with ``sizes`` over the zoo's Llama fields (``hidden_size=256``: rows of whole K-quant super-blocks),
    transformers' own initialisation under seed 0 (norms left at one), and the tokenizer."""
    config = T.LlamaConfig(**{**_COMMON, **sizes}, **_IDS)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip


def save_llama3(folder: Path) -> Path:
    """A Llama with Llama-3 RoPE scaling (:data:`LLAMA3_ROPE`) and a RoPE base unlike the family defaults."""
    config = CONFIGS["llama"]()
    config.rope_parameters = dict(LLAMA3_ROPE)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def compress(model, recipe, out, options=None):
    """``sparsify.pipeline.compress`` without the perplexity before and after, for tests that are not about it."""
    from sparsify.pipeline import Options
    from sparsify.pipeline import compress as run

    return run(model, recipe, out, options or Options(evaluate=False))
