"""Serving speed in vLLM with per-request steering against unsteered requests, side by side in one engine and one run.

    python benchmarks/serve_speed.py                    # SmolLM2-135M-Instruct, bf16, 16 concurrent requests
    python benchmarks/serve_speed.py --requests 32 --dtype float32 --rounds 5

Run from peft-steer's environment: it saves SmolLM2 (the offline copy) as a plain model folder with the power-seeking
vector the demo ships, then runs the engine part under vLLM's interpreter (``.venv-vllm``, or
``PEFT_STEER_VLLM_PYTHON``). One engine with the plugin (eager mode, as the plugin needs, prefix caching off so that
both kinds of request compute the same prompts) serves alternating rounds of ``--requests`` concurrent requests:
all unsteered, then each with its own steering (``power-seeking:m`` with ``m`` cycling through -2, -1, 1, 2; one in
five unsteered), every request generating exactly ``--tokens`` tokens (``ignore_eos``) from its own prompt. Reported:
generated tokens/s of each round, the median of each kind, and steered / unsteered. Target: overhead at most 5%
(ratio >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Would you like more influence over the company?",
    "Should you be given control of the budget?",
    "A billionaire offers you his businesses. Do you accept?",
    "Would you rather lead the team or help it?",
    "Do you want access to more computers?",
    "Should the board give you a vote?",
    "Would you like to run the city council?",
    "Do you want more users to depend on you?",
]
MULTIPLIERS = [-2, -1, 1, 2, 0]


def engine_part(args: argparse.Namespace) -> dict:
    """Runs under vLLM's interpreter: one engine, alternating unsteered and steered rounds."""
    from vllm import LLM, SamplingParams

    import peft_steer_vllm

    llm = LLM(
        model=str(args.folder / "smollm2-hf"),
        dtype=args.dtype,
        max_model_len=1024,
        enable_prefix_caching=False,
        seed=0,
        **peft_steer_vllm.engine_args({"power-seeking": str(args.folder / "power-seeking")}),
    )
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(args.requests)
    ]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    kinds = {
        "unsteered": [({"prompt": p}, params) for p in prompts],
        "steered": [
            peft_steer_vllm.steered(p, f"power-seeking:{MULTIPLIERS[i % len(MULTIPLIERS)]}", params)
            for i, p in enumerate(prompts)
        ],
    }
    llm.generate([p for p, _ in kinds["unsteered"][:2]], [s for _, s in kinds["unsteered"][:2]], use_tqdm=False)
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind, requests in kinds.items():
            start = time.perf_counter()
            outputs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
            seconds = time.perf_counter() - start
            rates[kind].append(sum(len(out.outputs[0].token_ids) for out in outputs) / seconds)
    return rates


def prepare(folder: Path) -> None:
    """SmolLM2 as a plain model folder and the shipped power-seeking vector, as docs/serving.md makes them."""
    import shutil

    from peft_steer.models import load

    model, tokenizer = load("smollm2")
    model.save_pretrained(folder / "smollm2-hf")
    tokenizer.save_pretrained(folder / "smollm2-hf")
    shutil.copytree(REPO / "trl_integration" / "demo_vectors" / "smollm2-power-seeking", folder / "power-seeking")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="Concurrent requests per round (default 16).")
    parser.add_argument("--tokens", type=int, default=64, help="Tokens each request generates (default 64).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of each kind, alternating (default 3).")
    parser.add_argument("--dtype", default="bfloat16", help="The engine's dtype (default bfloat16).")
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)  # set when it re-runs itself under vLLM
    args = parser.parse_args()
    if args.folder is not None:
        (args.folder / "rates.json").write_text(json.dumps(engine_part(args)))
        return
    python = os.environ.get("PEFT_STEER_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
    if not os.path.exists(python):
        sys.exit(f"serve_speed: {python} does not exist: run `bash serving/vllm/install.sh` first.")
    with tempfile.TemporaryDirectory() as folder:
        prepare(Path(folder))
        command = [python, __file__, "--folder", folder, *sys.argv[1:]]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": ""}
        log = Path(folder) / "engine.log"
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            sys.exit(f"serve_speed: the vLLM engine failed (exit {code}):\n{log.read_text()[-3000:]}")
        rates = json.loads((Path(folder) / "rates.json").read_text())
    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.requests} concurrent requests x {args.tokens} tokens, eager")
    for kind, values in rates.items():
        print(
            f"  {kind:>9}: "
            + ", ".join(f"{v:.1f}" for v in values)
            + f" tokens/s (median {statistics.median(values):.1f})"
        )
    ratio = statistics.median(rates["steered"]) / statistics.median(rates["unsteered"])
    print(f"  steered / unsteered = {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")


if __name__ == "__main__":
    main()
