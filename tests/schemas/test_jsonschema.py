"""The committed JSON Schemas match the code, and real encoded events validate against them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import msgspec
import pytest
from referencing import Registry, Resource

from schemas import EVENT_TYPES
from schemas._jsonschema import export_json_schemas, generate, render
from streams import encode
from tests.schemas.test_events import examples

JSON_DIR = Path(__file__).resolve().parents[2] / "schemas" / "json"


def _registry() -> Registry:
    resources = [(p.name, Resource.from_contents(json.loads(p.read_text()))) for p in JSON_DIR.glob("*.json")]
    return Registry().with_resources(resources)


def test_committed_schemas_equal_what_the_code_generates() -> None:
    generated = generate()
    on_disk = {p.name for p in JSON_DIR.glob("*.json")}
    assert on_disk == set(generated), "run `python -m schemas._jsonschema` and commit schemas/json"
    for name, schema in generated.items():
        assert (JSON_DIR / name).read_text() == render(schema), f"{name} drifted from the code"


def test_export_writes_one_file_per_event_plus_index(tmp_path: Path) -> None:
    written = export_json_schemas(tmp_path)
    assert {p.name for p in written} == {f"{t.__name__}.json" for t in EVENT_TYPES} | {"index.json"}
    for p in written:
        jsonschema.Draft202012Validator.check_schema(json.loads(p.read_text()))


@pytest.mark.parametrize("event", examples(), ids=lambda e: type(e).__name__)
def test_sample_events_validate(event: msgspec.Struct) -> None:
    instance = json.loads(encode(event))  # type: ignore[arg-type]
    schema = json.loads((JSON_DIR / f"{type(event).__name__}.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(instance)
    # the index dispatches on the type tag to exactly one event schema
    index = json.loads((JSON_DIR / "index.json").read_text())
    jsonschema.Draft202012Validator(index, registry=_registry()).validate(instance)


def test_invalid_events_are_rejected() -> None:
    judged = json.loads(encode(examples()[2]))  # type: ignore[arg-type]
    judged["reward"] = 1.5
    schema = json.loads((JSON_DIR / "JudgedRollout.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(judged)
    del judged["rollout"]
    judged["reward"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(judged)
