import json

import pytest

from core.errors import ComponentNotFound
from core.registry import resolve
from pipeline import Pipeline, SpecError, load_spec, parse_spec
from pipeline.spec import json_schema
from tests.plugins.components import PLUGINS, base_spec

SPEC = """\
version: 1
name: demo
stages:
  source:
    type: tests.plugins.components:MemorySource
    documents:
      a.txt: "hello"
  parser:
    type: tests.plugins.components:LineParser
  chunker:
    type: tests.plugins.components:ElementChunker
    chunk_size: {chunk_size}
  embedder:
    type: tests.plugins.components:HashEmbedder
  store:
    type: tests.plugins.components:MemoryStore
runner:
  batch_size: 4
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path, **kwargs):
    with pytest.raises(SpecError) as info:
        load_spec(path, allowed_modules=PLUGINS, **kwargs)
    return info.value.problems


def test_wrong_type_names_file_line_and_path(tmp_path):
    path = write(tmp_path, SPEC.format(chunk_size='"big"'))
    assert problems_of(path) == ['spec.yaml:12 stages.chunker.chunk_size: expected an integer, got "big"']


def test_unknown_key_is_an_error_with_its_line(tmp_path):
    text = SPEC.format(chunk_size=10).replace("  batch_size: 4", "  batch_size: 4\n  bacth_size: 5")
    assert problems_of(write(tmp_path, text)) == ["spec.yaml:19 runner.bacth_size: unknown key"]


def test_unknown_component_key_and_stage(tmp_path):
    text = SPEC.format(chunk_size=10).replace("    chunk_size: 10", "    chunk_size: 10\n    overlapp: 3")
    text = text.replace("runner:", "  rerankr: {}\nrunner:")
    problems = problems_of(write(tmp_path, text))
    assert "spec.yaml:13 stages.chunker.overlapp: unknown key" in problems
    assert any(p.startswith("spec.yaml:18 stages.rerankr: unknown stage") for p in problems)


def test_several_problems_reported_together(tmp_path):
    text = SPEC.format(chunk_size="-1").replace("  batch_size: 4", "  batch_size: many")
    # A runner error does not hide the stage errors: both come in one report.
    assert problems_of(write(tmp_path, text)) == [
        'spec.yaml:18 runner.batch_size: expected an integer, got "many"',
        "spec.yaml:12 stages.chunker.chunk_size: input should be greater than or equal to 1",
    ]
    # Every component problem is listed at once.
    text = SPEC.format(chunk_size="-1").replace(
        "    type: tests.plugins.components:HashEmbedder",
        "    type: tests.plugins.components:HashEmbedder\n    dimension: one",
    )
    problems = problems_of(write(tmp_path, text))
    assert "spec.yaml:12 stages.chunker.chunk_size: input should be greater than or equal to 1" in problems
    assert 'spec.yaml:15 stages.embedder.dimension: expected an integer, got "one"' in problems


def test_unknown_component_name_lists_known_ones(tmp_path):
    text = SPEC.format(chunk_size=10).replace("tests.plugins.components:ElementChunker", "recursiv")
    (problem,) = problems_of(write(tmp_path, text))
    assert problem.startswith("spec.yaml:11 stages.chunker.type: unknown chunker type 'recursiv'; known:")
    assert "recursive" in problem and "token" in problem


def test_import_path_needs_allow_list(tmp_path, monkeypatch):
    monkeypatch.delenv("RAG_PIPELINE_ALLOWED_MODULES", raising=False)
    path = write(tmp_path, SPEC.format(chunk_size=10))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert any("module 'tests.plugins.components' is not allowed" in p for p in info.value.problems)
    monkeypatch.setenv("RAG_PIPELINE_ALLOWED_MODULES", "tests.plugins")
    assert load_spec(path).stage("chunker").config.chunk_size == 10


def test_disallowed_module_is_never_imported(tmp_path):
    import sys

    sys.modules.pop("tests.plugins.never_imported", None)
    with pytest.raises(ComponentNotFound):
        resolve("chunker", "tests.plugins.never_imported:Thing", allowed_modules=["tests.other"])
    assert "tests.plugins.never_imported" not in sys.modules


def test_allowed_class_must_be_the_right_kind():
    with pytest.raises(ComponentNotFound, match="not a subclass of chunkers.base.Chunker"):
        resolve("chunker", "tests.plugins.components:HashEmbedder", allowed_modules=PLUGINS)


def test_env_substitution(tmp_path):
    text = SPEC.format(chunk_size="${CHUNK_SIZE:-42}").replace('"hello"', '"${GREETING}, $${literal}"')
    path = write(tmp_path, text)
    spec = load_spec(path, allowed_modules=PLUGINS, env={"GREETING": "hi"})
    assert spec.stage("chunker").config.chunk_size == 42
    assert spec.sources[0].config.documents["a.txt"] == "hi, ${literal}"
    spec = load_spec(path, allowed_modules=PLUGINS, env={"GREETING": "hi", "CHUNK_SIZE": "7"})
    assert spec.stage("chunker").config.chunk_size == 7


def test_unset_env_var_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, SPEC.format(chunk_size="${CHUNK_SIZE}"))
    assert problems_of(path, env={}) == [
        "spec.yaml:12 stages.chunker.chunk_size: environment variable CHUNK_SIZE is not set"
    ]


def test_duplicate_keys_and_invalid_yaml(tmp_path):
    text = SPEC.format(chunk_size=10).replace("  batch_size: 4", "  batch_size: 4\n  batch_size: 5")
    assert problems_of(write(tmp_path, text)) == ["spec.yaml:19 runner.batch_size: duplicate key"]
    problems = problems_of(write(tmp_path, "stages: [unclosed"))
    assert problems[0].startswith("spec.yaml:") and "invalid YAML" in problems[0]


def test_missing_source(tmp_path):
    text = SPEC.format(chunk_size=10).replace(
        '  source:\n    type: tests.plugins.components:MemorySource\n    documents:\n      a.txt: "hello"\n', ""
    )
    assert problems_of(write(tmp_path, text)) == ["spec.yaml:3 stages.source: required key is missing"]


def test_round_trip_through_yaml(tmp_path):
    spec = load_spec(write(tmp_path, SPEC.format(chunk_size=10)), allowed_modules=PLUGINS)
    again = load_spec(write(tmp_path, spec.to_yaml(), "again.yaml"), allowed_modules=PLUGINS)
    assert again.to_dict() == spec.to_dict()
    assert spec.to_dict()["stages"]["chunker"] == {"type": "tests.plugins.components:ElementChunker", "chunk_size": 10}
    assert spec.to_dict()["runner"] == {"batch_size": 4}


def test_component_to_dict_from_dict_round_trip():
    pipeline = Pipeline(base_spec(), allowed_modules=PLUGINS)
    chunker = pipeline.chunker
    rebuilt = type(chunker).from_dict(chunker.to_dict())
    assert rebuilt.config == chunker.config
    with pytest.raises(ValueError, match="has type"):
        type(chunker).from_dict({"type": "other"})


def test_source_list_form_and_defaults():
    spec_dict = base_spec()
    one = spec_dict["stages"]["source"]
    spec_dict["stages"]["source"] = [one, dict(one, namespace="other")]
    spec = parse_spec(spec_dict, allowed_modules=PLUGINS)
    assert [s.config.namespace for s in spec.sources] == ["mem", "other"]
    spec_dict["stages"]["source"][1]["namespace"] = 5
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict, allowed_modules=PLUGINS)
    assert info.value.problems == ["<spec> stages.source[1].namespace: expected a string, got 5"]


def test_json_schema_lists_builtin_components():
    schema = json_schema()
    json.dumps(schema)  # serialisable
    chunkers = schema["properties"]["stages"]["properties"]["chunker"]["anyOf"]
    assert {v["properties"]["type"]["const"] for v in chunkers} >= {"recursive", "token"}
    assert schema["properties"]["runner"]


def test_cli_validate_reports_spec_errors(tmp_path, capsys):
    from pipeline.cli import EXIT_BAD_SPEC, main

    path = write(tmp_path, SPEC.format(chunk_size='"big"'))
    assert main(["validate", str(path), "--allow-module", "tests.plugins"]) == EXIT_BAD_SPEC
    assert 'spec.yaml:12 stages.chunker.chunk_size: expected an integer, got "big"' in capsys.readouterr().err
