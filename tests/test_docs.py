"""The README and docs/ say what runs: every block that claims to run still parses or runs.

For every fenced block in README.md, docs/*.md and benchmarks/RESULTS.md:

* ```yaml: a block with a top-level ``stages:`` key is a whole spec and must pass
  ``pipeline.spec.parse_spec`` (the validation ``python -m pipeline validate`` starts with). Any
  other block must say what it is on its first line:
  ``# fragment: stages`` (each top-level entry is a stage, validated alone inside a minimal spec;
  several lines may show alternatives for one stage), ``# fragment: spec`` (each top-level entry is
  a top-level key of a spec: ``runner:``, ``query:``), or ``# fragment: yaml`` (not a spec: only
  parsed as YAML). ``${VAR}`` without a default gets a placeholder value.
* ```python: compiles, and every ``from <project package> import name`` resolves.
* ```toml: parses.
* ```bash: every ``python -m pipeline <command>`` (or ``rag-pipeline <command>``) names a real
  subcommand, every option it uses exists for that subcommand, and a command written without
  usage notation (``[...]``, ``a|b``) is accepted by the real argument parser; every
  ``python <file>.py`` / ``bash <file>.sh`` of this repository exists and knows the options given.

Every relative link (and its ``#anchor``) must point to an existing file (and heading), the README
must keep its two first commands, list every subcommand, show examples/quickstart.yaml as it is and
link every docs page, and the generated spec reference in docs/spec.md must match
``python -m pipeline schema``. Failures name the file and the line.

Regenerate the spec reference after changing a component's settings:

    .venv/bin/python tests/test_docs.py --write-spec-reference
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (--write-spec-reference)
    sys.path.insert(0, str(REPO))

PROJECT_PACKAGES = ("core", "pipeline", "connectors", "chunkers", "embedders", "stores", "rerankers")
MINIMAL_SPEC: dict[str, Any] = {"version": 1, "stages": {"source": {"type": "local", "path": "."}}}
FRAGMENT = re.compile(r"#\s*fragment:\s*(stages|spec|yaml)\b")
REFERENCE_START = "<!-- spec-reference:start -->"
REFERENCE_END = "<!-- spec-reference:end -->"
REGENERATE = ".venv/bin/python tests/test_docs.py --write-spec-reference"


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    results = REPO / "benchmarks" / "RESULTS.md"
    return files + ([results] if results.exists() else [])


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line} ({self.lang} block)"


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\S*)", lines[i])
        if not match:
            i += 1
            continue
        indent, lang, start = len(match.group(1)), match.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        yield Block(path, start + 1, lang, "\n".join(body) + "\n")
        i += 1


def all_blocks(*langs: str) -> list[Block]:
    return [b for path in doc_files() for b in blocks(path) if b.lang in langs]


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced blocks."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


# -- yaml ----------------------------------------------------------------------------------------


def placeholder_env(text: str) -> dict[str, str]:
    """A value for every ${VAR} written without a default, so only the spec itself is checked."""
    return {name: f"docs-test-{name.lower()}" for name in re.findall(r"\$\{(\w+)\}", text)}


def spec_problems(data: Any, text: str) -> list[str]:
    from pipeline.spec import parse_spec

    try:
        parse_spec(data, base_dir=REPO, env=placeholder_env(text))
    except Exception as exc:  # SpecError lists every problem; anything else is a bug to show
        return [str(exc)]
    return []


def top_level_entries(text: str) -> list[tuple[int, str]]:
    """The block split at each top-level key: (0-based line offset, text). Keys may repeat."""
    entries: list[tuple[int, list[str]]] = []
    for offset, line in enumerate(text.splitlines()):
        if line and not line[0].isspace() and not line.startswith("#"):
            entries.append((offset, [line]))
        elif entries:
            entries[-1][1].append(line)
    return [(offset, "\n".join(lines)) for offset, lines in entries]


def yaml_block_problems(block: Block) -> list[str]:
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        return [f"{block.where}: invalid YAML: {exc}"]
    if isinstance(data, dict) and "stages" in data:
        return [f"{block.where}: spec does not validate: {p}" for p in spec_problems(data, block.text)]
    fragment = FRAGMENT.match(first)
    if not fragment:
        return [
            f"{block.where}: a yaml block without a top-level 'stages:' key must start with "
            "'# fragment: stages', '# fragment: spec' or '# fragment: yaml'"
        ]
    if fragment.group(1) == "yaml":
        return []
    problems = []
    for offset, entry in top_level_entries(block.text):
        part = yaml.safe_load(entry)
        if not isinstance(part, dict):
            problems.append(f"{rel(block.path)}:{block.line + 1 + offset}: expected 'key: value', got {entry!r}")
            continue
        spec = json.loads(json.dumps(MINIMAL_SPEC))
        if fragment.group(1) == "stages":
            spec["stages"].update(part)
        else:
            spec.update(part)
        problems += [
            f"{rel(block.path)}:{block.line + 1 + offset}: does not validate: {p}" for p in spec_problems(spec, entry)
        ]
    return problems


def test_yaml_blocks_are_valid_specs_or_marked_fragments() -> None:
    checked = all_blocks("yaml", "yml")
    assert checked, "no yaml blocks found"
    problems = [p for block in checked for p in yaml_block_problems(block)]
    assert not problems, "\n".join(problems)


def example_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, spec) of every whole spec a user may copy: examples/**/*.yaml and the docs' spec blocks."""
    for path in sorted((REPO / "examples").rglob("*.y*ml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "stages" in data:
            yield rel(path), data
    for block in all_blocks("yaml", "yml"):
        data = yaml.safe_load(block.text)
        if isinstance(data, dict) and "stages" in data:
            yield block.where, data


def test_no_example_spec_enables_the_learned_sparse_stage() -> None:
    """Issue 24.8: SPLADE-tiny doubled ingest time and scored below BM25 on held-out data; it stays a
    commented line that a user enables after measuring."""
    specs = list(example_specs())
    assert any(where == "examples/quickstart.yaml" for where, _ in specs), "examples/quickstart.yaml not found"
    enabled = [
        where
        for where, spec in specs
        if spec["stages"].get("sparse") or (spec["stages"].get("store") or {}).get("learned_sparse") is not None
    ]
    assert not enabled, f"a learned sparse stage is enabled in: {', '.join(enabled)}; leave it commented out"


# -- python and toml -----------------------------------------------------------------------------


def python_block_problems(block: Block) -> list[str]:
    import ast

    try:
        tree = ast.parse(block.text, filename=block.where)
        compile(tree, block.where, "exec")
    except SyntaxError as exc:
        return [f"{rel(block.path)}:{block.line + (exc.lineno or 0)}: does not compile: {exc.msg}"]
    problems = []
    for node in ast.walk(tree):
        names: list[tuple[str, str | None]] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [(alias.name, None) for alias in node.names]
        for module, name in names:
            if module.split(".")[0] not in PROJECT_PACKAGES:
                continue
            where = f"{rel(block.path)}:{block.line + node.lineno}"
            try:
                imported = importlib.import_module(module)
            except ImportError as exc:
                problems.append(f"{where}: import {module}: {exc}")
                continue
            if name and name != "*" and not hasattr(imported, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    problems.append(f"{where}: {module} has no {name}")
    return problems


def test_python_blocks_compile_and_import() -> None:
    checked = all_blocks("python", "py")
    assert checked, "no python blocks found"
    problems = [p for block in checked for p in python_block_problems(block)]
    assert not problems, "\n".join(problems)


def test_toml_blocks_parse() -> None:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    problems = []
    for block in all_blocks("toml"):
        try:
            tomllib.loads(block.text)
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{block.where}: invalid TOML: {exc}")
    assert not problems, "\n".join(problems)


# -- bash ----------------------------------------------------------------------------------------


def cli_options() -> dict[str, set[str]]:
    """Subcommand -> its option strings (global options included), from the CLI's own parser."""
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    global_options = {o for a in parser._actions for o in a.option_strings}
    commands: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = global_options | {o for a in sub._actions for o in a.option_strings}
    return commands


def commands(block: Block) -> Iterator[tuple[int, list[str]]]:
    """(line, tokens) of each simple command in a bash block: continuations joined, comments and
    environment assignments dropped, split at ``&&``, ``||``, ``;`` and ``|``."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as exc:
            yield block.line + 1 + start, [f"<unparsable: {exc}>"]
            continue
        current: list[str] = []
        for token in tokens + [";"]:
            if token in ("&&", "||", ";", "|"):
                while current and re.match(r"^[A-Za-z_]\w*=", current[0]):
                    current.pop(0)
                if current:
                    yield block.line + 1 + start, current
                current = []
            else:
                current.append(token)


def is_python(token: str) -> bool:
    return bool(re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", token))


def flags(tokens: list[str]) -> list[str]:
    found = []
    for token in tokens:
        for part in token.strip("[]").split("|"):
            match = re.match(r"^(--?[A-Za-z][\w-]*)", part)
            if match and part.startswith("-"):
                found.append(match.group(1))
    return found


def cli_problems(where: str, argv: list[str], options: dict[str, set[str]]) -> list[str]:
    from pipeline.cli import build_parser

    words = [t for t in argv if not t.startswith("-")]
    if not words or words[0] not in options:
        named = repr(words[0]) if words else "nothing"
        command = " ".join(["python -m pipeline", *argv])
        return [f"{where}: '{command}': {named} is not a subcommand (known: {', '.join(options)})"]
    sub = words[0]
    problems = [
        f"{where}: 'python -m pipeline {sub}' has no option {flag} (see python -m pipeline {sub} --help)"
        for flag in flags(argv)
        if flag not in options[sub]
    ]
    usage = any(c in t for t in argv for c in "[]|") or "..." in argv
    if not problems and not usage:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                problems.append(f"{where}: 'python -m pipeline {' '.join(argv)}' is refused by the argument parser")
    return problems


def script_problems(where: str, script: str, argv: list[str]) -> list[str]:
    path = REPO / script
    if script.startswith("/") or script.startswith(".."):
        return []  # outside the repository (another environment, a user's file)
    if not path.is_file():
        return [f"{where}: {script} does not exist"]
    if "--" in argv:
        argv = argv[: argv.index("--")]  # what follows is another command
    source = path.read_text(encoding="utf-8")
    return [
        f"{where}: {script} does not define the option {flag}"
        for flag in flags(argv)
        if not re.search(rf"""(["'\s(|]){re.escape(flag)}([\s"'=)|]|$)""", source, re.MULTILINE)
    ]


def bash_block_problems(block: Block, options: dict[str, set[str]]) -> tuple[list[str], set[str]]:
    problems, used = [], set()
    for line, tokens in commands(block):
        where = f"{rel(block.path)}:{line}"
        for i, token in enumerate(tokens):
            if token.startswith("<unparsable"):
                problems.append(f"{where}: {token}")
            elif is_python(token) and tokens[i + 1 : i + 3] == ["-m", "pipeline"]:
                argv = tokens[i + 3 :]
                problems += cli_problems(where, argv, options)
                used.update(t for t in argv[:1] if t in options)
            elif token == "rag-pipeline" and i == 0:
                problems += cli_problems(where, tokens[1:], options)
            elif (
                (is_python(token) or token == "bash")
                and i + 1 < len(tokens)
                and re.search(r"\.(py|sh)$", tokens[i + 1])
            ):
                problems += script_problems(where, tokens[i + 1], tokens[i + 2 :])
    return problems, used


def test_bash_blocks_use_real_commands_and_options() -> None:
    options = cli_options()
    checked = all_blocks("bash", "sh", "shell")
    assert checked, "no bash blocks found"
    problems: list[str] = []
    for block in checked:
        found, _ = bash_block_problems(block, options)
        problems += found
    assert not problems, "\n".join(problems)


def test_cli_help_lists_the_documented_subcommands() -> None:
    """The real entry point (not just the parser object) starts and lists every subcommand."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    missing = [name for name in cli_options() if name not in result.stdout]
    assert not missing, f"python -m pipeline --help does not list {missing}"


def test_readme_keeps_the_two_commands_and_lists_every_subcommand() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    head = "\n".join(readme.splitlines()[:15])
    for command in (
        "bash scripts/install.sh && .venv/bin/python -m pipeline ingest examples/quickstart.yaml",
        "bash scripts/install.sh --dev && .venv/bin/python scripts/milvus_server.py run -- .venv/bin/python -m pytest",
    ):
        assert command in head, (
            f"README.md: the first lines must keep the command {command!r} (CI and newcomers run it)"
        )
    commands_section = readme.split("## Commands", 1)[-1].split("\n## ", 1)[0] if "## Commands" in readme else ""
    assert commands_section, "README.md: no '## Commands' section"
    missing = [
        name
        for name in cli_options()
        if not re.search(rf"python -m pipeline {re.escape(name)}(?![\w-])", commands_section)
    ]
    assert not missing, f"README.md '## Commands' does not list: {', '.join(missing)}"


def test_readme_shows_the_quickstart_spec_as_it_is() -> None:
    example = REPO / "examples" / "quickstart.yaml"
    shown = [b for b in blocks(REPO / "README.md") if b.lang == "yaml" and "name: quickstart" in b.text]
    assert shown, "README.md: no yaml block with the quickstart spec"
    assert yaml.safe_load(shown[0].text) == yaml.safe_load(example.read_text(encoding="utf-8")), (
        f"{shown[0].where}: differs from examples/quickstart.yaml; show the file as it is"
    )


# -- links ---------------------------------------------------------------------------------------


LINK = re.compile(r"(?<!\!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_relative_links_point_to_existing_files_and_headings() -> None:
    problems = []
    for path in doc_files():
        for number, line in prose_lines(path):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                    continue
                file_part, _, anchor = target.partition("#")
                resolved = (path.parent / file_part).resolve() if file_part else path
                where = f"{rel(path)}:{number}"
                if not resolved.exists():
                    problems.append(f"{where}: link to {target}: {file_part} does not exist")
                elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                    problems.append(f"{where}: link to {target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not problems, "\n".join(problems)


def test_readme_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    pages = [p for p in doc_files() if p.parent == REPO / "docs"] + [REPO / "benchmarks" / "RESULTS.md"]
    missing = [rel(p) for p in pages if f"]({rel(p)}" not in readme]
    assert not missing, f"README.md does not link {', '.join(missing)}"


# -- the generated spec reference ------------------------------------------------------------------


def cli_schema() -> dict[str, Any]:
    """What ``python -m pipeline schema`` prints."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "schema"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _prose(text: str) -> str:
    """A description: a table cell where <placeholders> stay visible (not taken for HTML tags)."""
    return _cell(text).replace("<", "&lt;").replace(">", "&gt;")


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"mapping ({prop['$ref'].rsplit('/', 1)[-1]})"
    if "anyOf" in prop:
        return " or ".join(_type(p, defs) for p in prop["anyOf"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " | ".join(f"`{v}`" if v is not None else "`null`" for v in prop["enum"])
    kind = prop.get("type")
    if kind == "array":
        item = prop.get("items")
        return f"list of {_type(item, defs)}" if item else "list"
    if kind == "object":
        values = prop.get("additionalProperties")
        return f"mapping of {_type(values, defs)}" if isinstance(values, dict) and values else "mapping"
    names = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "null": "null"}
    text = names.get(kind, kind or "any")
    bounds = [
        f"{symbol} {prop[key]}"
        for key, symbol in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
        if key in prop
    ]
    if "minLength" in prop:
        bounds.append(f"length ≥ {prop['minLength']}")
    if "pattern" in prop:
        bounds.append(f"matching `{prop['pattern']}`")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def factory_default(component: tuple[str, str] | None, name: str) -> str | None:
    """A default the JSON Schema cannot show (a pydantic default_factory), from the component's class."""
    if component is None:
        return None
    from core import registry

    field = registry.resolve(*component).Config.model_fields.get(name)
    if field is None or field.default_factory is None:
        return None
    value = field.default_factory()  # type: ignore[call-arg]
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return f"`{json.dumps(value, ensure_ascii=False, default=str)}`"


def _table(
    title: str,
    model: dict[str, Any],
    defs: dict[str, Any],
    nested: list[tuple[str, dict[str, Any]]],
    component: tuple[str, str] | None = None,
) -> list[str]:
    out = [f"#### {title}", ""]
    if model.get("description"):
        out += [_prose(model["description"]), ""]
    properties = {k: v for k, v in model.get("properties", {}).items() if not (k == "type" and "const" in v)}
    if not properties:
        return out + ["No settings.", ""]
    required = set(model.get("required", []))
    out += ["| setting | type | default | description |", "|---|---|---|---|"]
    for name, prop in properties.items():
        if name in required:
            default = "required"
        elif "default" in prop:
            default = f"`{json.dumps(prop['default'], ensure_ascii=False)}`"
        else:
            default = factory_default(component, name) or "—"
        description = prop.get("description", "")
        refs = [prop] + prop.get("anyOf", [])
        for ref in refs:
            if "$ref" in ref:
                def_name = ref["$ref"].rsplit("/", 1)[-1]
                nested.append((f"{title.split(':')[0].strip('`')}.{name}", defs[def_name]))
                description = (
                    description + " " if description else ""
                ) + f"See `{title.split(':')[0].strip('`')}.{name}` below."
        out.append(f"| `{name}` | {_cell(_type(prop, defs))} | {_cell(default)} | {_prose(description)} |")
    return out + [""]


def _section(
    title: str, model: dict[str, Any], defs: dict[str, Any], component: tuple[str, str] | None = None
) -> list[str]:
    nested: list[tuple[str, dict[str, Any]]] = []
    out = _table(title, model, defs, nested, component)
    while nested:
        name, sub = nested.pop(0)
        out += _table(f"`{name}`", sub, defs, nested)
    return out


def spec_reference(schema: dict[str, Any]) -> str:
    defs = schema.get("$defs", {})
    props = schema["properties"]
    out = ["### Top level", ""]
    top = {
        "properties": {k: v for k, v in props.items() if k not in ("stages", "runner", "query")},
        "required": schema.get("required", []),
    }
    out += ["| setting | type | default | description |", "|---|---|---|---|"]
    for name, prop in top["properties"].items():
        default = "required" if name in top["required"] else f"`{json.dumps(prop.get('default'))}`"
        out.append(f"| `{name}` | {_cell(_type(prop, defs))} | {default} | {_prose(prop.get('description', ''))} |")
    out += [
        "| `stages` | mapping | required | The stages below; `source` is required, the others have defaults. |",
        "| `runner` | mapping (RunnerConfig) | | See `runner` below. |",
        "| `query` | mapping | | See `query` below. |",
        "",
        "### `runner`",
        "",
    ]
    out += _section("`runner`", defs["RunnerConfig"], defs)
    stages = props["stages"]["properties"]
    for kind, stage in stages.items():
        out += [f"### `stages.{kind}`", ""]
        variants = stage["anyOf"][0]["anyOf"] if kind == "source" else stage["anyOf"]
        if kind == "source":
            out += ["One source or a list of them.", ""]
        for variant in variants:
            type_name = variant["properties"]["type"]["const"]
            out += _section(f"`stages.{kind}`: `type: {type_name}`", variant, defs, (kind, type_name))
    query = dict(props["query"])
    reranker = query["properties"].pop("reranker")
    out += ["### `query`", ""]
    out += _section("`query`", query, defs)
    for variant in reranker["anyOf"]:
        type_name = variant["properties"]["type"]["const"]
        out += _section(f"`query.reranker`: `type: {type_name}`", variant, defs, ("reranker", type_name))
    return "\n".join(out).rstrip() + "\n"


def test_spec_reference_matches_the_schema() -> None:
    text = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    assert REFERENCE_START in text and REFERENCE_END in text, (
        f"docs/spec.md: markers {REFERENCE_START} / {REFERENCE_END} missing"
    )
    current = text.split(REFERENCE_START, 1)[1].split(REFERENCE_END, 1)[0].strip("\n") + "\n"
    line = text[: text.index(REFERENCE_START)].count("\n") + 1
    assert current == spec_reference(cli_schema()), (
        f"docs/spec.md:{line}: the generated spec reference is out of date with `python -m pipeline schema`; "
        f"regenerate it with: {REGENERATE}"
    )


def write_spec_reference() -> None:
    path = REPO / "docs" / "spec.md"
    text = path.read_text(encoding="utf-8")
    before, rest = text.split(REFERENCE_START, 1)
    _, after = rest.split(REFERENCE_END, 1)
    path.write_text(
        f"{before}{REFERENCE_START}\n\n{spec_reference(cli_schema())}\n{REFERENCE_END}{after}", encoding="utf-8"
    )
    print(f"wrote the spec reference into {rel(path)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-spec-reference"]:
        write_spec_reference()
    else:
        sys.exit(f"usage: {REGENERATE}")
