"""The docs say what the code does: the configuration reference is current, and every command in README.md or
docs/*.md (code blocks and inline code) names a script that exists, flags it accepts and settings its config has."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"^(?:\./)?((?:examples|tools|benchmarks|\.ci)/[\w/.-]+|setup\.sh)$")
OVERRIDE = re.compile(r"^[+~]{0,2}([A-Za-z_][\w.]*)=")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", "<"}


@lru_cache(maxsize=None)
def _tool():
    spec = importlib.util.spec_from_file_location("config_reference_tool", REPO_ROOT / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the configuration reference --------------------------------------------------------------------------------

def test_configuration_reference_is_current():
    completed = subprocess.run([sys.executable, "tools/config_reference.py", "--check"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]


def test_each_entry_point_is_in_the_reference():
    documented = {script for script, *_ in _tool().ENTRY_POINTS}
    hydra_apps = {f"examples/{path.name}" for path in (REPO_ROOT / "examples").glob("*.py")
                  if "@hydra.main" in path.read_text()}
    assert hydra_apps == documented


def test_field_comments_are_read_as_written(tmp_path, monkeypatch):
    """The reference's reading of comments: the block above a field, a trailing one, a base class's kept by a
    subclass that redefines the field without one; a field with none is reported, not given a neighbour's."""
    from nemo_dvpo.utils.config_reference import field_comments, settings_of, undocumented

    (tmp_path / "example_config.py").write_text(_EXAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("example_config")
    base, child = module.Base, module.Child
    assert field_comments(base) == {"steps": "Optimizer steps of the run, over two lines.",
                                    "seed": "", "lr": "peak learning rate (not a # comment)"}
    assert field_comments(child)["steps"] == "Optimizer steps of the run, over two lines."
    assert field_comments(child)["inner"] == "Nested settings."
    rows = {setting.name: setting for setting in settings_of(child)}
    assert rows["inner.size"].default == 7 and rows["inner.size"].meaning == "Its size."
    assert rows["steps"].default == 5 and rows["lr"].type == "float"
    assert undocumented(list(settings_of(child))) == ["seed"]


_EXAMPLE = '''
from dataclasses import dataclass, field

@dataclass
class Inner:
    # Its size.
    size: int = 3

@dataclass
class Base:
    # Optimizer steps of the run,
    # over two lines.
    steps: int = 10
    seed: int = 0
    lr: float = 1e-3  # peak learning rate (not a # comment)

@dataclass
class Child(Base):
    steps: int = 5
    # Nested settings.
    inner: Inner = field(default_factory=lambda: Inner(size=7))
'''


def test_a_wrong_override_in_a_conf_file_is_refused_by_the_reference():
    from nemo_dvpo.utils.config_reference import Setting, settings_table
    from nemo_dvpo.utils.errors import ConfigError

    settings = [Setting("train.steps", "int", 16, "Steps."), Setting("gvm_training", "mapping", {}, "Stage 1.")]
    rows = settings_table(settings, {"train.steps": 6, "gvm_training.train.steps": 8}, {}, "x.yaml")
    assert rows[2] == "| `train.steps` | int | `16` | `6` | Steps. |"
    assert rows[3] == "| `gvm_training` | mapping | `{}` | `train.steps=8` | Stage 1. |"
    with pytest.raises(ConfigError, match="x.yaml: 'train.stepz' is not a setting"):
        settings_table(settings, {"train.stepz": 6}, {}, "x.yaml")


def test_the_worked_example_of_docs_architecture_computes_what_it_says():
    """docs/architecture.md's RLOO function, run as written: scores [1, 2, 3, 6] -> [-8/3, -4/3, 0, 4]."""
    import torch

    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    (block,) = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
                if "def leave_one_out_advantages" in block]
    namespace: dict = {}
    exec(block, namespace)
    advantages = namespace["leave_one_out_advantages"](torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0]), 2)
    assert torch.allclose(advantages, torch.tensor([-1.0, 1.0, -3.0, 3.0, 0.0, 0.0]))
    advantages = namespace["leave_one_out_advantages"](torch.tensor([1.0, 2.0, 3.0, 6.0]), 4)
    assert torch.allclose(advantages, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))


