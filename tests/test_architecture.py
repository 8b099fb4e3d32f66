"""The layout's rules, read from the source with `ast` (nothing of the project is imported): which
package may import which, jobs as leaves, and the task kind's name compared only inside raydar/kinds/.
A failure lists each offending line as `file:line: code`, a to-do list."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KIND_NAMES = frozenset({"points", "boxes", "caption", "multilabel", "regression"})
# The classes that stand for one kind: the kind itself (`Points`) and its spec section (`PointsTask`).
KIND_CLASSES = frozenset(name.capitalize() + suffix for name in KIND_NAMES for suffix in ("", "Task"))
# Jobs other than these two compose nothing; `jobs/arguments.py` is shared, not a job.
COMPOSING_JOBS = frozenset({"pipeline", "cli"})
NOT_JOBS = frozenset({"arguments", "__init__"})


def python_files(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(tree: ast.Module, package: str) -> list[tuple[ast.stmt, str]]:
    """(statement, dotted module) for every import in a module, lazy ones too, in line order; `package` is
    the importing module's package (relative imports are resolved against it)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from jobs import label` imports the module jobs.label
            found += [(node, f"{base}.{alias.name}") for alias in node.names]
    return sorted(found, key=lambda found: (found[0].lineno, found[0].col_offset))


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).parent.parts)


def line(path: Path, node: ast.AST, source: str | None = None) -> str:
    text = ast.get_source_segment(source, node) if source else None
    code = " ".join((text or ast.unparse(node)).split())
    return f"{path.relative_to(REPO)}:{node.lineno}: {code}"


def report(title: str, violations: list[str]) -> str:
    return f"{title} ({len(violations)}):\n  " + "\n  ".join(violations)


# ---------------------------------------------------------------------------------------------- imports


def job_imports_of_jobs(path: Path, tree: ast.Module) -> list[ast.stmt]:
    """Imports of a job module by a job that is not allowed to compose jobs."""
    if path.parent != REPO / "jobs" or path.stem in COMPOSING_JOBS:
        return []
    offending = []
    for node, name in imported_modules(tree, package_of(path)):
        parts = name.split(".")
        if parts[0] == "jobs" and len(parts) > 1 and parts[1] not in NOT_JOBS and parts[1] != path.stem:
            offending.append(node)
    return _unique(offending)


def imports_of(tree: ast.Module, package: str, packages: set[str]) -> list[ast.stmt]:
    return _unique([node for node, name in imported_modules(tree, package) if name.split(".")[0] in packages])


def _unique(nodes: list[ast.stmt]) -> list[ast.stmt]:
    seen, kept = set(), []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            kept.append(node)
    return kept


def test_jobs_are_leaves():
    """Only jobs/pipeline.py and jobs/cli.py compose jobs; every job may use jobs/arguments.py."""
    violations = []
    for path in python_files("jobs"):
        source = path.read_text()
        violations += [line(path, node, source) for node in job_imports_of_jobs(path, parse(path))]
    assert not violations, report("jobs importing another job module", violations)


def test_raydar_imports_neither_jobs_serving_nor_cluster():
    violations = []
    for path in python_files("raydar"):
        source = path.read_text()
        nodes = imports_of(parse(path), package_of(path), {"jobs", "serving", "cluster"})
        violations += [line(path, node, source) for node in nodes]
    assert not violations, report("raydar/ importing jobs, serving or cluster", violations)


def test_cluster_imports_nothing_of_raydar():
    violations = []
    for path in python_files("cluster"):
        source = path.read_text()
        violations += [line(path, node, source) for node in imports_of(parse(path), package_of(path), {"raydar"})]
    assert not violations, report("cluster/ importing raydar", violations)


# ------------------------------------------------------------------------------------- the kind's name


