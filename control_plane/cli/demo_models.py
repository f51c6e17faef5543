"""Tiny random-weight Llama-architecture models, built locally so the demo and the tests need no hub.

Each model is a Hugging Face folder (config, safetensors weights, a byte-level BPE tokenizer trained on
a small built-in corpus, and a chat template) that vLLM loads like any downloaded model. Sizes differ
per model so that the demo fleet is heterogeneous.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# head_dim must be 64 or more: vLLM's CPU attention rejects smaller heads (ENVIRONMENT.md).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Ray schedules actors across a cluster. "
    "vLLM pages the KV cache into blocks and batches requests continuously. "
    "A fleet of replicas serves many models; a router picks one for each request. "
    "Live migration moves a running request and its cache to another replica. "
    "Hello world! What is the capital of France? Paris is the capital of France. "
    "Write a haiku about the sea. Explain gradient descent in one sentence. 0123456789 "
)


@dataclass(frozen=True)
class DemoModelConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    seed: int = 0


DEMO_MODELS = (
    DemoModelConfig(name="tiny-llama-a", hidden_size=128, num_layers=2, seed=1),
    DemoModelConfig(name="tiny-llama-b", hidden_size=256, num_layers=4, num_heads=4, seed=2),
)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_demo_model(config: DemoModelConfig, out_dir: Path) -> Path:
    """Write one model folder; skip it when a complete one is already there (idempotent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = out_dir / config.name
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(config.vocab_size)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.hidden_size // config.num_heads,
            max_position_embeddings=config.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            torch_dtype="float32",
        )
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    logger.info("built demo model %s (%d layers, hidden %d) in %s", config.name, config.num_layers,
                config.hidden_size, target)
    return target


def build_demo_models(out_dir: str | Path, configs: tuple[DemoModelConfig, ...] = DEMO_MODELS) -> list[Path]:
    out = Path(out_dir)
    return [build_demo_model(config, out) for config in configs]
