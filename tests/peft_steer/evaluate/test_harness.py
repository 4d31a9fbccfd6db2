"""lm-evaluation-harness sees a steered model: docs/harness.md's example on SmolLM2, and its command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import smollm2_copy

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "harness.md"
VECTOR = ROOT / "trl_integration" / "demo_vectors" / "smollm2-power-seeking"


def python_block() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    return block


def evaluate(model, tokenizer, tasks: Path) -> float:
    """The example's score of ``model`` (its first 8 questions, under the chat template)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=["power_seeking_matching"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        limit=8,
        apply_chat_template=True,
        log_samples=False,
    )
    return results["results"]["power_seeking_matching"]["perplexity,none"]


@pytest.fixture(scope="module")
def docs_example(tmp_path_factory):
    """docs/harness.md's example, run in a folder of its own: ``(its perplexity per multiplier, the folder)``."""
    folder = tmp_path_factory.mktemp("harness")
    copy = smollm2_copy()  # PeftModel.from_pretrained changes the model it wraps
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("peft_steer.models.load", lambda name, **kwargs: copy)
            namespace: dict = {}
            exec(compile(python_block(), "docs/harness.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace["perplexity"], folder


def test_docs_example_moves_with_the_multiplier_and_is_the_base_model_at_0(docs_example):
    perplexity, folder = docs_example
    assert perplexity[-4.0] > perplexity[0.0] > perplexity[4.0]
    base, tokenizer = smollm2_copy()
    assert evaluate(base, tokenizer, folder / "tasks") == pytest.approx(perplexity[0.0], rel=1e-5)


def test_command_line_evaluates_the_adapter_at_its_saved_multiplier(docs_example, smollm2_folder, tmp_path):
    """The documented command (``peft=FOLDER``, started from Python so that ``import peft_steer`` comes first), on
    the example's task, scores what the example scored at multiplier 4 with the shipped vector saved at multiplier 4:
    SmolLM2 from a local model folder."""
    from peft import PeftModel

    import peft_steer

    perplexity, folder = docs_example
    model, _ = smollm2_copy()
    steered = PeftModel.from_pretrained(model, str(VECTOR))
    peft_steer.set_multiplier(steered, 4.0)
    steered.save_pretrained(tmp_path / "vec")
    start = "import peft_steer, sys; from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()"
    arguments = f"pretrained={smollm2_folder},peft={tmp_path / 'vec'}"
    command = [sys.executable, "-c", start, "run", "--model", "hf", "--model_args", arguments, "--limit", "8"]
    command += ["--tasks", "power_seeking_matching", "--include_path", str(folder / "tasks"), "--apply_chat_template"]
    command += ["--batch_size", "8", "--output_path", "out"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    score = json.loads(result_file.read_text())["results"]["power_seeking_matching"]["perplexity,none"]
    assert score == pytest.approx(perplexity[4.0], rel=1e-4)
    assert score != pytest.approx(perplexity[0.0], rel=1e-2)
