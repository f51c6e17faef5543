"""Where the serving path's CPU goes: py-spy on every process of one contender while it is saturated.

Starts one contender (default: the fleet) as `bench_serving_overhead.py` does, warms it up, then samples each
of its processes with py-spy while `vllm bench serve` sends every prompt at once. Writes, per process role,
its collapsed stacks (py-spy's raw format: load them into speedscope or flamegraph.pl for a flame graph) and a
table of the functions with the most inclusive samples into `--out-dir` (`profile.md` holds the tables).

    python benchmarks/profile_serving.py --label before --out-dir docs/profiles/serving-before
    python benchmarks/profile_serving.py --contender plain --label plain --out-dir /tmp/prof-plain
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import DEMO_MODELS, SERVED_NAME, ensure_ray, make_contender, warm_up  # noqa: E402
from cpu_accounting import role  # noqa: E402
from load_generator import random_dataset, run_vllm_bench  # noqa: E402

import psutil  # noqa: E402

# Processes worth a profile: the per-token path of each stack (infrastructure is idle here).
PROFILED = ("Serve replica OpenAIIngress", "ProxyActor", "LLMReplica", "vLLM api_server",
            "Serve replica OpenAiIngress", "Serve replica LLMServer:bench-model", "vLLM EngineCore", "vLLM Worker")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", default="fleet", help="plain, fleet, fleet_nomig or serve_llm (default fleet)")
    parser.add_argument("--model", type=Path, default=DEMO_MODELS / "tiny-llama-b")
    parser.add_argument("--prompts", type=int, default=200, help="requests sent at once (default 200)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    parser.add_argument("--top", type=int, default=25, help="rows per process table (default 25)")
    parser.add_argument("--label", default="", help="title of this profile in profile.md")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/rayfleet-profile-serving"))
    return parser.parse_args(argv)


def targets() -> dict[str, int]:
    """role -> pid of the processes this run started that carry tokens."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        name = role(proc)
        if name in PROFILED and name not in found:
            found[name] = proc.pid
    return found


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def frame_name(frame: str) -> str:
    """`fn (path/to/module.py:12)` -> `fn (module path below site-packages)`."""
    fn, _, where = frame.partition(" (")
    return f"{fn} ({where.rsplit(':', 1)[0].split('site-packages/')[-1]})" if where else fn


def table(raw: Path, top: int) -> tuple[int, list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """From py-spy's collapsed stacks: the top functions by inclusive samples (counted once per stack) and by
    self samples (the leaf frame), each row (function, inclusive, self)."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame_name(f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    by_inclusive = [(f, n, own[f]) for f, n in inclusive.most_common(top)]
    by_self = [(f, inclusive[f], n) for f, n in own.most_common(top)]
    return total, by_inclusive, by_self


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    contender = make_contender(args.contender, args.model, args.log_dir)
    print(f"starting {args.contender}", flush=True)
    contender.start()
    spies: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        warm_up(contender.base_url)
        for name, pid in targets().items():
            raw = args.out_dir / f"{slug(name)}.collapsed.txt"
            cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate",
                   str(args.rate), "--nonblocking", "--format", "raw", "--output", str(raw)]
            spies[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
        time.sleep(2)  # py-spy attaches
        began = time.monotonic()
        bench = run_vllm_bench(contender.base_url, args.model, SERVED_NAME, request_rate=float("inf"),
                               num_prompts=args.prompts, dataset=random_dataset(args.input_len, args.output_len),
                               seed=0, log_path=args.log_dir / "loadgen.log")
        seconds = time.monotonic() - began
    finally:
        for proc, _ in spies.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in spies.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        contender.stop()
    lines = [f"## {args.label or args.contender}", "",
             f"`python benchmarks/profile_serving.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
             f"{os.getloadavg()[0]:.2f} after; {args.prompts} prompts at once ({args.input_len} in, "
             f"{args.output_len} out) in {seconds:.1f} s, {bench['output_throughput']:.0f} output tok/s. "
             f"py-spy at {args.rate} Hz, idle samples included (a waiting event loop shows as `select`).", ""]
    for name, (_, raw) in spies.items():
        if not raw.exists():
            continue
        total, by_inclusive, by_self = table(raw, args.top)
        for title, rows in (("inclusive", by_inclusive), ("self", by_self)):
            lines += [f"### {name}: top by {title} samples ({total} samples; stacks `{raw.name}`)", "",
                      "| function (module) | inclusive % | self % |", "| --- | ---: | ---: |"]
            lines += [f"| `{fn}` | {100 * i / max(total, 1):.1f} | {100 * o / max(total, 1):.1f} |"
                      for fn, i, o in rows]
            lines.append("")
    (args.out_dir / "profile.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
