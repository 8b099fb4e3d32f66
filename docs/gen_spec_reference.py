"""Write docs/spec-reference.md from the pydantic models of the dataset spec.

    .venv/bin/python docs/gen_spec_reference.py            # rewrite docs/spec-reference.md
    .venv/bin/python docs/gen_spec_reference.py --check    # exit 1 when the file is not current

The walk starts at `raydar.spec.DatasetSpec` and follows every field whose type holds a model, the
task union included, so a model that moves to another module is still found. One table per model:
field, type (with its bounds), default, description (the field's own help text).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

REFERENCE = Path(__file__).resolve().parent / "spec-reference.md"
COMMAND = ".venv/bin/python docs/gen_spec_reference.py"

_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "at least"),
           ("max_length", "at most"))


def spec_reference() -> str:
    """The markdown of docs/spec-reference.md."""
    from raydar.spec import DatasetSpec

    sections = _walk(DatasetSpec)
    lines = [
        "# Dataset spec reference",
        "",
        f"Generated from the pydantic models of the dataset spec by `{COMMAND}`; edit the models' help",
        "text, not this file. How specs are used, the shipped specs and `--set` overrides: [specs.md](specs.md).",
        "",
        "Defaults are written as YAML. A field marked *required* has no default. `name` stands for any key",
        "of a mapping (a class of the ontology, a target of a regression).",
        "",
        "## Contents",
        "",
    ]
    lines += [f"- [{title}](#{_anchor(title)})" for title, _ in sections]
    for title, model in sections:
        lines += ["", f"## {title}", "", f"`{model.__module__}.{model.__name__}`"]
        doc = _docstring(model)
        if doc:
            lines += ["", doc]
        lines += ["", "| field | type | default | description |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            lines.append("| " + " | ".join(_cell(c) for c in (
                f"`{name}`", _type_name(field.annotation, field, sections), _default(field, sections),
                field.description or "")) + " |")
    return "\n".join(lines) + "\n"


def _walk(root: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """(section title, model) depth first from the root, in field order; a model reached twice keeps its first place."""
    sections: list[tuple[str, type[BaseModel]]] = [("The spec (top level)", root)]
    seen = {root}

    def visit(path: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            members = [(p, m) for p, m in _models_in(field.annotation) if m not in seen]
            for model_path, child in members:
                seen.add(child)
                where = ".".join(p for p in (path, name + model_path) if p)
                kind = _tag(child) if len(members) > 1 else None
                sections.append((f"{where} (kind: {kind})" if kind else where, child))
            for model_path, child in members:
                visit(".".join(p for p in (path, name + model_path) if p), child)

    visit("", root)
    return sections


def _models_in(annotation) -> list[tuple[str, type[BaseModel]]]:
    """Models inside a field's type, each with the path suffix it sits under (`.name` for a mapping's value)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin is dict:
        return [(".name" + suffix, m) for suffix, m in _models_in(args[1])]
    if origin is list:
        return [("[]" + suffix, m) for suffix, m in _models_in(args[0])]
    found = []
    for arg in args:
        found += _models_in(arg)
    return found


def _tag(model: type[BaseModel]) -> str | None:
    """The value of a model's `kind` literal: what tells the members of a union apart."""
    field = model.model_fields.get("kind")
    values = typing.get_args(field.annotation) if field else ()
    return values[0] if len(values) == 1 else None


def _type_name(annotation, field, sections) -> str:
    text = _render(annotation, sections)
    bounds = []
    for item in field.metadata:
        for attr, word in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{word} {value}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            bounds.append(f"matches `{pattern}`")
    return f"{text}, {', '.join(bounds)}" if bounds else text


def _render(annotation, sections, tagged: bool = False) -> str:
    """A field's type in words; a model is a link to its section, named by its kind inside a union of models."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for title, model in sections:
            if model is annotation:
                return f"[{(tagged and _tag(model)) or 'mapping'}](#{_anchor(title)})"
        return "mapping"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _render(args[0], sections)
    if origin is typing.Literal:
        return " | ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        tagged = sum(isinstance(a, type) and issubclass(a, BaseModel) for a in args) > 1
        return " | ".join(_render(a, sections, tagged) for a in args)
    if origin is list:
        return f"list of {_render(args[0], sections)}"
    if origin is dict:
        return f"mapping {_render(args[0], sections)} -> {_render(args[1], sections)}"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field, sections) -> str:
    if field.is_required():
        return "*required*"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        for title, model in sections:
            if model is type(value):
                return f"[its defaults](#{_anchor(title)})"
        return "its defaults"
    return f"`{json.dumps(value)}`"


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="Only say whether the file is current.")
    args = parser.parse_args(argv)
    text = spec_reference()
    if args.check:
        current = REFERENCE.is_file() and REFERENCE.read_text() == text
        print(f"{REFERENCE.name} is {'current' if current else f'out of date: run {COMMAND}'}")
        return 0 if current else 1
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REFERENCE.parent.parent))  # run as a file, the repository root is not on the path
    sys.exit(main())
