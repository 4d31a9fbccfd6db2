"""BiPO training speed and memory, side by side in one run on the same model, data, seed and dtype.

    python benchmarks/train_speed.py                      # CPU: both presets below, then where each target stands
    python benchmarks/train_speed.py --model smollm2      # a real model: SmolLM2-135M-Instruct (offline GGUF)
    python benchmarks/train_speed.py --model PATH_OR_ID   # a model folder, a .gguf file in its folder, or a hub id
    python benchmarks/train_speed.py --preset cpu         # one preset only
    python benchmarks/train_speed.py --preset llama-2-7b --dtype bfloat16 --device cuda   # on an accelerator

  a. the official-style loop: TRL's DPOTrainer with a separate full reference model (a second copy) and a learnable
     vector on block L; policy and reference forward at every step (the direction d is applied by swapping chosen
     and rejected and steering with d * v, which is the BiPO loss);
  b. SteerTrainer with both caches off (reference forward at every step, whole model every step);
  c. SteerTrainer with its defaults (reference log-probs once, prefix-activation cache, blocks 0..L offloaded while
     training: to host memory from an accelerator, to a temporary file from the CPU);
  ideal. one forward + backward through blocks L+1..N on every position and the LM head on the completion positions
     only (the positions whose log-probs the loss needs), on the same tokens, nothing else: the limit of a step.

Presets are Llama-shaped models with random weights (timing only) and a byte-level BPE tokenizer trained on the data,
in the plain "Question: ...\\nAnswer:" format. The default command runs two: "cpu" (hidden 256, 4 pairs a step),
where the activations that the backward keeps outweigh the weights, for the speed targets; and "cpu-wide" (hidden
1024, 1.6 GB of fp32 weights, 1 pair a step), where the weights dominate, as on a 7B model, for the memory target.
``--model`` loads a real causal LM (`peft_steer.models.load_model`) and formats the shipped pairs with its chat
template (`peft_steer.data.load_behavior`).

Each variant runs in its own process (so that peak memory is its own) on the same pairs, for the same steps.
Reported: pairs/s of the training loop (from the Trainer's `on_train_begin` to its `on_train_end`), c's one-time work
(the precompute, and in `train()` the offload and restore around the loop), peak memory from the loaded model on
(accelerator: max allocated; CPU: peak RSS, reset once the model is loaded, above the process's RSS before it was
loaded, which also counts the allocator's and libraries' own), the model state held during training (its models'
tensors plus the prefix cache, the largest at the end of a step), the ratios c/a and c/b, c's step time as a
multiple of the ideal's, and the largest relative difference between the vectors trained by a, b and c. Targets:
c/a >= 3, c's step <= 1.15x the ideal, peak memory c/a <= 0.55 where the weights dominate the activations.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
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
# pairs per step, steps, training pairs: the settings of each run unless given on the command line
RUN_SIZES = {
    "cpu": dict(batch=4, steps=10, pairs=40),
    "cpu-wide": dict(batch=1, steps=6, pairs=12),
    "llama-2-7b": dict(batch=4, steps=20, pairs=80),
    "model": dict(batch=4, steps=10, pairs=40),
}
DEFAULT_RUNS = ("cpu", "cpu-wide")  # speed where the activations dominate, memory where the weights do
VARIANTS = ("a", "b", "c", "ideal")
NAMES = {
    "a": "a. DPOTrainer + full reference copy",
    "b": "b. SteerTrainer, caches off",
    "c": "c. SteerTrainer, defaults",
    "ideal": "ideal: blocks L+1..N, head on completions",
}
TARGETS = {"c/a": 3.0, "c/ideal": 1.15, "memory": 0.55}
MIB = 2**20


# ---- memory ------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory from the loaded model on: on an accelerator its max allocated bytes, on the CPU the peak RSS
    (reset after loading, so that a loader's temporary copies, e.g. dequantizing a GGUF file, do not count) above
    the RSS before the model was loaded."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.before = rss_bytes()

    def model_loaded(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass  # the peak then counts from the process's start (ru_maxrss)

    def peak_bytes(self) -> int:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as file:
            match = re.search(r"VmHWM:\s+(\d+) kB", file.read())
        peak_kib = int(match.group(1)) if match else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak_kib * 1024 - self.before


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
    import torch
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

    return Probe()


# ---- model and data ----------------------------------------------------------------------------------------------


def preset_model(options: dict):
    """A random Llama-shaped model of the preset, a BPE tokenizer trained on the pairs, and the pairs in the plain
    format."""
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from peft_steer.data import plain_prompt, read_behavior_rows

    preset = dict(PRESETS[options["preset"]])
    vocab = preset.pop("vocab")
    rows = read_behavior_rows("power-seeking", "train")[: options["pairs"]]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [r["question"] + " " + r["matching"] + " " + r["not_matching"] for r in rows]
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=special))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    pairs = [
        {"prompt": plain_prompt(r["question"]), "chosen": " " + r["matching"], "rejected": " " + r["not_matching"]}
        for r in rows
    ]
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=0, **preset)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, options["dtype"]))
    return base.to(options["device"]), tokenizer, Dataset.from_list(pairs)


def real_model(options: dict):
    """A real causal LM (folder, .gguf file, hub id, or "smollm2"), its tokenizer, and the shipped power-seeking pairs
    formatted with its chat template."""
    import torch

    from peft_steer.data import load_behavior
    from peft_steer.models import load_model, load_tokenizer

    base = load_model(options["model"], dtype=getattr(torch, options["dtype"]))
    tokenizer = load_tokenizer(options["model"])
    data = load_behavior("power-seeking", "train", tokenizer)
    return base.to(options["device"]), tokenizer, data.select(range(min(options["pairs"], len(data))))


def training_args(options: dict) -> dict:
    """The settings every variant shares."""
    return dict(
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
        use_cpu=options["device"] == "cpu",
        bf16=False,
    )


def official_style_trainer(model, base, data, tokenizer, options):
    """Variant a: TRL's DPO loss with d applied the BiPO way (d = -1 swaps chosen and rejected and steers with -v),
    against a second full copy of the model as the reference."""
    import torch
    from trl import DPOConfig, DPOTrainer

    import peft_steer
    from trl_integration.loss import sample_direction

    class OfficialStyle(DPOTrainer):
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

    reference = copy.deepcopy(base).eval()  # the second full copy the official code keeps
    args = DPOConfig(**training_args(options))
    trainer = OfficialStyle(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    return trainer, reference


# ---- one variant -------------------------------------------------------------------------------------------------


def run_ideal(trainer, model, options: dict) -> dict:
    """The ideal step: the prefix replayed from a cache, blocks L+1..N forward and backward on every position, the
    LM head (the model's own, through transformers' ``logits_to_keep``) on the completion positions only."""
    import torch

    from trl_integration.prefix_cache import PrefixCache

    device, rows = options["device"], options["batch"]
    cache = PrefixCache(model.get_base_model(), options["layer"], "device" if device == "cuda" else "cpu")
    dataset = trainer.train_dataset
    steps = [[dataset[(s * rows + i) % len(dataset)] for i in range(rows)] for s in range(options["steps"])]
    batches = [{k: v.to(device) for k, v in trainer.data_collator(step).items()} for step in steps]
    for batch in batches:
        cache.fill(batch["input_ids"], batch["attention_mask"], model.disable_adapter())
    vector = model.base_model.steering_vectors["default"][str(options["layer"])]
    start = time.perf_counter()
    for batch in batches:
        scored = batch["completion_mask"][:, 1:] != 0  # column t predicts the token of column t + 1
        keep = torch.nn.functional.pad(scored, (0, 1))
        with cache.replay(batch["input_ids"], batch["attention_mask"]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
        targets = batch["input_ids"][:, 1:][scored]
        log_probs = torch.log_softmax(logits.logits.float(), dim=-1).gather(-1, targets[:, None]).sum()
        log_probs.backward()
        vector.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    return {"train_seconds": time.perf_counter() - start, "held_bytes": held_bytes(model, None, cache)}


def run_training(variant: str, trainer, model, reference, options: dict) -> dict:
    """Variants a, b and c: `trainer.train()`, its loop timed by `training_loop_probe`."""
    import torch

    import peft_steer

    probe = training_loop_probe(model, reference, getattr(trainer, "_prefix_cache", None))
    trainer.add_callback(probe)
    start = time.perf_counter()
    trainer.train()
    if options["device"] == "cuda":
        torch.cuda.synchronize()
    seconds = probe.end - probe.begin
    return {
        "train_seconds": seconds,
        "around_loop_seconds": time.perf_counter() - start - seconds,
        "held_bytes": max(probe.held),
        "vector": peft_steer.get_vectors(model)[options["layer"]].tolist(),
    }


def run_variant(variant: str, options: dict) -> dict:
    """Train with one variant (in this process) and return its figures."""
    import torch
    from peft import get_peft_model

    from peft_steer import SteeringConfig
    from trl_integration import SteerConfig, SteerTrainer

    torch.set_num_threads(options["threads"])
    memory = PeakMemory(options["device"])
    base, tokenizer, data = real_model(options) if options["model"] else preset_model(options)
    weights = held_bytes(base, None, None)
    memory.model_loaded()
    model = get_peft_model(base, SteeringConfig(layers=[options["layer"]]))
    reference = None
    start = time.perf_counter()
    if variant == "a":
        trainer, reference = official_style_trainer(model, base, data, tokenizer, options)
    else:  # the ideal builds its own prefix cache: its trainer only tokenizes and collates
        extra = {} if variant == "c" else dict(prefix_cache="off", precompute_ref_log_probs=False)
        args = SteerConfig(**training_args(options), **extra)
        trainer = SteerTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    setup = time.perf_counter() - start
    if variant == "ideal":
        result = run_ideal(trainer, model, options)
    else:
        result = run_training(variant, trainer, model, reference, options)
    result["setup_seconds"] = setup
    result["pairs_per_second"] = options["steps"] * options["batch"] / result["train_seconds"]
    result["peak_bytes"] = memory.peak_bytes()
    result["weight_bytes"] = weights
    result["blocks"] = base.config.num_hidden_layers
    return result


# ---- a run: the four variants, and its report --------------------------------------------------------------------


def run_all(options: dict) -> dict[str, dict]:
    """Each variant in its own process, on the same options."""
    results = {}
    for variant in VARIANTS:
        child = json.dumps({**options, "variant": variant})
        output = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True)
        if output.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{output.stderr[-4000:]}")
        results[variant] = json.loads(output.stdout.strip().splitlines()[-1])
    return results


def vector_differences(results: dict[str, dict]) -> dict[str, float]:
    """The largest difference between the vectors trained by a, b and c, relative to the largest entry."""
    import torch

    vectors = {v: torch.tensor(results[v]["vector"]) for v in ("a", "b", "c")}
    scale = max(float(v.abs().max()) for v in vectors.values())
    pairs = (("a", "b"), ("a", "c"), ("b", "c"))
    return {f"{x} vs {y}": float((vectors[x] - vectors[y]).abs().max()) / scale for x, y in pairs}


def memory_verdict(results: dict[str, dict]) -> tuple[float, bool, str]:
    """Peak memory c/a, whether the target applies, and why.

    c's peak is about max(W + C, W (N - L - 1) / N + A + C) against 2W + A for a (W the weights, A the activations
    that the backward through blocks L+1..N keeps, the same in a, b and c since in all three the vector enters at block
    L; C the prefix cache): c/a falls well below 0.55 only where W dominates A. A is measured as the ideal's peak
    minus its model state.
    """
    ratio = results["c"]["peak_bytes"] / results["a"]["peak_bytes"]
    weights = results["c"]["weight_bytes"]
    activations = max(results["ideal"]["peak_bytes"] - results["ideal"]["held_bytes"], 0)
    sizes = f"weights {weights / MIB:.0f} MiB, activations about {activations / MIB:.0f} MiB"
    if weights >= activations:
        return ratio, True, f"the weights dominate ({sizes})"
    why = (
        f"the activations dominate ({sizes}): a, b and c all keep them for the backward through blocks L+1..N, and "
        "only recomputing them (activation_checkpointing=True, one more forward a step) would lower them"
    )
    return ratio, False, why


def verdict(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return f"target {'<=' if at_most else '>='} {target:g}: {'met' if met else 'NOT met'}"


def print_table(results: dict[str, dict], options: dict) -> None:
    source = f"model {options['model']}" if options["model"] else f"Llama-shaped '{options['preset']}' preset"
    print(
        f"\n{source}, {options['dtype']}, {options['device']}; steering block {options['layer']} of "
        f"{results['c']['blocks']}; {options['steps']} steps of {options['batch']} pairs; {options['threads']} threads"
    )
    print(f"{'variant':<44}{'pairs/s':>10}{'s/step':>10}{'peak MiB':>10}{'held MiB':>10}")
    for v in VARIANTS:
        r = results[v]
        step = r["train_seconds"] / options["steps"]
        print(f"{NAMES[v]:<44}{r['pairs_per_second']:>10.2f}{step:>10.3f}{r['peak_bytes'] / MIB:>10.0f}", end="")
        print(f"{r['held_bytes'] / MIB:>10.0f}")


def report(results: dict[str, dict], options: dict) -> dict[str, float]:
    """Print a run's table and ratios; return the ratios."""
    print_table(results, options)
    speed = {v: results[v]["pairs_per_second"] for v in VARIANTS}
    ratios = {"c/a": speed["c"] / speed["a"], "c/b": speed["c"] / speed["b"], "c/ideal": speed["ideal"] / speed["c"]}
    c = results["c"]
    print(
        f"c's one-time work: precompute (reference log-probs + prefix cache, {options['pairs']} pairs) "
        f"{c['setup_seconds']:.1f} s; in train() around the loop (offload and restore of blocks 0..{options['layer']}) "
        f"{c['around_loop_seconds']:.1f} s, against {results['a']['around_loop_seconds']:.1f} s for a"
    )
    print(f"ratio c/a pairs/s: {ratios['c/a']:.2f}x ({verdict(ratios['c/a'], TARGETS['c/a'], False)})")
    print(f"ratio c/b pairs/s: {ratios['c/b']:.2f}x")
    print(f"c step / ideal step: {ratios['c/ideal']:.2f} ({verdict(ratios['c/ideal'], TARGETS['c/ideal'], True)})")
    ratios["memory"], applies, why = memory_verdict(results)
    target = verdict(ratios["memory"], TARGETS["memory"], True) if applies else "no target here"
    print(f"peak memory c/a: {ratios['memory']:.2f} ({target}; {why})")
    print(f"model state held c/a (models + prefix cache): {c['held_bytes'] / results['a']['held_bytes']:.2f}")
    differences = ", ".join(f"{k} {d:.1e}" for k, d in vector_differences(results).items())
    print(f"largest vector difference (relative to the largest entry): {differences} (target <= 1e-4)")
    return {**ratios, "memory_applies": applies}