def anchors_of(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    anchors, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"^#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add("".join(ch for ch in title if ch.isalnum() or ch in " -_").replace(" ", "-"))
    return anchors


def test_every_link_between_the_docs_resolves():
    """A relative link names a file that exists and, with #anchor, a heading in it (sections get renamed)."""
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- commands in the docs ------------------------------------------------------------------------------------------

def code_block_lines(text: str) -> list[list[str]]:
    """The lines of each fenced (```) or indented (4 spaces after a blank line) code block."""
    blocks, current, fenced, previous_blank = [], None, False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                blocks.append(current)
                current, fenced = None, False
            else:
                current, fenced = [], True
            continue
        if fenced:
            current.append(line)
        elif line.startswith("    ") and (current is not None or previous_blank) and line.strip():
            current = current if current is not None else []
            current.append(line[4:])
        elif current is not None and line.strip():
            blocks.append(current)
            current = None
        previous_blank = not line.strip()
    if current:
        blocks.append(current)
    return blocks


def commands_in(block: list[str]) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments cut, variables set in the block expanded."""
    joined, pending = [], ""
    for line in block:
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    if pending:
        joined.append(pending)
    variables, commands = {}, []
    for line in joined:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        for name, value in variables.items():
            text = text.replace("${" + name + "}", value).replace("$" + name, value)
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError:
            continue  # not shell (a Python snippet, a table)
        if len(tokens) == 1 and ASSIGNMENT.match(tokens[0]):
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        commands.append(tokens)
    return commands


def script_invocations(tokens: list[str]):
    """(script, its arguments) for each repository script a command runs."""
    for index, token in enumerate(tokens):
        match = SCRIPT.match(token)
        if match:
            arguments = []
            for argument in tokens[index + 1:]:
                if argument in SEPARATORS or argument.startswith((">", "2>")):
                    break
                arguments.append(argument)
            yield match.group(1), arguments


@lru_cache(maxsize=None)
def hydra_settings(script: str) -> Optional[frozenset]:
    """Every setting key of a Hydra entry point (None for other scripts)."""
    from nemo_dvpo.models.config import ModelConfig
    from nemo_dvpo.utils.config_reference import settings_of

    tool = _tool()
    for entry, _, class_path, _ in tool.ENTRY_POINTS:
        if entry == script:
            settings = list(settings_of(tool.load_class(class_path)))
            names = {setting.name for setting in settings}
            names |= {f"model.{field.name}" for field in dataclasses.fields(ModelConfig)}
            names |= {f"{setting.name}.*" for setting in settings if setting.type == "mapping"}
            return frozenset(names)
    return None


def unknown_setting(key: str, settings: frozenset) -> bool:
    if key in settings or key.startswith("hydra."):
        return False
    return not any(name.endswith(".*") and key.startswith(name[:-1]) for name in settings)


@lru_cache(maxsize=None)
def script_text(script: str) -> str:
    """The script and the sibling modules it imports (a benchmark's shared argument helpers)."""
    path = REPO_ROOT / script
    text = path.read_text(encoding="utf-8")
    for module in re.findall(r"^from (\w+) import", text, flags=re.MULTILINE):
        sibling = path.parent / f"{module}.py"
        if sibling.is_file():
            text += sibling.read_text(encoding="utf-8")
    return text


def inline_commands(text: str) -> list[list[str]]:
    """Commands quoted inline in prose (`python tools/eval_gvm.py --gvm ...`), which may wrap over lines."""
    commands = []
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text):
        try:
            commands.append(shlex.split(span.replace("\n", " "), comments=True))
        except ValueError:
            continue
    return commands


def doc_commands():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        blocks = [tokens for block in code_block_lines(text) for tokens in commands_in(block)]
        for tokens in blocks + inline_commands(text):
            for script, arguments in script_invocations(tokens):
                yield doc.relative_to(REPO_ROOT), " ".join(tokens), script, arguments


def problems_of(script: str, arguments: list[str]) -> list[str]:
    path = REPO_ROOT / script
    if path.is_dir():
        return []  # a folder named in prose
    if not path.is_file():
        return [f"{script} does not exist"]
    problems = []
    settings = hydra_settings(script)
    for argument in arguments:
        if argument.startswith("--") and len(argument) > 2 and argument != "--help":
            flag = argument.split("=", 1)[0]
            if f'"{flag}"' not in script_text(script) and f"'{flag}'" not in script_text(script) and (
                    path.suffix == ".py" or flag not in script_text(script)):
                problems.append(f"{script} has no flag {flag}")
        elif settings is not None and OVERRIDE.match(argument) and "$" not in argument:
            key = OVERRIDE.match(argument).group(1)
            if unknown_setting(key, settings):
                problems.append(f"{script} has no setting {key}")
    return problems


def test_every_command_in_the_docs_names_scripts_flags_and_settings_that_exist():
    checked, problems = 0, []
    for doc, command, script, arguments in doc_commands():
        checked += 1
        problems += [f"{doc}: {problem}  [{command[:160]}]" for problem in problems_of(script, arguments)]
    assert checked > 100, f"only {checked} commands found: is the block parser still reading the docs?"
    assert not problems, "\n".join(problems)


def test_every_command_the_ifeval541_driver_runs_exists():
    """benchmarks/ifeval541_at_equal_budget.py's plan: its steps' commands pass the same checks as the docs'."""
    driver = REPO_ROOT / "benchmarks" / "ifeval541_at_equal_budget.py"
    spec = importlib.util.spec_from_file_location("ifeval541", driver)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
        del sys.modules[spec.name]
    steps = module.plan()
    assert len({step.name for step in steps}) == len(steps) == 17
    problems = [problem for step in steps for script, arguments in script_invocations(step.command[1:])
                for problem in problems_of(script, arguments)]
    assert not problems, problems
    made = {step.done for step in steps} | {made for step in steps for made in step.makes}
    assert all(need in made for step in steps for need in step.needs), "a step waits for a file no step makes"

    # Only what a target still needs runs: DPO's answers need its training and the pairs, not the stage-1 models;
    # once a policy's answers are shipped nothing behind them runs again, though its runs/ folder is gone.
    def to_run(targets, existing=()):
        return [step.name for step in module.steps_to_run(steps, targets, lambda path: path in existing)]
    assert to_run(["ifeval_dpo"]) == ["training_pairs", "policy_dpo", "ifeval_dpo"]
    assert to_run(["ifeval_dvpo"], {"runs/gvm_pair.train.jsonl"}) == ["gvm_801_pairs", "policy_dvpo", "ifeval_dvpo"]
    shipped = {f"docs/evals/ifeval541/{name}/provenance.json" for name in ("base", "dvpo", "dpo", "ppo", "grpo")}
    everything = module.final_steps(steps)
    assert everything == ["report_against_the_start", "report_against_dvpo", "gvm_all_pairs"]
    assert to_run(everything, shipped) == everything and len(to_run(everything)) == 15
    # DVPO from the all-pairs GVM only when named: after the GVM, never before the other policies' answers.
    assert to_run(["ifeval_dvpo_all_pairs"], shipped) == ["gvm_all_pairs", "policy_dvpo_all_pairs",
                                                          "ifeval_dvpo_all_pairs"]
    assert to_run(["ifeval_dvpo_all_pairs"], {"runs/gvm_pair_all/heldout_accuracy.json"}) == [
        "policy_dvpo_all_pairs", "ifeval_dvpo_all_pairs"]
    # Several targets: the first one's chain, then the next one's - not every stage-1 model first.
    made_by_dpo = {"runs/gvm_pair.train.jsonl", "docs/evals/ifeval541/dpo/provenance.json"}
    assert to_run(["ifeval_dvpo", "ifeval_ppo", "ifeval_grpo"], made_by_dpo) == [
        "gvm_801_pairs", "policy_dvpo", "ifeval_dvpo", "reward_model_801_pairs", "policy_ppo", "ifeval_ppo",
        "policy_grpo", "ifeval_grpo"]



def test_the_command_check_can_fail():
    assert problems_of("examples/train_dvpo.py", ["train.steps=3", "train.stepz=3"]) == [
        "examples/train_dvpo.py has no setting train.stepz"]
    assert problems_of("examples/train_dvpo.py", ["gvm_training.train.steps=3", "model.precision=bf16"]) == []
    assert problems_of("tools/eval_gvm.py", ["--gvm", "x", "--no-such-flag"]) == ["tools/eval_gvm.py has no flag "
                                                                                  "--no-such-flag"]
    assert problems_of("tools/no_such_tool.py", []) == ["tools/no_such_tool.py does not exist"]
    block = ["common=\"train.steps=2 kl.target=3\"", "python examples/train_dvpo.py $common \\", "  run_dir=x  # a"]
    (tokens,) = commands_in(block)
    assert list(script_invocations(tokens)) == [("examples/train_dvpo.py", ["train.steps=2", "kl.target=3",
                                                                            "run_dir=x"])]
