"""46 malformed or out-of-range OpenAI requests, and how each serving stack answers them.

Every case must be answered with a 4xx and an OpenAI error body *before* any stream starts: a streaming
request answered "200, then an error event" counts as a miss (the client already took it as accepted), and so
does any 5xx. The same corpus runs in the test suite against the fleet (tests/test_bad_input.py); this script
sends it to plain `vllm serve`, Ray Serve LLM and rayfleet side by side, on one demo model:

    .venv/bin/python benchmarks/bad_inputs.py [--contenders plain,serve_llm,fleet] [--out FILE]

Each stack serves the model under the name `bench-model`; the out-of-vocabulary ids are beyond the demo
models' 512-token vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODEL = "bench-model"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
OUT_OF_VOCAB = 99_999


@dataclass(frozen=True)
class BadInput:
    name: str
    path: str
    body: Any  # a dict is sent as JSON; bytes as they are
    stream: bool = False

    def payload(self, model: str) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        body = dict(self.body)
        if body.get("model") == MODEL:
            body["model"] = model
        if self.stream:
            body["stream"] = True
        return json.dumps(body).encode()


def chat(name: str, stream: bool = False, **fields: Any) -> BadInput:
    return BadInput(name, CHAT, {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}, stream)


def completion(name: str, stream: bool = False, **fields: Any) -> BadInput:
    return BadInput(name, COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}, stream)


CORPUS: list[BadInput] = [
    # the body itself
    BadInput("body is not JSON", CHAT, b"{not json"),
    BadInput("body is a JSON array", CHAT, b"[1, 2, 3]"),
    BadInput("body is empty", CHAT, b""),
    BadInput("body nested 100000 deep", CHAT, b"[" * 100_000 + b"]" * 100_000),
    BadInput("messages nested 200 deep", CHAT,
             json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                         "metadata": json.loads("[" * 200 + "]" * 200)}).encode()),
    # model
    chat("model is a list", model=[MODEL]),
    chat("model is an object", stream=True, model={"name": MODEL}),
    chat("model is null", model=None),
    chat("model is a number", stream=True, model=7),
    BadInput("model missing", CHAT, {"messages": MESSAGES}),
    chat("model unknown", stream=True, model="no-such-model"),
    # messages / prompt
    chat("messages not a list", messages="hi"),
    BadInput("messages missing", CHAT, {"model": MODEL}, stream=True),
    chat("message is a number", messages=[5]),
    chat("message content a number", stream=True, messages=[{"role": "user", "content": 5}]),
    completion("prompt missing", prompt=None),
    completion("prompt token id out of vocabulary", stream=True, prompt=[OUT_OF_VOCAB]),
    completion("prompt longer than the context", stream=True, prompt="word " * 3000),
    chat("chat prompt longer than the context", messages=[{"role": "user", "content": "word " * 3000}]),
    # sampling ranges
    chat("temperature negative", stream=True, temperature=-1),
    chat("temperature a string", temperature="hot"),
    chat("top_p above 1", stream=True, top_p=7),
    chat("top_p zero", top_p=0),
    chat("top_k below -1", stream=True, top_k=-5),
    chat("presence_penalty out of range", presence_penalty=5),
    chat("frequency_penalty out of range", stream=True, frequency_penalty=-5),
    chat("max_tokens negative", max_tokens=-5),
    chat("max_tokens zero", stream=True, max_tokens=0),
    chat("max_tokens beyond the context", stream=True, max_tokens=10**9),
    chat("n zero", n=0),
    chat("min_tokens above max_tokens", stream=True, min_tokens=50, max_tokens=4),
    chat("seed a string", seed="lucky"),
    # logprobs
    chat("top_logprobs 21", stream=True, logprobs=True, top_logprobs=21),
    chat("top_logprobs -1", logprobs=True, top_logprobs=-1),
    chat("logprobs not a boolean", logprobs="maybe"),  # "yes" would be coerced to true
    completion("completion logprobs 50", stream=True, logprobs=50),
    # token ids
    chat("logit_bias token out of vocabulary", stream=True, logit_bias={str(OUT_OF_VOCAB): 5}),
    chat("logit_bias key not a token id", logit_bias={"the": 5}),
    chat("stop_token_ids out of vocabulary", stream=True, stop_token_ids=[OUT_OF_VOCAB]),
    completion("allowed_token_ids out of vocabulary", allowed_token_ids=[OUT_OF_VOCAB]),
    # structured output and tools
    chat("json_schema invalid", stream=True,
         response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "notatype"}}}),
    chat("response_format type unknown", response_format={"type": "yaml"}),
    chat("structured_outputs regex invalid", stream=True, structured_outputs={"regex": "(unclosed"}),
    chat("tools not a list", tools="calculator"),
    chat("stream_options without stream", stream_options={"include_usage": True}),
    chat("stop is a number", stream=True, stop=5),
]


def send(base_url: str, case: BadInput, model: str = MODEL, api_key: str | None = None,
         timeout_s: float = 60) -> tuple[int, str, bool]:
    """(status, content type, whether an error arrived in-band after a 2xx)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    with httpx.stream("POST", base_url.rstrip("/") + case.path, content=case.payload(model), headers=headers,
                      timeout=timeout_s) as response:
        text = response.read().decode(errors="replace")
    in_band = response.status_code < 300 and '"error"' in text
    return response.status_code, response.headers.get("content-type", ""), in_band


def verdict(status: int, in_band: bool) -> str:
    if 400 <= status < 500:
        return "4xx"
    if status >= 500:
        return "5xx"
    return "in-band error after 200" if in_band else "accepted"


def run_contender(name: str, model_dir: Path, log_dir: Path) -> dict[str, str]:
    from contenders import make_contender

    contender = make_contender(name, model_dir, log_dir)
    base = contender.start()
    try:
        answers = {case.name: send(base, case) for case in CORPUS}
        return {name: verdict(status, in_band) for name, (status, _, in_band) in answers.items()}
    finally:
        contender.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default="plain,serve_llm,fleet")
    parser.add_argument("--model", default="tiny-llama-a", help="demo model folder name")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bad_inputs.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from contenders import DEMO_MODELS, ensure_ray

    ensure_ray()
    results = {}
    for name in args.contenders.split(","):
        began = time.monotonic()
        results[name] = run_contender(name, DEMO_MODELS / args.model, Path("/tmp"))
        good = sum(v == "4xx" for v in results[name].values())
        print(f"{name}: {good} of {len(CORPUS)} answered 4xx before any stream ({time.monotonic() - began:.0f} s)")
    rows = [f"| {case.name} | {'stream' if case.stream else ''} | "
            + " | ".join(results[n][case.name] for n in results) + " |" for case in CORPUS]
    print("\n| case | | " + " | ".join(results) + " |\n|---|---|" + "---|" * len(results))
    print("\n".join(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
