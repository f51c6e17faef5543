"""Where GRPO's steps go on products/easy (task-small-mid), against the exact objective: J = mean over all 100
1-digit products of P_T(reference answer + EOS), and the exact (teacher-forced) greedy accuracy.

    MODE=rl   [OPT=sgd] [B=8] [G=8] python benchmarks/rl_gradient_check.py LR STEPS T
        the trainer's GRPO steps; per step: cos(trainer's gradient, -grad J), cos(the optimizer's step, grad J),
        |step|, J and exact greedy after it
    MODE=ga   python benchmarks/rl_gradient_check.py LR STEPS T adam|sgd
        gradient ascent on the exact J (infinite samples): what the best possible estimator reaches
    MODE=line python benchmarks/rl_gradient_check.py 1e-4 0 T
        J along the exact gradient (unit norm) and along sign(gradient) (Adam's first step), a finite-difference
        check of autograd's gradient, and the same per parameter tensor
(docs/rl.md, "Diagnosis", 2 Dec 2026 session 4)."""
import os
import sys

import torch

torch.set_num_threads(1)
MODE = os.environ.get('MODE', 'rl')
from rayfleet.actors.rl.rollout import TaskStream, render_prompt
from rayfleet.actors.rl.samples import Sample, SampleGroup
from rayfleet.actors.rl.trainer import GRPOTrainer, TrainerSpec
from rayfleet.actors.tasks import TRAINED_MODELS_DIR, generate, score

lr, steps, T = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
MAXT, G, B = 8, int(os.environ.get("G", "8")), int(os.environ.get("B", "8"))
tr = GRPOTrainer(str(TRAINED_MODELS_DIR / "task-small-mid"), TrainerSpec(lr=lr, clip_eps=0.2, micro_batch_groups=4, temperature=T, seed=0))
if os.environ.get("OPT") == "sgd": tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=lr)
tok = tr.tokenizer
seen = {}
for i in generate("products", "easy", 1950000000, 2000):
    seen.setdefault(i.prompt, i)
allp = sorted(seen.values(), key=lambda i: i.prompt)
assert len(allp) == 100
rows, spans = [], []
for i in allp:
    p = render_prompt(tok, i); a = tok.encode(i.answer, add_special_tokens=False) + [tok.eos_token_id]
    rows.append(p + a); spans.append((len(p), len(p) + len(a)))
W = max(map(len, rows))
ids = torch.full((100, W), tok.pad_token_id); am = torch.zeros((100, W), dtype=torch.long)
for k, r in enumerate(rows): ids[k, :len(r)] = torch.tensor(r); am[k, :len(r)] = 1
def J(grad=False):
    with torch.set_grad_enabled(grad):
        logits = tr.model(input_ids=ids, attention_mask=am).logits.float()
        lp = torch.log_softmax(logits / T, -1)
        seqlp, greedy = [], 0
        for k, (s, e) in enumerate(spans):
            tgt = ids[k, s:e]; l = lp[k, s - 1:e - 1]
            seqlp.append(l.gather(-1, tgt[:, None]).sum())
            greedy += int((logits[k, s - 1:e - 1].argmax(-1) == tgt).all())
        j = torch.stack(seqlp).exp().mean()
    return j, greedy / 100
