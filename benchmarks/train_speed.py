"""BiPO training speed and memory, side by side in one run on the same model, data, seed and dtype.

    python benchmarks/train_speed.py                      # CPU: Llama-shaped, 32 blocks, hidden 256, block 15
    python benchmarks/train_speed.py --preset llama-2-7b --dtype bfloat16 --steps 20   # on an accelerator
    python benchmarks/train_speed.py --preset cpu-wide --batch 1 --steps 6 --pairs 12  # memory, weights dominating

  a. the official-style loop: TRL's DPOTrainer with a separate full reference model (a second copy) and a learnable
     vector on block L; policy and reference forward at every step (the direction d is applied by swapping chosen
     and rejected and steering with d * v, which is the BiPO loss);
  b. SteerTrainer with both caches off (reference forward at every step, whole model every step);
  c. SteerTrainer with its defaults (reference log-probs once, prefix-activation cache, blocks 0..L offloaded while
     training: to host memory from an accelerator, to a temporary file from the CPU);
  ideal. one forward + backward through blocks L+1..N, the norm and the head on the same tokens, nothing else.

Each runs in its own process (so that peak memory is its own) on the same pairs, for the same steps. Reported:
pairs/s of the training loop (from the Trainer's `on_train_begin` to its `on_train_end`), c's one-time work (the
precompute, and in `train()` the offload and restore around the loop), peak memory over the whole run (accelerator:
max allocated; CPU: peak RSS above the process's RSS before the model was built, which also counts the allocator's
and libraries' own), the model state held during training (its models' tensors plus the prefix cache, the largest at
the end of a step), the ratios c/a and c/b, c's step time as a multiple of the ideal, and the largest relative
difference between the vectors trained by a, b and c. Random weights: timing only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PRESETS = {
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=32, num_attention_heads=4, vocab=2000),
    # 1.6 GB of fp32 weights: with --batch 1 the weights, not the activations, dominate memory, as on a 7B model
    "cpu-wide": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=8, vocab=2000),
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab=32000
    ),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_bytes(model, reference, cache) -> int:
    """The model state a run holds: every distinct tensor of its models, plus the prefix cache."""
    held = {}
    for holder in (model, reference):
        for tensor in list(holder.parameters()) + list(holder.buffers()) if holder is not None else []:
            held[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(held.values()) + (cache.nbytes if cache is not None else 0)


def training_loop_probe(model, reference, cache):
    """A callback that times the training loop (from its first step to its last) and measures `held_bytes` at the end
    of each step. The loop excludes `train()`'s one-time work around it, such as c's offload and restore of blocks
    0..L, which is reported on its own."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.held: list[int] = []
            self.begin = self.end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.held.append(held_bytes(model, reference, cache))

        def on_train_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.end = time.perf_counter()

    import torch

    return Probe()


