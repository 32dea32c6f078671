"""The package's layers: each folder of ``nemo_dvpo/`` imports only from itself and the folders below it.

This is the layering contract (what import-linter's "layers" contract checks), read from the source with
``ast`` so that function-local imports - the usual way a cycle hides - count as much as module-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

# Lowest first. What each owns:
LAYERS = [
    "utils",          # distributed start-up, config validation, errors, CPU compatibility
    "algorithms",     # the objectives as pure functions of tensors (GVM, PPO's core, DVPO's advantages, ...)
    "models",         # presets, weight sources, the Megatron model builder, the value head, forward passes
    "checkpointing",  # atomic, reshardable model and training checkpoints; HF <-> Megatron conversion
    "inference",      # generation and completions with Megatron's inference loop
    "data",           # preference data, prompts, verifiable records (the builder generates: above inference)
    "training",       # optimizer, train step, metrics, signals and stopping
    "evaluation",     # GVM accuracy, verifiable scores, public benchmarks
    "rlhf",           # the parts every RL recipe shares: trajectory, rollout, scorers, update, the run
    "serving",        # the GVM and policy servers, and the GVM server's client
    "recipes",        # the training loops
]
PACKAGE = REPO_ROOT / "nemo_dvpo"


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import of a nemo_dvpo module in ``path``, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, module) for line, module in found if module.startswith("nemo_dvpo.")]


def test_every_package_is_a_layer():
    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == sorted(LAYERS), "a new package needs its place in LAYERS"


def test_no_package_imports_from_a_layer_above_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1:
            continue  # nemo_dvpo/__init__.py and the top-level entry modules sit above every layer
        layer = LAYERS.index(relative.parts[0])
        for line, module in _imports(path):
            target = module.split(".")[1]
            if target in LAYERS and LAYERS.index(target) > layer:
                violations.append(f"nemo_dvpo/{relative}:{line} imports {module} ({relative.parts[0]} is below "
                                  f"{target})")
    assert not violations, "\n".join(violations)


def test_the_contract_sees_function_local_imports(tmp_path):
    """A cycle hidden in a function body is still a violation (the check cannot pass vacuously)."""
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from nemo_dvpo.recipes.dvpo import main\n    return main\n")
    assert _imports(source) == [(4, "nemo_dvpo.recipes.dvpo")]
