"""The import rule of ../shared/ARCHITECTURE.md, as a test: the spine (`rlhf/`) imports no stage,
except `cli.py` and `demo.py`, which wire the stages together; a stage imports no other stage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPINE = "rlhf"
STAGES = ("sft", "reward", "dpo", "ppo", "rloo", "grpo", "labeling_app")
WIRING = {"rlhf/cli.py", "rlhf/demo.py"}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports, at any depth (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for package in (SPINE, *STAGES):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in WIRING:
                continue
            for imported in sorted(imported_packages(path) & set(STAGES)):
                if imported != package:
                    found.append(f"{rel} imports {imported}")
    return found


def test_the_spine_imports_no_stage_and_no_stage_imports_another():
    assert violations() == []


def test_the_rule_catches_what_it_forbids(tmp_path):
    files = {
        "rlhf/judges.py": "from sft.train import main\n",          # the spine imports a stage
        "rlhf/cli.py": "import sft.train\n",                       # wiring: allowed
        "reward/train.py": "def f():\n    from ppo import core\n",  # a stage imports another, lazily
        "ppo/train.py": "from ppo.rollout import sync_sampler\n",  # within its own stage: allowed
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert violations(tmp_path) == ["rlhf/judges.py imports sft", "reward/train.py imports ppo"]



def test_every_stage_has_one_shape_check_then_main():
    """ARCHITECTURE.md's stage shape: `check(cfg, store)` does every refusal before any work, `main` runs."""
    import importlib
    import inspect

    from rlhf.cli import STAGES

    for stage, (_, target) in STAGES.items():
        module_name, main = target.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, main, None)), stage
        check = getattr(module, "check", None)
        assert callable(check) and list(inspect.signature(check).parameters)[:2] == ["cfg", "store"], stage
        assert "check(cfg, store" in inspect.getsource(getattr(module, main)), f"{stage}'s main does not run check"
