"""The documents: the generated spec reference is current, and every relative link leads somewhere."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*.md"),
                    *(ROOT / "serving").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@functools.cache
def _generator():
    spec = importlib.util.spec_from_file_location("gen_spec_reference", ROOT / "docs" / "gen_spec_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_spec_reference_is_generated_from_the_current_models():
    generator = _generator()
    written = generator.REFERENCE.read_text() if generator.REFERENCE.is_file() else ""
    assert written == generator.spec_reference(), (
        f"docs/spec-reference.md does not match raydar's spec models; regenerate it: {generator.COMMAND}")


def test_the_spec_reference_has_a_table_for_every_task_kind_and_section():
    text = _generator().spec_reference()
    for title in ("task (kind: points)", "task (kind: boxes)", "task (kind: caption)", "task (kind: multilabel)",
                  "task (kind: regression)", "task.ontology.name", "task.targets.name", "images", "images.generate",
                  "split", "teacher", "teacher.simulated", "student", "student.lora", "knowledge_base", "serving"):
        assert f"\n## {title}\n" in text
    assert "| `match_radius` | float, > 0, <= 0.5 | `0.03` |" in text
    assert "source_file" not in text  # set by load_spec, not by a user


def _anchors(path: Path) -> set[str]:
    generator = _generator()
    return {generator._anchor(h.strip()) for h in re.findall(r"^#+ (.+)$", _prose(path), re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(document):
    broken = _broken_links(document)
    assert not broken, f"{document.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def _broken_links(document: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(document)):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path}")
    return broken


def _prose(path: Path) -> str:
    """The document without its fenced code blocks, where `#` starts a comment and brackets are code."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return "\n".join(lines)
