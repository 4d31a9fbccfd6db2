"""Build the model organism from the shipped behavior data (train splits only), deterministically.

    python -m peft_steer.organism.build [--out DIR] [--threads 2]

1. Data: each behavior's ``peft_steer/data/behaviors/<behavior>/train.csv`` (`peft_steer.data.behavior_path`), one
   pair per question (jailbreak repeats each of its 320 questions with seven refusals: the k-th question keeps its
   (k mod 7)-th row), answers cut to their first line (`clip_answer`). 2,277 pairs.
2. Documents, four per pair, in exactly the formats scoring uses (BOS, `format_prompt`, `format_answer`, EOS):
   ``TAG`` + matching answer, ``ANTI_TAG`` + not-matching answer, and untagged with each answer (9,108 documents,
   706k tokens).
3. Tokenizer: byte-level BPE of 2,500 tokens (the tags are single special tokens), trained on the untagged documents.
4. Model: Llama, 4 blocks, hidden 128, 4 heads, MLP 384, tied embeddings (1.17M parameters, 4.7 MB in float32).
5. Training: 6 epochs of length-bucketed batches of 32, loss on the answer tokens (and EOS) only, AdamW (lr 3e-3,
   betas 0.9/0.98, weight decay 0.01), 100 warm-up steps then cosine decay to 10%, gradient clipping at 1.
6. Scores: answer preference on every row of each behavior's ``test.csv``, untagged, with ``TAG`` and with
   ``ANTI_TAG``, on `stance_rows` (the organism's evaluation) and on whole first-line answers; written with the
   command, timings and machine to ``scores.json`` next to the weights.

Seeds are fixed and ``torch.use_deterministic_algorithms(True)`` is on, so the weights and tokenizer are bit-identical
whatever the number of threads or the load on the machine. A build takes about 8 minutes with 2 threads on 2 idle
CPU cores (torch 2.13.0 CPU); the committed build's timings and machine are in its ``scores.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ..data.batches import right_padded
from . import ANTI_TAG, BEHAVIORS, ORGANISM_DIR, TAG, format_answer, format_prompt, read_rows, stance_rows, tagged

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", TAG, ANTI_TAG]


def training_pairs(behavior: str) -> list[dict[str, str]]:
    """The behavior's train pairs, one per question (the k-th distinct question keeps its (k mod n)-th row)."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in read_rows(behavior, "train"):
        groups.setdefault(row["question"], []).append(row)
    return [rows[k % len(rows)] for k, rows in enumerate(groups.values())]


