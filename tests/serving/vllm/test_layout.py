"""The plugin stands alone: vLLM's environment has neither peft, trl nor peft-steer (and an older transformers)."""

import ast
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[3] / "serving" / "vllm" / "peft_steer_vllm"
FORBIDDEN = {"peft", "trl", "transformers", "peft_steer", "trl_integration", "accelerate", "datasets"}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_plugin_imports_nothing_of_the_training_stack():
    modules = sorted(PLUGIN.glob("*.py"))
    assert len(modules) >= 8
    for path in modules:
        assert not imported(path) & FORBIDDEN, path.name


def test_vllm_internals_stay_in_the_compat_module():
    """vLLM names are imported in _vllm_compat.py, and where a public entry point needs them (SamplingParams)."""
    for path in sorted(PLUGIN.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "vllm":
                assert path.name == "_vllm_compat.py" or node.module == "vllm", f"{path.name}: {node.module}"


def test_no_module_over_400_lines():
    for path in PLUGIN.glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 400, path.name