if MODE == 'line':
    params = list(tr.model.parameters())
    theta0 = [p.detach().clone() for p in params]
    j0, g0 = J(); tr.optimizer.zero_grad(); j, _ = J(True); j.backward()
    gJ = [p.grad.detach().clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in gJ))
    print("J0", float(j0), "greedy", g0, "|gradJ|", float(norm))
    def line(d, ts, label):
        for t in ts:
            with torch.no_grad():
                for p, t0, dd in zip(params, theta0, d): p.copy_(t0 + t * dd)
            jj, gg = J(); print(f"{label} t={t:g}: J {float(jj):.4f} greedy {gg:.2f}", flush=True)
        with torch.no_grad():
            for p, t0 in zip(params, theta0): p.copy_(t0)
    line([g / norm for g in gJ], [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "exact-grad unit")
    line([torch.sign(g) for g in gJ], [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "sign(exact grad) (Adam's first step)")
    d = [g / norm for g in gJ]
    for eps in [1e-5, 1e-4, 1e-3, 3e-3]:
        with torch.no_grad():
            for p, t0, dd in zip(params, theta0, d): p.copy_(t0 + eps * dd)
            jp = float(J()[0])
            for p, t0, dd in zip(params, theta0, d): p.copy_(t0 - eps * dd)
            jm = float(J()[0])
        print(f"finite diff eps {eps:g}: {(jp - jm) / (2 * eps):.4f} vs autograd {float(norm):.4f}", flush=True)
    names = [n for n, _ in tr.model.named_parameters()]
    for n, g in zip(names, gJ): print(f"{n:48s} |g| {float(g.norm()):.3e}")
    for k, n in enumerate(names):
        dk = [g / g.norm() if i == k else torch.zeros_like(g) for i, g in enumerate(gJ)]
        out = []
        for t in [1e-3, 3e-3, 1e-2, 3e-2]:
            with torch.no_grad():
                for p, t0, dd in zip(params, theta0, dk): p.copy_(t0 + t * dd)
                out.append(f"{float(J()[0]) - float(j0):+.4f}")
        with torch.no_grad():
            for p, t0 in zip(params, theta0): p.copy_(t0)
        print(f"{n:48s} dJ at t=1e-3,3e-3,1e-2,3e-2 along own unit grad: {out}  linear@1e-2 {float(gJ[k].norm())*1e-2:+.4f}", flush=True)
elif MODE == 'ga':
    opt = torch.optim.Adam(tr.model.parameters(), lr=lr) if sys.argv[4] == "adam" else torch.optim.SGD(tr.model.parameters(), lr=lr)
    print("exact GA", sys.argv[4], lr, "J0", float(J()[0]), J()[1])
    for s in range(steps):
        opt.zero_grad(); j, _ = J(True); (-j).backward(); opt.step()
        if (s + 1) % 5 == 0: jj, g = J(); print(s + 1, f"J {float(jj):.4f} greedy {g:.2f}", flush=True)
else:
    gen = torch.Generator().manual_seed(123)
    @torch.no_grad()
    def sample(prompt, n):
        x = torch.tensor([prompt] * n); toks = [[] for _ in range(n)]; lps = [[] for _ in range(n)]; done = [False] * n
        for _ in range(MAXT):
            lp = torch.log_softmax(tr.model(input_ids=x).logits[:, -1].float() / T, -1)
            nxt = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(-1)
            for j in range(n):
                if not done[j]:
                    toks[j].append(int(nxt[j])); lps[j].append(float(lp[j, nxt[j]])); done[j] = int(nxt[j]) == tok.eos_token_id
            x = torch.cat([x, nxt[:, None]], 1)
            if all(done): break
        return toks, lps
    tasks = TaskStream({("products", "easy"): 1.0}, 11)
    j0, g0 = J(); print(f"RUN opt={os.environ.get('OPT','adam')} lr={lr} T={T} G={G} B={B}\nv0 J {float(j0):.4f} greedy {g0:.2f}", flush=True)
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
        mbs = [groups[i:i + 4] for i in range(0, B, 4)]
        for mb in mbs: tr.accumulate(mb, len(mbs))
        gt = torch.cat([p.grad.flatten() for p in tr.model.parameters()]).clone()
        tr.optimizer.zero_grad(); j, _ = J(True); (-j).backward()
        gj = torch.cat([p.grad.flatten() for p in tr.model.parameters()]).clone()
        tr.optimizer.zero_grad()
        for p, g_ in zip(tr.model.parameters(), torch.split(gt, [p.numel() for p in tr.model.parameters()])): p.grad = g_.view_as(p).clone()
        before = torch.cat([p.detach().flatten() for p in tr.model.parameters()]).clone()
        rep = tr.optimizer_step()
        dth = torch.cat([p.detach().flatten() for p in tr.model.parameters()]) - before
        j, gr = J()
        mixed = sum(min(g.rewards) != max(g.rewards) for g in groups)
        print(f"v{rep.version} rollout {sum(rs)/len(rs):.3f} mixed {mixed}/{B} ratio {rep.mean_ratio:.4f} cos(g,-dJ) {float(torch.nn.functional.cosine_similarity(gt, gj, 0)):+.3f} cos(dtheta,dJ) {float(torch.nn.functional.cosine_similarity(dth, gj * -1, 0)):+.3f} |dth| {float(dth.norm()):.2e} J {float(j):.4f} greedy {gr:.2f}", flush=True)
