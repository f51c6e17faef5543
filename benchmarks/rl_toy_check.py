"""Toy GRPO sanity check (no Ray, no vLLM): the trainer's own GRPOTrainer and loss, a reward any correct policy
gradient must learn within a few dozen steps. Reward of a completion = 1 if its answer starts with TARGET digit
(default "7"), else 0, whatever the question. Groups of G samples per prompt at temperature T, B prompts per
step; the mean reward (T-sampled, 8 per prompt) on fresh held-out prompts is printed every EVERY steps.

    [MODEL=...] [TARGET=7] [G=8] [B=8] [EVERY=5] [SEED=0] python benchmarks/rl_toy_check.py LR STEPS [T]
"""
import os
import sys

import torch
from rayfleet.actors.rl.rollout import TaskStream, held_out, render_prompt
from rayfleet.actors.rl.samples import Sample, SampleGroup
from rayfleet.actors.rl.trainer import GRPOTrainer, TrainerSpec
from rayfleet.actors.tasks import TRAINED_MODELS_DIR

lr, steps = float(sys.argv[1]), int(sys.argv[2])
T = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
MAXT, G, B = 8, int(os.environ.get("G", "8")), int(os.environ.get("B", "8"))
EVERY, SEED, TARGET = int(os.environ.get("EVERY", "5")), int(os.environ.get("SEED", "0")), os.environ.get("TARGET", "7")
path = os.environ.get("MODEL") or str(TRAINED_MODELS_DIR / "task-small-mid")
cells = {tuple(os.environ.get("CELL", "products/easy").split("/")): 1.0}
tr = GRPOTrainer(path, TrainerSpec(lr=lr, clip_eps=0.2, micro_batch_groups=4, temperature=T, seed=SEED))
tok = tr.tokenizer
gen = torch.Generator().manual_seed(1000 + SEED)


def reward(tokens: list[int]) -> float:
    return float(tok.decode(tokens, skip_special_tokens=True).strip().startswith(TARGET))


@torch.no_grad()
def sample(prompt: list[int], n: int, generator: torch.Generator):
    ids = torch.tensor([prompt] * n)
    toks, lps, done = [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
    for _ in range(MAXT):
        lp = torch.log_softmax(tr.model(input_ids=ids).logits[:, -1].float() / T, -1)
        nxt = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)
        for j in range(n):
            if not done[j]:
                toks[j].append(int(nxt[j]))
                lps[j].append(float(lp[j, nxt[j]]))
                done[j] = int(nxt[j]) == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        if all(done):
            break
    return toks, lps


eval_prompts = [render_prompt(tok, i) for i in held_out(cells, 1950000000, 32)]


def evaluate() -> float:
    tr.model.eval()
    g = torch.Generator().manual_seed(7)  # the same draws for every version
    total = sum(reward(t) for p in eval_prompts for t in sample(p, 8, g)[0])
    tr.model.train()
    return total / (8 * len(eval_prompts))


tasks = TaskStream(cells, 11 + SEED)
print(f"RUN toy target={TARGET!r} lr={lr} T={T} G={G} B={B} seed={SEED} model={path}", flush=True)
print(f"v0 heldout {evaluate():.3f}", flush=True)
for step in range(steps):
    tr.model.eval()
    groups, rs = [], []
    for g in range(B):
        p = render_prompt(tok, next(tasks))
        toks, lps = sample(p, G, gen)
        gid = f"g{step}-{g}"
        groups.append(SampleGroup(gid, tuple(
            Sample(group_id=gid, index=j, group_size=G, task_key=gid, prompt_token_ids=tuple(p),
                   completion_token_ids=tuple(t), rollout_logprobs=tuple(lp), token_versions=(tr.version,) * len(t),
                   reward=reward(t)) for j, (t, lp) in enumerate(zip(toks, lps)))))
        rs += groups[-1].rewards
    tr.model.train()
    rep = tr.train_step([groups[i:i + 4] for i in range(0, B, 4)])
    line = f"v{rep.version} rollout {sum(rs) / len(rs):.3f} ratio {rep.mean_ratio:.4f} loss {rep.loss:+.4f}"
    if rep.version % EVERY == 0:
        line += f" heldout {evaluate():.3f}"
    print(line, flush=True)
