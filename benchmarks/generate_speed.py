"""Tokens/s of `generate` with an active steering adapter vs the bare model, side by side in one run.

    python benchmarks/generate_speed.py                  # CPU default: a Llama-shaped model, hidden 512, 8 blocks
    python benchmarks/generate_speed.py --preset llama-2-7b --dtype bfloat16 --device cuda

Both are the same model, the same tensors in memory: the steering adapter is attached (`get_peft_model`) before each
steered run and removed (`unload`) after it. Two separately built copies differed by up to 4% with no adapter at
all, from where their weights lie in memory. Runs alternate in the order bare, steered, steered, bare, ... so that
drift of a noisy machine hits both alike; the median of each is reported, with the ratio steered / bare of the
medians and the median of the ratios of each repeat's two adjacent runs. Target: within 3% (ratio >= 0.97).
Random weights: only speed is measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig

PRESETS = {
    "cpu-small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}


def build(preset: str, dtype: torch.dtype, device: str) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tokens_per_second(model, input_ids, new_tokens: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    return input_ids.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=None, help="Steered block (default: the middle one).")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model = build(args.preset, dtype, args.device)
    layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 32000, (args.batch, args.prompt_tokens), generator=generator).to(args.device)

    def steered_run(new_tokens: int) -> float:
        """Attach a random vector at `layer`, generate with it active (multiplier 1), and take the adapter off."""
        nonlocal model
        steered = get_peft_model(model, SteeringConfig(layers=[layer], init="random"))
        peft_steer.set_multiplier(steered, 1.0)
        try:
            return tokens_per_second(steered, input_ids, new_tokens, args.device)
        finally:
            model = steered.unload()

    tokens_per_second(model, input_ids, 4, args.device)  # warm-up of both
    steered_run(4)
    bare_runs, steered_runs = [], []
    for repeat in range(args.repeats):
        order = ("bare", "steered") if repeat % 2 == 0 else ("steered", "bare")
        for kind in order:
            if kind == "bare":
                bare_runs.append(tokens_per_second(model, input_ids, args.new_tokens, args.device))
            else:
                steered_runs.append(steered_run(args.new_tokens))
    bare_tps, steered_tps = statistics.median(bare_runs), statistics.median(steered_runs)
    print(f"model: Llama-shaped {args.preset}, {args.dtype}, {args.device}; block {layer} steered")
    print(f"batch {args.batch}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.repeats} runs")
    print(f"bare model      : {bare_tps:10.1f} tokens/s (median; runs {[round(x, 1) for x in bare_runs]})")
    print(f"steering active : {steered_tps:10.1f} tokens/s (median; runs {[round(x, 1) for x in steered_runs]})")
    # Each repeat's two runs are adjacent in time: the median of their ratios is the least exposed to drift.
    paired = statistics.median(steered / bare for steered, bare in zip(steered_runs, bare_runs))
    print(f"ratio steered/bare: {steered_tps / bare_tps:.3f} of the medians, {paired:.3f} median of the paired runs "
          "(target >= 0.97)")  # fmt: skip


if __name__ == "__main__":
    main()
