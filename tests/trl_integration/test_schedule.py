"""The learning-rate schedule can outlast the training (`schedule_epochs`), as in the official BiPO runs, which stop a
100-epoch cosine schedule at epoch 20, 10 or 5; the paper's presets give both numbers."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import get_cosine_schedule_with_warmup

import trl_integration.cli.train as train_module
from peft_steer import SteeringConfig
from tests.conftest import make_model, make_tokenizer
from tests.trl_integration.conftest import QUESTIONS, bipo_rows, fast_args
from trl_integration import SteerConfig, SteerTrainer
from trl_integration._trl_compat import update_steps_per_epoch
from trl_integration.cli import build_parser, main
from trl_integration.config import paper_preset
from trl_integration.inputs import check_streamed


def _trainer(tmp_path, rows: int = 8, **overrides) -> SteerTrainer:
    return SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list(bipo_rows((QUESTIONS * 2)[:rows])),
        processing_class=make_tokenizer(),
        peft_config=SteeringConfig(layers=[1]),
    )


def _cosine(step: int, warmup: int, total: int) -> float:
    """lr / peak of a linear warm-up then a cosine decay to 0 at ``total`` steps (transformers' "cosine")."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_the_official_runs_stop_a_100_epoch_schedule_at_91_to_99_percent_of_the_peak():
    """Llama-2 power-seeking (642 pairs, 161 steps an epoch), jailbreak (2,240 pairs, 560 steps) and Mistral: the
    official code's 100 warm-up steps and 100-epoch cosine schedule, stopped at the epoch of the shipped vector."""
    for pairs, stop_epoch, expected in ((642, 20, 0.909), (2240, 10, 0.976), (642, 5, 0.995)):
        per_epoch = math.ceil(pairs / 4)
        config = SteerConfig(output_dir="unused", num_train_epochs=stop_epoch, schedule_epochs=100, report_to="none")
        total = config.schedule_steps(per_epoch, stop_epoch * per_epoch)
        assert total == 100 * per_epoch
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
        schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total)
        factor = schedule.lr_lambdas[0](stop_epoch * per_epoch)
        assert factor == pytest.approx(_cosine(stop_epoch * per_epoch, 100, total))
        assert factor == pytest.approx(expected, abs=1e-3)


def test_the_learning_rate_at_the_stop_epoch_is_that_of_the_longer_schedule(tmp_path):
    # 8 pairs, 4 a batch: 2 steps an epoch; 2 epochs of a 10-epoch schedule (20 steps) with 1 warm-up step.
    trainer = _trainer(tmp_path, num_train_epochs=2, schedule_epochs=10, warmup_steps=1, lr_scheduler_type="cosine")
    trainer.train()
    assert trainer.state.global_step == 4  # training stops at num_train_epochs
    peak = trainer.args.learning_rate
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(peak * _cosine(4, 1, 20))
    assert trainer.lr_scheduler.get_last_lr()[0] / peak == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 19)))
    # Without it the schedule ends with the training, at 0.
    plain = _trainer(tmp_path, num_train_epochs=2, warmup_steps=1, lr_scheduler_type="cosine")
    plain.train()
    assert plain.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("rows", "batch", "accumulation", "drop_last"),
    [(8, 4, 1, False), (9, 4, 1, False), (9, 4, 1, True), (9, 2, 2, False), (11, 2, 3, True)],
)
def test_steps_per_epoch_are_the_trainers(tmp_path, rows, batch, accumulation, drop_last):
    trainer = _trainer(
        tmp_path,
        rows=rows,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        dataloader_drop_last=drop_last,
        precompute_ref_log_probs=False,
    )
    counted = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[1]
    assert update_steps_per_epoch(trainer) == counted


def test_a_schedule_shorter_than_the_training_is_refused(tmp_path):
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="schedule_epochs=.* must be a positive number"):
            SteerConfig(output_dir="unused", schedule_epochs=bad, report_to="none")
    with pytest.raises(ValueError, match="shorter than num_train_epochs=5"):
        SteerConfig(output_dir="unused", num_train_epochs=5, schedule_epochs=2, report_to="none")
    # With max_steps the length is known once the data is: 1 epoch of 2 steps < 5 steps.
    trainer = _trainer(tmp_path, max_steps=5, schedule_epochs=1)
    with pytest.raises(ValueError, match="is 2 steps of 2 per epoch, fewer than the 5 training steps"):
        trainer.train()


def test_a_streamed_train_set_has_no_epochs_to_count(tmp_path):
    stream = IterableDataset.from_generator(lambda: iter([{"prompt": "Q?", "chosen": " a", "rejected": " b"}]))
    args = fast_args(tmp_path, max_steps=2, precompute_ref_log_probs=False, schedule_epochs=10)
    with pytest.raises(ValueError, match="an epoch has no length: set schedule_epochs=None"):
        check_streamed(args, stream, None)


def test_paper_presets_give_the_schedule_and_the_epoch_of_the_vector():
    assert paper_preset("meta-llama/Llama-2-7b-chat-hf") == {"layer": 15, "epochs": 20, "schedule_epochs": 100}
    assert paper_preset("meta-llama/Llama-2-7b-chat-hf", "jailbreak")["epochs"] == 10
    assert paper_preset("meta-llama/Llama-2-7b-chat-hf", "wealth-seeking")["epochs"] == 20
    assert paper_preset("/models/Mistral-7B-Instruct-v0.2/", "power-seeking") == {
        "layer": 13,
        "epochs": 5,
        "schedule_epochs": 100,
    }
    assert paper_preset("Qwen/Qwen2-7B-Instruct") is None


def test_the_command_line_takes_the_schedule_and_applies_the_preset(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--schedule_epochs" in capsys.readouterr().out
    parser = build_parser()

    def paper_run(*argv: str) -> tuple[list[int], float, float | None]:
        args = parser.parse_args(["train", *argv])
        args.config_file.apply(args, None)  # the defaults of the options not given, as `peft-steer train` does
        return train_module._layers_and_epochs(args)

    llama, mistral = "meta-llama/Llama-2-7b-chat-hf", "mistralai/Mistral-7B-Instruct-v0.2"
    assert paper_run("--model", llama, "--behavior", "power-seeking") == ([15], 20, 100)
    assert paper_run("--model", llama, "--behavior", "jailbreak") == ([15], 10, 100)
    assert paper_run("--model", mistral, "--behavior", "wealth-seeking") == ([13], 5, 100)
    # Epochs past the paper's schedule: it ends with the training; a length given wins.
    assert paper_run("--model", llama, "--behavior", "power-seeking", "--epochs", "150")[1:] == (150, None)
    assert paper_run("--model", llama, "--behavior", "power-seeking", "--schedule_epochs", "40")[1:] == (20, 40)
    assert paper_run("--model", "x/other", "--behavior", "power-seeking", "--layer", "3") == ([3], 3, None)
