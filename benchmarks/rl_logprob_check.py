"""Engine vs trainer logprobs for the same sampled tokens under the same weights (a vLLM CPU engine, offline
LLM; T = 0.7): with vLLM's default logprobs_mode (raw, before temperature) and with processed_logprobs, which
rollout pools now use (docs/rl.md, "Diagnosis").

    python benchmarks/rl_logprob_check.py [MODEL_DIR]
"""
import os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1"); os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
import torch
from vllm import LLM, SamplingParams
from rayfleet.actors.rl.grpo import build_batch, token_logprobs
from rayfleet.actors.rl.samples import Sample, SampleGroup
from rayfleet.actors.rl.rollout import TaskStream, render_prompt
from rayfleet.actors.tasks import TRAINED_MODELS_DIR, score
from transformers import AutoModelForCausalLM, AutoTokenizer
def main():
    path = sys.argv[1] if len(sys.argv) > 1 else str(TRAINED_MODELS_DIR / "task-small")
    T = 0.7
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tasks = TaskStream({("products", "easy"): 1.0}, 11)
    prompts = [render_prompt(tok, next(tasks)) for _ in range(16)]
    for mode in ["raw_logprobs", "processed_logprobs"]:
        llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.3,
                  block_size=32, logprobs_mode=mode)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(n=1, temperature=T, max_tokens=8, logprobs=0, seed=5))
        samples = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            c = o.outputs[0]
            lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
            samples.append(Sample(group_id="g", index=i, group_size=16, task_key="k", prompt_token_ids=tuple(p),
                                  completion_token_ids=tuple(c.token_ids), rollout_logprobs=tuple(lps),
                                  token_versions=(0,) * len(lps), reward=0.0))
        batch = build_batch([SampleGroup("g", tuple(samples))], tok.pad_token_id)
        with torch.no_grad():
            mine = token_logprobs(model, batch, T)
        diff = ((mine - batch.old_logprobs).abs() * batch.completion_mask).max().item()
        print(f"RESULT mode={mode} T={T} tokens={int(batch.completion_mask.sum())} max|engine-trainer|={diff:.2e}", flush=True)
        del llm


if __name__ == "__main__":
    main()
