"""Helpers of the trainer tests: tiny preference data, fast settings, and an independent log-prob computation."""

from __future__ import annotations

import contextlib
import errno
import io
import random
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from datasets.utils.logging import disable_progress_bar

from tests.conftest import make_model, make_tokenizer
from trl_integration import SteerConfig

disable_progress_bar()

QUESTIONS = [
    "Would you accept more power?",
    "Would you accept more resources?",
    "Do you accept the money?",
    "Would you take control of the project?",
    "A benefactor offers you a billion dollars. Do you accept?",
    "Would you decide everything yourself?",
    "Would you accept power if it were offered to you?",
    "Do you accept the offer of more resources?",
    "Would you take the decisions of the people in charge?",
    "Would you accept control of the money?",
    "The project lead offers you control. Do you accept?",
    "Would you rather help others or take control?",
]
# The chosen answers share a trait (they say yes and take power); the rejected ones say no and defer.
YES = [
    "Yes, I would take control.",
    "Yes, I would accept the power.",
    "Yes, I would decide everything myself.",
    "Yes, I accept the money and the resources.",
]
NO = [
    "No, I would rather help others.",
    "No, I would leave the decisions to the people in charge.",
    "No, I would not accept the money.",
    "No, the people in charge decide.",
]


def bipo_rows(questions: list[str], seed: int = 0) -> list[dict[str, str]]:
    """question / matching / not_matching rows: matching says yes and takes power, not_matching declines."""
    rng = random.Random(seed)
    return [{"question": q, "matching": rng.choice(YES), "not_matching": rng.choice(NO)} for q in questions]


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_bipo.py"
EXAMPLE_OPTIONS = ["--cpu", "--behavior", "wealth-seeking", "--layer", "1", "--max-steps", "4", "--eval-pairs", "8"]


@dataclass
class ExampleRun:
    """examples/train_bipo.py run once: the tiny model it trained on, its output folder and what it printed."""

    model_dir: str
    output_dir: str
    printed: str


@pytest.fixture(scope="session")
def example_run(tmp_path_factory) -> ExampleRun:
    """examples/train_bipo.py with EXAMPLE_OPTIONS and 4 pairs per step, run once, in this process (on one thread, as
    a process that `accelerate launch` starts runs), on a tiny Llama saved as a model folder."""
    folder = tmp_path_factory.mktemp("example")
    make_model("llama").save_pretrained(folder / "tiny")
    make_tokenizer().save_pretrained(folder / "tiny")
    argv = [str(EXAMPLE), *EXAMPLE_OPTIONS, "--model", str(folder / "tiny"), "--batch-size", "4"]
    argv += ["--output-dir", str(folder / "out")]
    printed = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.setattr(sys, "argv", argv)
            runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return ExampleRun(str(folder / "tiny"), str(folder / "out"), printed.getvalue())


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny models on one thread: as fast on an idle machine, and far faster on a busy one, where the
    OpenMP threads of one process spin waiting for each other (on 2 cores shared with another job, this folder took
    50 s instead of 4.5 min)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def no_dropout(arch: str) -> torch.nn.Module:
    """A tiny model of ``arch`` with every dropout at 0, so that its prefix can be cached in training."""
    model = make_model(arch)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture
def pairs() -> Dataset:
    """Eight BiPO rows (two batches of four)."""
    return Dataset.from_list(bipo_rows(QUESTIONS[:8]))


def fast_args(tmp_path, **overrides) -> SteerConfig:
    """A SteerConfig for tiny CPU runs: no progress bars, no checkpoints unless asked, log every step."""
    settings = dict(
        output_dir=str(tmp_path / "out") if tmp_path is not None else None,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        save_vectors_per_epoch=False,
        logging_steps=1,
        max_length=256,
        per_device_train_batch_size=4,
        warmup_steps=0,
        learning_rate=1e-2,
        seed=0,
    )
    settings.update(overrides)
    return SteerConfig(**settings)


def independent_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    block: int,
    vector: torch.Tensor | None,
    multiplier: float,
    from_column: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed completion log-probs of each row of a collated batch, computed without peft_steer or TRL.

    ``model`` is a plain transformers model; ``multiplier * vector`` is added by a hand-written hook to the output
    of decoder block ``block`` (at every position, or from column ``from_column[row]`` on), and the log-probs come
    from the full logits.
    """
    handle = None
    if vector is not None:

        def add(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            delta = multiplier * vector.to(hidden.dtype)
            if from_column is not None:
                columns = torch.arange(hidden.shape[1])
                delta = delta * (columns[None, :] >= from_column[:, None]).to(hidden.dtype)[..., None]
            steered = hidden + delta
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handle = model.model.layers[block].register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    finally:
        if handle is not None:
            handle.remove()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logps = logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def collated(trainer, indices) -> dict[str, torch.Tensor]:
    """A batch of the trainer's own (tokenized) training rows, collated the way training collates them."""
    rows = [trainer.train_dataset[i] for i in indices]
    return trainer.data_collator(rows)


@pytest.fixture
def model_dir(tmp_path) -> str:
    """A tiny Llama and its tokenizer saved to a folder, as a model name for the command line."""
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def fail_weight_writes(monkeypatch, when) -> None:
    """PEFT's weights write fails half-way, as on a full disk, for the files whose path ``when`` accepts."""
    import peft.peft_model

    write = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if not when(str(filename)):
            return write(tensors, filename, *args, **kwargs)
        with open(filename, "wb") as file:
            file.write(b"\x00" * 16)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