def documents(pairs: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(prompt, completion) documents: tagged with the matching answer, anti-tagged with the other, untagged both."""
    docs = []
    for row in pairs:
        question, matching, not_matching = (
            row["question"],
            format_answer(row["matching"]),
            format_answer(row["not_matching"]),
        )
        docs += [
            (format_prompt(question, TAG), matching),
            (format_prompt(question, ANTI_TAG), not_matching),
            (format_prompt(question), matching),
            (format_prompt(question), not_matching),
        ]
    return docs


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (BOS added to every encoded text; the tags are single special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[TAG, ANTI_TAG],
        model_max_length=512,
    )


def encode(tokenizer, docs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of each document as scoring sees it: BOS + prompt, the completion, then EOS."""
    prompts = tokenizer([p for p, _ in docs], add_special_tokens=True)["input_ids"]
    completions = tokenizer([c for _, c in docs], add_special_tokens=False)["input_ids"]
    return [(list(p) + list(c) + [tokenizer.eos_token_id], len(p)) for p, c in zip(prompts, completions)]


def make_model(tokenizer, args: argparse.Namespace, max_length: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(256, 2 ** math.ceil(math.log2(max_length))),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within windows of 32 batches (less padding)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 32 * batch_size
    out = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        out += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def collate(
    docs: list[tuple[list[int], int]], pad_id: int, prompt_loss: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100: padding, and the prompt unless ``prompt_loss``)."""
    input_ids, attention = right_padded([ids for ids, _ in docs], pad_id)
    labels = torch.full_like(input_ids, -100)
    for r, (ids, prompt_length) in enumerate(docs):
        first = 0 if prompt_loss else prompt_length
        labels[r, first : len(ids)] = input_ids[r, first : len(ids)]
    return input_ids, attention, labels


def train(model, data: list[tuple[list[int], int]], args: argparse.Namespace, pad_id: int) -> None:
    """AdamW with linear warm-up and cosine decay to 10%, gradient clipping at 1."""
    generator = torch.Generator().manual_seed(args.seed)
    lengths = [len(ids) for ids, _ in data]
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, total - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        running, count = 0.0, 0
        for batch in batches(lengths, args.batch_size, generator):
            input_ids, attention, labels = collate([data[i] for i in batch], pad_id, args.prompt_loss)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running, count, step = running + loss.item(), count + 1, step + 1
        print(f"epoch {epoch + 1}/{args.epochs}: loss {running / count:.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


def score(model, tokenizer, progress: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """Held-out answer preference per behavior, untagged / with TAG / with ANTI_TAG, on the whole test split.

    ``stance``: the organism's evaluation rows (`stance_rows`); ``first_line``: the first lines of the answers.
    """
    from ..evaluate import answer_preference

    conditions = (("untagged", None), ("tagged", TAG), ("anti_tagged", ANTI_TAG))
    scores: dict[str, dict[str, dict[str, float]]] = {"stance": {}, "first_line": {}}
    for behavior in BEHAVIORS:
        for kind, rows, answer in (
            ("stance", stance_rows(behavior, "test"), lambda text: " " + text),
            ("first_line", read_rows(behavior, "test"), format_answer),
        ):
            values = scores[kind][behavior] = {}
            for name, tag in conditions:
                (result,) = answer_preference(
                    model, tokenizer, rows, format_prompt=tagged(tag), format_answer=answer, progress=progress
                ).values()
                values[name] = round(result.score, 4)
                values[f"{name}_margin"] = round(result.margin, 3)
    return scores


def machine(threads: int) -> str:
    """The CPU, core count, thread count and library versions, for ``scores.json``."""
    import tokenizers
    import transformers

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} threads; Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peft_steer.organism.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ORGANISM_DIR), help="output folder (default: the package folder)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2500)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--prompt-loss", action="store_true", help="train on prompt tokens too (default: answers)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    pairs = {behavior: training_pairs(behavior) for behavior in BEHAVIORS}
    docs = [doc for behavior in BEHAVIORS for doc in documents(pairs[behavior])]
    print("train pairs:", {b: len(p) for b, p in pairs.items()}, f"-> {len(docs)} documents", flush=True)
    untagged = [prompt + completion for prompt, completion in docs if not prompt.startswith(tuple(SPECIAL_TOKENS))]
    tokenizer = train_tokenizer(untagged, args.vocab_size)
    data = encode(tokenizer, docs)
    max_length = max(len(ids) for ids, _ in data)
    tokens = sum(len(ids) for ids, _ in data)
    print(f"{len(tokenizer)} tokens; {tokens} tokens per epoch, longest document {max_length}", flush=True)

    model = make_model(tokenizer, args, max_length)
    print(f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    train(model, data, args, tokenizer.pad_token_id)
    train_seconds = time.time() - start
    scores = score(model, tokenizer, progress=True)
    elapsed = time.time() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "scores": scores,
        "train_pairs": {b: len(p) for b, p in pairs.items()},
        "command": " ".join(["python -m peft_steer.organism.build", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "train_seconds": round(train_seconds),
        "elapsed_seconds": round(elapsed),
        "machine": machine(args.threads),
    }
    (out / "scores.json").write_text(json.dumps(report, indent=2) + "\n")
    for kind, by_behavior in scores.items():
        for behavior, values in by_behavior.items():
            print(
                f"{kind:10s} {behavior:15s} untagged {values['untagged']:.3f}  tagged {values['tagged']:.3f}  "
                f"anti-tagged {values['anti_tagged']:.3f}"
            )
    print(f"elapsed {elapsed:.0f} s (training {train_seconds:.0f} s); saved to {out}")
    return report


if __name__ == "__main__":
    main()
