"""Tokens/s of `generate` with an active steering adapter vs the bare model, side by side in one run.

    python benchmarks/generate_speed.py                  # CPU default: a Llama-shaped model, hidden 512, 8 blocks
    python benchmarks/generate_speed.py --preset llama-2-7b --dtype bfloat16 --device cuda

Runs alternate (bare, steered, bare, steered, ...) so that drift of a noisy machine hits both; the median of each is
reported, with the ratio steered / bare. Target: within 3% (ratio >= 0.97). Random weights: only speed is measured.
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
    bare = build(args.preset, dtype, args.device)
    layer = args.layer if args.layer is not None else bare.config.num_hidden_layers // 2
    steered = get_peft_model(build(args.preset, dtype, args.device), SteeringConfig(layers=[layer], init="random"))
    peft_steer.set_multiplier(steered, 1.0)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 32000, (args.batch, args.prompt_tokens), generator=generator).to(args.device)

    tokens_per_second(bare, input_ids, 4, args.device)  # warm-up of both
    tokens_per_second(steered, input_ids, 4, args.device)
    bare_runs, steered_runs = [], []
    for _ in range(args.repeats):
        bare_runs.append(tokens_per_second(bare, input_ids, args.new_tokens, args.device))
        steered_runs.append(tokens_per_second(steered, input_ids, args.new_tokens, args.device))
    bare_tps, steered_tps = statistics.median(bare_runs), statistics.median(steered_runs)
    print(f"model: Llama-shaped {args.preset}, {args.dtype}, {args.device}; block {layer} steered")
    print(f"batch {args.batch}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.repeats} runs")
    print(f"bare model      : {bare_tps:10.1f} tokens/s (median; runs {[round(x, 1) for x in bare_runs]})")
    print(f"steering active : {steered_tps:10.1f} tokens/s (median; runs {[round(x, 1) for x in steered_runs]})")
    print(f"ratio steered/bare: {steered_tps / bare_tps:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