def summary(ratios: dict[str, dict]) -> None:
    """Where each target stands over the runs of the default command."""
    print("\nWhere the targets stand:")
    for run, r in ratios.items():
        speed = f"c/a {r['c/a']:.2f}x ({verdict(r['c/a'], TARGETS['c/a'], False)}), c step / ideal {r['c/ideal']:.2f}"
        print(f"  {run}: {speed} ({verdict(r['c/ideal'], TARGETS['c/ideal'], True)})")
        memory = (
            verdict(r["memory"], TARGETS["memory"], True) if r["memory_applies"] else "no target: activations dominate"
        )
        print(f"  {run}: peak memory c/a {r['memory']:.2f} ({memory})")


# ---- command line ------------------------------------------------------------------------------------------------


def parse_options() -> tuple[list[dict], bool]:
    """The runs the command asks for, and whether it is the default (both presets)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="One preset (default: cpu, cpu-wide).")
    parser.add_argument("--model", default=None, help='A model folder, a .gguf file, a hub id, or "smollm2".')
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--layer", type=int, default=None, help="Steered block (default: N // 2 - 1).")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="Pairs per step.")
    parser.add_argument("--pairs", type=int, default=None, help="Training pairs (power-seeking train split).")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.model and args.preset:
        parser.error("--model and --preset exclude each other")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = [args.preset] if args.preset else ["model"] if args.model else list(DEFAULT_RUNS)
    chosen = {k: getattr(args, k) for k in ("steps", "batch", "pairs") if getattr(args, k) is not None}
    options = [{**vars(args), **RUN_SIZES[run], **chosen, "preset": None if run == "model" else run} for run in runs]
    for run in options:
        run["layer"] = args.layer if args.layer is not None else blocks_of(run) // 2 - 1
    return options, len(runs) > 1


def blocks_of(options: dict) -> int:
    if not options["model"]:
        return PRESETS[options["preset"]]["num_hidden_layers"]
    from peft_steer.models import load_config

    return load_config(options["model"]).num_hidden_layers


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # one variant, in its own process
        options = json.loads(sys.argv[2])
        print(json.dumps(run_variant(options["variant"], options)))
        return
    runs, default = parse_options()
    ratios = {}
    for options in runs:
        ratios[options["model"] or options["preset"]] = report(run_all(options), options)
    if default:
        summary(ratios)


if __name__ == "__main__":
    main()
