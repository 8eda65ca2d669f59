"""Every shipped config in configs/ documents itself and loads with its stage's config class."""

from __future__ import annotations

from pathlib import Path

import yaml

from rlhf.cli import STAGES
from rlhf.config import load_config
from rlhf.errors import RlhfError

CONFIGS = Path(__file__).parents[2] / "configs"


def yaml_files() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


def leading_comment_problem(path: Path) -> str | None:
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("#"):
        return f"{path.name}: must open with a comment block (what the stage does, needs, and the command)"
    return None


def load_problem(path: Path) -> str | None:
    """Stage configs must load with their config class; any other YAML must be a mapping."""
    if path.stem in STAGES:
        try:
            load_config(STAGES[path.stem][0], path)
        except RlhfError as e:
            return f"{path.name}: {e}"
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        return f"{path.name}: not valid YAML ({e})"
    if not isinstance(data, dict):
        return f"{path.name}: the top level must be a mapping, got {type(data).__name__}"
    return None


def test_configs_dir_has_yaml_files():
    names = [p.name for p in yaml_files()]

    assert names, f"no *.yaml in {CONFIGS}"
    assert "sft.yaml" in names


def test_every_stage_has_a_config_file():
    missing = [f"{stage}.yaml" for stage in STAGES if not (CONFIGS / f"{stage}.yaml").is_file()]

    assert missing == [], f"stages without a config in {CONFIGS}: {missing}"


def test_every_config_opens_with_a_comment_block():
    problems = [p for path in yaml_files() if (p := leading_comment_problem(path))]

    assert problems == []


def test_every_config_loads():
    problems = [p for path in yaml_files() if (p := load_problem(path))]

    assert problems == []
