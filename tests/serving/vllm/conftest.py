"""Fixtures of the vLLM plugin's tests: vLLM's own environment, the served folders, and the transformers reference.

vLLM pins a transformers older than peft-steer's, so it runs in an environment of its own (``.venv-vllm``, made by
``serving/vllm/install.sh``, part of the README's install; ``PEFT_STEER_VLLM_PYTHON`` names another interpreter).
These tests run in peft-steer's environment: they start vLLM there (one offline engine and one server per session),
and compare what it generates with the project's own `PeftModel` at the same multiplier.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.conftest import _smollm2, smollm2_copy

REPO = Path(__file__).resolve().parents[3]
SERVING_DOC = REPO / "docs" / "serving.md"
PROBE_BLOCK = 10  # the second adapter's block; positions="completion"


def vllm_python() -> Path:
    """vLLM's interpreter; the tests skip without it here, and fail without it in CI (the install makes it)."""
    path = Path(os.environ.get("PEFT_STEER_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not path.exists():
        reason = f"{path} does not exist: run `bash serving/vllm/install.sh` (vLLM in an environment of its own)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def doc_block(marker: str, fence: str = "python") -> str:
    """The block of docs/serving.md whose first line starts with ``marker``."""
    blocks = re.findall(rf"```{fence}\n(.*?)```", SERVING_DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = [block for block in blocks if block.startswith(marker)]
    assert len(found) == 1, f"docs/serving.md has {len(found)} {fence} blocks starting with {marker!r}"
    return found[0]


def ask(prompt: list[int], steering: str | None, max_tokens: int, salted: bool = True) -> dict:
    """One request of an `offline_engine.py` job (greedy, with the log-prob of each generated token)."""
    return {"prompt_token_ids": prompt, "steering": steering, "max_tokens": max_tokens, "salted": salted}


# The offline engine's core runs in the job's own process: one process and one `import vllm` less per engine
# (about 15 s each here). The server (test_server.py) runs vLLM's usual separate engine-core process.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_engine(job: dict, cwd: Path, work: Path) -> dict:
    """Run ``offline_engine.py`` on ``job`` in vLLM's environment; its output, or a failure with the log's end."""
    (work / "job.json").write_text(json.dumps(job))
    script = Path(__file__).with_name("offline_engine.py")
    log = work / "engine.log"
    with open(log, "w") as out:
        result = subprocess.run(
            [str(vllm_python()), str(script), str(work / "job.json"), str(work / "out.json")],
            cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=900,
            env={**os.environ, **ENGINE_ENV},
        )  # fmt: skip
    assert result.returncode == 0, f"the vLLM engine failed:\n{log.read_text()[-4000:]}"
    return json.loads((work / "out.json").read_text())


@contextmanager
def _cached_smollm2():
    """``peft_steer.models.load`` answering ``"smollm2"`` with the session's copy (one SmolLM2 load per session)."""
    loaded = _smollm2()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("peft_steer.models.load", lambda name, **kwargs: loaded)
        yield


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Path:
    """A folder as docs/serving.md makes it (``smollm2-hf``, ``power-seeking``), plus ``probe``, a second adapter
    (a random vector at block 10 with positions="completion"), and ``power.gguf``, the power-seeking vector exported
    for llama.cpp."""
    from peft_steer.interop import export_gguf, write_adapter

    folder = tmp_path_factory.mktemp("served")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with _cached_smollm2():
            exec(compile(doc_block("# In peft-steer's environment: SmolLM2"), "docs/serving.md", "exec"), {})
    finally:
        os.chdir(cwd)
    model, _ = _smollm2()
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    write_adapter(folder / "probe", {PROBE_BLOCK: 16 * vector / vector.norm()}, model, positions="completion")
    export_gguf(folder / "power-seeking", folder / "power.gguf")
    return folder


class Reference:
    """The project's `PeftModel` with the served adapters: what vLLM must match at the same multipliers.

    ``adapters`` maps each adapter name to its folder; ``aliases`` maps names vLLM serves from another file (a
    ``.gguf`` export) to the adapter they equal.
    """

    def __init__(self, model, tokenizer, adapters: dict[str, Path], aliases: dict[str, str] | None = None) -> None:
        from peft import PeftModel

        self.tokenizer, self.aliases = tokenizer, aliases or {}
        (first, path), *others = adapters.items()
        self.model = PeftModel.from_pretrained(model, str(path), adapter_name=first).eval()
        for name, path in others:
            self.model.load_adapter(str(path), adapter_name=name)
        self.first = first

    def steered(self, steering: str):
        """The contexts that steer the model as ``steering`` (``"NAME:MULTIPLIER,..."``) asks."""
        import contextlib

        import peft_steer

        terms = {self.aliases.get(n, n): float(m) for n, m in (item.split(":") for item in steering.split(",") if item)}
        active = list(terms) or [self.first]
        self.model.base_model.set_adapter(active)
        stack = contextlib.ExitStack()
        for name in active:
            stack.enter_context(peft_steer.steering(self.model, terms.get(name, 0.0), adapter_name=name))
        return stack

    @torch.no_grad()
    def score(self, prompt: list[int], steering: str, tokens: list[int]) -> tuple[list[int], list[float]]:
        """``(greedy token, log-prob of the given token)`` at each of ``tokens``' positions, teacher-forced."""
        import peft_steer

        ids = torch.tensor([prompt + tokens])
        with self.steered(steering), peft_steer.prompt_lengths(self.model, torch.tensor([len(prompt)])):
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        log_probs = logits.log_softmax(-1)
        return log_probs.argmax(-1).tolist(), log_probs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()

    @torch.no_grad()
    def generate(self, prompt: list[int], steering: str, max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        with self.steered(steering):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def reference(served) -> Reference:
    model, tokenizer = smollm2_copy()
    adapters = {name: served / name for name in ("power-seeking", "probe")}
    return Reference(model, tokenizer, adapters, aliases={"power-gguf": "power-seeking"})