def names_kind(node: ast.expr) -> bool:
    """Whether an expression reads a kind: `kind`, `task.kind`, `config["kind"]`, `kind.name`."""
    if isinstance(node, ast.Name):
        return node.id.lower().endswith("kind")
    if isinstance(node, ast.Attribute):
        return node.attr.lower().endswith("kind") or (node.attr == "name" and names_kind(node.value))
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.lower().endswith("kind")
    if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
        return (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == "kind_of"
    return False


def kind_literals(node: ast.expr) -> set[str]:
    """The kind names a literal holds: `"points"`, or `("points", "boxes")` and its list and set forms."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & KIND_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(kind_literals(e) for e in node.elts)) if node.elts else set()
    return set()


def kind_branches(tree: ast.Module) -> list[ast.AST]:
    """Comparisons of a kind with a kind's name, `match` on a kind with such a case, dicts keyed by kind
    names looked up by a kind, and isinstance/issubclass checks against one kind's classes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:]):
                if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)):
                    continue
                if (names_kind(left) and kind_literals(right)) or (names_kind(right) and kind_literals(left)):
                    found.append(node)
                    break
        elif isinstance(node, ast.Match) and names_kind(node.subject):
            if any(kind_literals(value) for case in node.cases for value in _pattern_values(case.pattern)):
                found.append(node.subject)
        elif isinstance(node, ast.Subscript) and names_kind(node.slice) and _keyed_by_kind_names(node.value):
            found.append(node)
        elif isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "get" and node.args
                    and names_kind(node.args[0]) and _keyed_by_kind_names(func.value)):
                found.append(node)
            elif isinstance(func, ast.Name) and func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                if _class_names(node.args[1]) & KIND_CLASSES:
                    found.append(node)
    return sorted(found, key=lambda node: (node.lineno, node.col_offset))


def _pattern_values(pattern: ast.pattern) -> list[ast.expr]:
    if isinstance(pattern, ast.MatchValue):
        return [pattern.value]
    if isinstance(pattern, ast.MatchOr):
        return [v for p in pattern.patterns for v in _pattern_values(p)]
    if isinstance(pattern, ast.MatchAs) and pattern.pattern is not None:
        return _pattern_values(pattern.pattern)
    return []


def _keyed_by_kind_names(node: ast.expr) -> bool:
    return isinstance(node, ast.Dict) and any(key is not None and kind_literals(key) for key in node.keys)


def _class_names(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Tuple):
        return set().union(*(_class_names(e) for e in node.elts)) if node.elts else set()
    return set()


def test_only_the_kinds_compare_a_kinds_name():
    """Nothing outside raydar/kinds/ branches on which kind a task is: the kind object carries its rules."""
    violations = []
    for package in ("raydar", "jobs", "serving"):
        for path in python_files(package):
            if (REPO / "raydar" / "kinds") in path.parents:
                continue
            source = path.read_text()
            violations += [line(path, node, source) for node in kind_branches(parse(path))]
    assert not violations, report("branches on a task kind's name outside raydar/kinds/", violations)


# ------------------------------------------------------------------------- the checks catch what they say


def test_the_kind_check_catches_each_form_and_passes_other_kinds():
    caught = """
if task.kind == "points": pass
if spec.task.kind in ("points", "boxes"): pass
if config["kind"] == "multilabel": pass
if "caption" != kind: pass
if kind_of(task).name == "regression": pass
if isinstance(section, PointsTask): pass
if isinstance(kind, (kinds.Boxes, Caption)): pass
fuse = {"points": fuse_points, "boxes": fuse_boxes}[task.kind]
fuse = {"points": fuse_points}.get(spec.task.kind)
match task.kind:
    case "points" | "boxes": pass
"""
    passed = """
if teacher.kind == "simulated": pass
if fault.kind in ("hang", "prose"): pass
if name == "points": pass
if kind == other_kind: pass
if isinstance(section, TaskSection): pass
"""
    tree = ast.parse(caught)
    assert [node.lineno for node in kind_branches(tree)] == list(range(2, 12))
    assert kind_branches(ast.parse(passed)) == []


def test_the_import_checks_catch_each_form():
    job = REPO / "jobs" / "finetune.py"
    tree = ast.parse("""
from jobs.label import resolve_source
import jobs.evaluate
from jobs import index
from . import label
from .evaluate import something
from jobs.arguments import job_parser
from jobs import arguments
import raydar.spec
def later():
    from jobs.finetune import finetune
    from jobs.pipeline import run
""")
    assert [node.lineno for node in job_imports_of_jobs(job, tree)] == [2, 3, 4, 5, 6, 12]
    assert job_imports_of_jobs(REPO / "jobs" / "pipeline.py", tree) == []
    library = ast.parse("import cluster\nfrom serving.app import build_app\nfrom raydar import spec\n"
                        "def f():\n    from jobs.label import x\n")
    assert [n.lineno for n in imports_of(library, "raydar", {"jobs", "serving", "cluster"})] == [1, 2, 5]