def run_variant(variant: str, options: dict) -> dict:
    """Train with one variant (in this process) and return its figures."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from trl import DPOConfig, DPOTrainer

    import peft_steer
    from peft_steer import SteeringConfig
    from peft_steer.data import plain_prompt, read_behavior_rows
    from trl_integration import SteerConfig, SteerTrainer
    from trl_integration.trainer import sample_direction

    torch.set_num_threads(options["threads"])
    device = options["device"]
    dtype = getattr(torch, options["dtype"])
    preset = dict(PRESETS[options["preset"]])
    vocab = preset.pop("vocab")
    rows = read_behavior_rows("power-seeking", "train")[: options["pairs"]]

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [r["question"] + " " + r["matching"] + " " + r["not_matching"] for r in rows]
    bpe.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    data = Dataset.from_list(
        [
            {
                "prompt": plain_prompt(r["question"]),
                "chosen": " " + r["matching"],
                "rejected": " " + r["not_matching"],
            }
            for r in rows
        ]
    )

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_bytes()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=0, **preset)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    layer = options["layer"]
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=options["batch"],
        max_steps=options["steps"],
        learning_rate=5e-4,
        warmup_steps=0,
        lr_scheduler_type="cosine",
        weight_decay=0.05,
        beta=0.1,
        seed=0,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        max_length=256,
        use_cpu=device == "cpu",
        bf16=False,
    )
    model = get_peft_model(base, SteeringConfig(layers=[layer]))

    if variant == "a":

        class OfficialStyle(DPOTrainer):
            """TRL's DPO loss with d applied the BiPO way: d = -1 swaps chosen and rejected and steers with -v."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                d = sample_direction(self.args.seed, self.state.global_step)
                if d < 0:
                    half = inputs["input_ids"].shape[0] // 2
                    inputs = {
                        k: torch.cat([v[half:], v[:half]]) if torch.is_tensor(v) and v.shape[0] == 2 * half else v
                        for k, v in inputs.items()
                    }
                with peft_steer.steering(self.accelerator.unwrap_model(model), multiplier=d):
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        reference = copy.deepcopy(base)  # the second full copy the official code keeps
        reference.eval()
        trainer = OfficialStyle(
            model=model, ref_model=reference, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer
        )
    else:
        extra = dict(prefix_cache="off", precompute_ref_log_probs=False) if variant == "b" else {}
        start = time.perf_counter()
        trainer = SteerTrainer(
            model=model, args=SteerConfig(**common, **extra), train_dataset=data, processing_class=tokenizer
        )
        setup = time.perf_counter() - start

    if variant == "ideal":
        import trl_integration.prefix_cache as prefix

        cache = prefix.PrefixCache(model.get_base_model(), layer, "device" if device == "cuda" else "cpu")
        batches = [
            trainer.data_collator(
                [
                    trainer.train_dataset[(s * options["batch"] + i) % len(trainer.train_dataset)]
                    for i in range(options["batch"])
                ]
            )
            for s in range(options["steps"])
        ]
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            cache.fill(batch["input_ids"], batch["attention_mask"], model.disable_adapter())
        vector = model.base_model.steering_vectors["default"][str(layer)]
        start = time.perf_counter()
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with cache.replay(batch["input_ids"], batch["attention_mask"]):
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            out.loss.backward()
            vector.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        result = {"train_seconds": elapsed}
    else:
        probe = training_loop_probe(
            model, reference if variant == "a" else None, getattr(trainer, "_prefix_cache", None)
        )
        trainer.add_callback(probe)
        start = time.perf_counter()
        trainer.train()
        if device == "cuda":
            torch.cuda.synchronize()
        result = {"train_seconds": probe.end - probe.begin}
        result["around_loop_seconds"] = time.perf_counter() - start - result["train_seconds"]
        if variant == "c":
            result["setup_seconds"] = setup
        result["vector"] = peft_steer.get_vectors(model)[layer].tolist()
    result["pairs_per_second"] = options["steps"] * options["batch"] / result["train_seconds"]
    result["held_bytes"] = max(probe.held) if variant != "ideal" else held_bytes(model, None, cache)
    if device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_bytes"] = peak_kib * 1024 - rss_before
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=80, help="Training pairs (power-seeking train split).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    options = vars(args)

    if args.variant:
        print(json.dumps(run_variant(args.variant, options)))
        return

    results = {}
    for variant in ("a", "b", "c", "ideal"):
        command = [sys.executable, __file__, *sys.argv[1:], "--device", args.device, "--variant", variant]
        output = subprocess.run(command, capture_output=True, text=True)
        if output.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{output.stderr[-4000:]}")
        results[variant] = json.loads(output.stdout.strip().splitlines()[-1])

    import torch

    vectors = {v: torch.tensor(results[v]["vector"]) for v in ("a", "b", "c")}
    scale = max(float(v.abs().max()) for v in vectors.values())
    differences = {
        f"{x} vs {y}": float((vectors[x] - vectors[y]).abs().max()) / scale
        for x, y in (("a", "b"), ("a", "c"), ("b", "c"))
    }
    step = {v: results[v]["train_seconds"] / args.steps for v in results}
    mib = 2**20
    print(
        f"Llama-shaped '{args.preset}' preset, {args.dtype}, {args.device}; steering block {args.layer}; "
        f"{args.steps} steps of {args.batch} pairs; {args.threads} threads"
    )
    print(f"{'variant':<44}{'pairs/s':>10}{'s/step':>10}{'peak MiB':>10}{'held MiB':>10}")
    names = {
        "a": "a. DPOTrainer + full reference copy",
        "b": "b. SteerTrainer, caches off",
        "c": "c. SteerTrainer, defaults",
        "ideal": "ideal: fwd+bwd blocks L+1..N only",
    }
    for v in ("a", "b", "c", "ideal"):
        figures = f"{results[v]['pairs_per_second']:>10.2f}{step[v]:>10.3f}{results[v]['peak_bytes'] / mib:>10.0f}"
        figures += f"{results[v]['held_bytes'] / mib:>10.0f}"
        print(f"{names[v]:<44}{figures}")
    around = {v: results[v]["around_loop_seconds"] for v in ("a", "c")}
    print(
        f"c's one-time work: precompute (reference log-probs + prefix cache, {args.pairs} pairs) "
        f"{results['c']['setup_seconds']:.1f} s; in train() around the loop (offload and restore of blocks "
        f"0..{args.layer}) {around['c']:.1f} s, against {around['a']:.1f} s for a"
    )
    print(
        f"ratio c/a pairs/s: {results['c']['pairs_per_second'] / results['a']['pairs_per_second']:.2f}x (target >= 2.2)"
    )
    print(f"ratio c/b pairs/s: {results['c']['pairs_per_second'] / results['b']['pairs_per_second']:.2f}x")
    print(f"c step / ideal step: {step['c'] / step['ideal']:.2f} (target <= 1.2)")
    print(f"peak memory c/a: {results['c']['peak_bytes'] / results['a']['peak_bytes']:.2f} (target <= 0.55)")
    print(
        f"model state held c/a (models + prefix cache): {results['c']['held_bytes'] / results['a']['held_bytes']:.2f}"
    )
    print(
        "largest vector difference (relative to the largest entry): "
        + ", ".join(f"{k} {d:.1e}" for k, d in differences.items())
        + " (target <= 1e-4)"
    )


if __name__ == "__main__":
    main()
