"""In-process GRPO check (no Ray, no vLLM): the trainer's own GRPOTrainer and loss, groups sampled from the model
itself in torch at the rollouts' temperature, the task's verifier, held-out reward (greedy and 4 samples per
instance) every EVERY steps, and a noise-free held-out measure: over the held-out instances, the mean probability
(at the training temperature) of the reference answer + EOS ("P(ref)") and the fraction whose greedy answer is
exactly the reference ("exact greedy", teacher-forced argmax). Separates the learning signal from the fleet
pipeline (docs/rl.md, "Diagnosis").

    MODEL=actors/tasks/trained/task-small-mid CELL=products/easy [OPT=sgd] [NGROUPS=8] [GROUP=8] [KL=0] [SEED=0] \
        [EVERY=6] [FREEZE=REGEX] python benchmarks/rl_inprocess_check.py LR STEPS TEMPERATURE

GROUP is the samples per prompt, KL the trainer's `kl_coef` (k3 KL to the starting model).

FREEZE keeps the parameters whose names match REGEX fixed (e.g. 'embed_tokens|norm|layers.0.self_attn', the
directions the gradient check found sharp) and trains the rest with Adam.
"""
import os, re, sys, time, torch
from rayfleet.actors.rl.trainer import GRPOTrainer, TrainerSpec
from rayfleet.actors.rl.samples import Sample, SampleGroup
from rayfleet.actors.rl.rollout import TaskStream, held_out, render_prompt
from rayfleet.actors.tasks import score, TRAINED_MODELS_DIR
lr, steps, T = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
MAXT, G, B = 8, 8, 8
path = os.environ.get("MODEL") or str(TRAINED_MODELS_DIR / "task-small")
cells = {tuple(os.environ.get("CELL", "products/hard").split("/")): 1.0}
SEED, EVERY = int(os.environ.get("SEED", "0")), int(os.environ.get("EVERY", "6"))
torch.set_num_threads(1)
G = int(os.environ.get("GROUP", G))
tr = GRPOTrainer(path, TrainerSpec(lr=lr, clip_eps=0.2, micro_batch_groups=4, temperature=T, seed=SEED,
                                   kl_coef=float(os.environ.get("KL", "0"))))
tok = tr.tokenizer
if os.environ.get("OPT") == "sgd":
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=lr)
B = int(os.environ.get("NGROUPS", B))
if os.environ.get("FREEZE"):
    for name, param in tr.model.named_parameters():
        param.requires_grad_(not re.search(os.environ["FREEZE"], name))
    tr.optimizer = torch.optim.AdamW([p for p in tr.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
evals = held_out(cells, 1950000000, 128)
eprompts = [render_prompt(tok, i) for i in evals]
gen = torch.Generator().manual_seed(123 + SEED)
@torch.no_grad()
def sample(prompt, n, temp=T):
    ids = torch.tensor([prompt] * n); toks = [[] for _ in range(n)]; lps = [[] for _ in range(n)]; done = [False] * n
    for _ in range(MAXT):
        lp = torch.log_softmax(tr.model(input_ids=ids).logits[:, -1].float() / temp, -1)
        nxt = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(-1)
        for j in range(n):
            if not done[j]:
                toks[j].append(int(nxt[j])); lps[j].append(float(lp[j, nxt[j]]))
                done[j] = int(nxt[j]) == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        if all(done): break
    return toks, lps
@torch.no_grad()
def exact():
    """Mean P_T(reference answer + EOS) and teacher-forced exact greedy accuracy over the held-out instances."""
    p_ref, right = 0.0, 0
    for inst, prompt in zip(evals, eprompts):
        answer = tok.encode(inst.answer, add_special_tokens=False) + [tok.eos_token_id]
        logits = tr.model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()
        target = torch.tensor(answer)
        p_ref += float(torch.log_softmax(logits / T, -1).gather(-1, target[:, None]).sum().exp())
        right += int((logits.argmax(-1) == target).all())
    return f"P(ref) {p_ref / len(evals):.4f} exact greedy {right / len(evals):.3f}"
def evaluate():
    tr.model.eval()
    e = exact()
    outs = tr.greedy(eprompts, MAXT)
    gen_state = gen.get_state()
    gen.manual_seed(7)  # the same evaluation draws for every version
    g = sum(score(i, tok.decode(o, skip_special_tokens=True)) for i, o in zip(evals, outs)) / len(evals)
    s = 0.0
    for i, p in zip(evals, eprompts):
        toks, _ = sample(p, 4)
        s += sum(score(i, tok.decode(t, skip_special_tokens=True)) for t in toks) / 4
    gen.set_state(gen_state)  # and the training draws as without evaluation
    tr.model.train()
    return f"greedy {g:.3f} sampled {s / len(evals):.3f} {e}"
tasks = TaskStream(cells, 11 + SEED)
print(f"RUN seed={SEED} opt={os.environ.get('OPT', 'adam')} groups={B} lr={lr} T={T} model={path} cells={cells}\nv0 heldout {evaluate()}", flush=True)
for step in range(steps):
    tr.model.eval(); groups = []; rs = []
    for g in range(B):
        inst = next(tasks); p = render_prompt(tok, inst); toks, lps = sample(p, G)
        groups.append(SampleGroup(f"g{step}-{g}", tuple(Sample(group_id=f"g{step}-{g}", index=j, group_size=G,
            task_key=inst.key, prompt_token_ids=tuple(p), completion_token_ids=tuple(t), rollout_logprobs=tuple(l),
            token_versions=(tr.version,) * len(t), reward=score(inst, tok.decode(t, skip_special_tokens=True)))
            for j, (t, l) in enumerate(zip(toks, lps)))))
        rs += groups[-1].rewards
    tr.model.train()
    rep = tr.train_step([groups[i:i + 4] for i in range(0, B, 4)])
    mixed = sum(min(g.rewards) != max(g.rewards) for g in groups)
    line = f"v{rep.version} rollout {sum(rs)/len(rs):.3f} mixed_groups {mixed}/{B} ratio {rep.mean_ratio:.4f}"
    if rep.version % EVERY == 0 or step == steps - 1: line += f" heldout {evaluate()}"
    print(line, flush=True)
