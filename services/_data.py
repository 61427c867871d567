"""The project's packaged content: the starter constitution and prompt set (file I/O lives here, not in
schemas)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from schemas import ConfigError, Constitution, PromptTask

DATA_DIR = Path(__file__).parent / "data"


def load_constitution(path: Path | None = None) -> Constitution:
    path = path or DATA_DIR / "constitution.yaml"
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read constitution {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"constitution {path} is not a mapping")
    return Constitution.from_mapping(document)


def load_prompts(path: Path | None = None) -> list[PromptTask]:
    path = path or DATA_DIR / "prompts.jsonl"
    tasks = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            tasks.append(
                PromptTask(
                    prompt_id=row["prompt_id"],
                    text=row["text"],
                    split=row.get("split", "train"),
                    source=row.get("source", "unknown"),
                )
            )
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{path}:{n}: bad prompt line: {exc}") from exc
    if not tasks:
        raise ConfigError(f"{path} holds no prompts")
    return tasks
