"""The import direction of docs/architecture.md, checked on the source with ``ast`` (nothing is
imported or executed).

Every ``import`` counts, wherever it is written: at the top of a module, inside a function, or
under ``if TYPE_CHECKING:``. A function-level import written to dodge a cycle is still a cycle.
The rules, in the words of docs/architecture.md ("What may import what"):

* no import cycles between modules;
* ``db`` imports neither ``worker`` nor ``tasks``;
* the leaf layers ``worker.steps``, ``worker.fraud``, ``worker.models`` and ``worker.io`` import
  neither the database (``db``, ``sqlalchemy``) nor ``worker.cli``, ``worker.pipeline`` (except
  the step contract ``worker.pipeline.contract``), ``worker.review`` or ``tasks``;
* only ``worker.cli`` imports ``worker.cli``;
* ``worker`` never imports ``tasks`` (it names tasks by string, see ``worker/celery_app.py``);
* ``tasks`` import only ``worker``, ``db`` and each other from this project, and each task
  function stays thin;
* beyond these, each package imports only what its row of the table allows (``MAY_IMPORT``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worker", "tasks", "db")
#: Longest body of a Celery task function, in lines: tasks call into worker/ and db/, no logic.
MAX_TASK_LINES = 20

#: Known violations, as (importing module, imported module) pairs, that are being fixed right
#: now. Each entry must still occur (the last test fails when one is gone), so this list can only
#: shrink: empty it as the fixes land.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset({
})

#: The table "Code layout, and what may import what" of docs/architecture.md: each package (the
#: longest matching prefix wins) and the project packages it may import besides itself. Every
#: module may import ``worker`` itself (the package, for ``__version__``).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "worker.config": (),
    "worker.observe": ("worker.config",),  # logs and metrics: leaf-ish, never db or pipeline
    "worker.celery_app": ("worker.config", "db"),
    "worker.intake": ("worker.config", "worker.celery_app", "worker.observe"),
    "worker.io": ("worker.config",),
    # outbound events: the outbox, results stream and webhook (the webhook uses the fetch fence)
    "worker.outbound": ("worker.config", "worker.io", "db"),
    "worker.models": ("worker.config", "worker.pipeline.contract", "worker.observe"),
    "worker.steps": ("worker.config", "worker.io", "worker.models", "worker.pipeline.contract"),
    "worker.fraud": ("worker.config", "worker.io", "worker.models", "worker.pipeline.contract"),
    "worker.pipeline": ("worker.config", "worker.intake", "worker.io", "worker.fraud", "worker.observe",
                        "worker.outbound", "worker.search.vectors", "db"),
    # visual search: vectors, the index backends, similar/tag search, one-photo analysis
    "worker.search": ("worker.config", "worker.io", "worker.models", "worker.steps", "worker.pipeline", "db"),
    "worker.labels": ("worker.config", "db"),
    "worker.review": ("worker.config", "worker.pipeline", "worker.fraud", "worker.labels", "worker.outbound", "db"),
    "worker.reports": ("worker.config", "worker.celery_app", "worker.io", "db"),
    "worker.training": ("worker.config", "worker.celery_app", "worker.models", "worker.steps", "worker.fraud",
                        "worker.labels", "worker.pipeline", "worker.outbound", "db"),
    "worker.api": ("worker", "db"),
    "worker.cli": ("worker", "db"),
    "tasks": ("worker", "db"),
    "db": (),
}

LEAF_LAYERS = ("worker.steps", "worker.fraud", "worker.models", "worker.io")
LEAF_FORBIDDEN = ("db", "sqlalchemy", "worker.cli", "worker.pipeline", "worker.review", "tasks")
LEAF_ALLOWED = ("worker.pipeline.contract",)


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a project module, or the dotted name of an outside one
    path: str
    line: int
    where: str  # "top", "function" or "type-checking"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.target} ({self.where}-level)"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


MODULES = _project_modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _resolve(name: str) -> str:
    """The project module a dotted import name loads (``worker.pipeline.contract.Step`` ->
    ``worker.pipeline.contract``), or the name itself for outside modules."""
    candidate = name
    while candidate and candidate not in MODULES:
        candidate = candidate.rpartition(".")[0]
    return candidate or name


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: str) -> None:
        self.module, self.path = module, path
        self.is_package = path.endswith("__init__.py")
        self.depth = 0
        self.type_checking = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.Import | ast.ImportFrom) -> None:
        where = "type-checking" if self.type_checking else ("function" if self.depth else "top")
        self.found.append(Import(self.module, _resolve(target), self.path, node.lineno, where))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self.type_checking += guarded
        for child in node.body:
            self.visit(child)
        self.type_checking -= guarded
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = ".".join(part for part in (package, node.module or "") if part)
        else:
            base = node.module or ""
        for alias in node.names:
            # `from pkg import submodule` loads that submodule; `from mod import name` loads mod.
            full = f"{base}.{alias.name}"
            self._add(full if full in MODULES else base, node)


def _collect(module: str, source: str, path: str) -> list[Import]:
    collector = _Collector(module, path)
    collector.visit(ast.parse(source, filename=path))
    return [imp for imp in collector.found if imp.target != module]


IMPORTS = [imp for module, path in MODULES.items()
           for imp in _collect(module, path.read_text(), str(path.relative_to(ROOT)))]


def _known(imp: Import) -> bool:
    return (imp.importer, imp.target) in KNOWN_VIOLATIONS


def _report(violations: list[Import], rule: str) -> str:
    return f"{rule}:\n  " + "\n  ".join(str(v) for v in violations)


def _cycles(imports: list[Import]) -> Iterator[list[Import]]:
    """One concrete cycle per strongly connected component of the project import graph."""
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in imports:
        if imp.target in MODULES and not _known(imp):
            edges[imp.importer].setdefault(imp.target, imp)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for module in sorted(edges):
        if module not in index:
            connect(module)

    for component in components:
        start = min(component)
        # Breadth-first search inside the component for the shortest way back to `start`.
        paths: dict[str, list[Import]] = {start: []}
        queue = [start]
        while queue:
            node = queue.pop(0)
            for nxt, imp in sorted(edges[node].items()):
                if nxt == start:
                    yield [*paths[node], imp]
                    queue = []
                    break
                if nxt in component and nxt not in paths:
                    paths[nxt] = [*paths[node], imp]
                    queue.append(nxt)


def test_the_parser_sees_the_project() -> None:
    # Guards the checks below against passing vacuously on a broken walk.
    assert {"worker.pipeline.contract", "tasks.base", "db.models", "worker.celery_app"} <= set(MODULES)
    targets = {(imp.importer, imp.target) for imp in IMPORTS}
    assert ("tasks.base", "db.session") in targets
    assert ("worker.celery_app", "db.session") in targets  # function-level imports count
    assert any(imp.where == "function" for imp in IMPORTS)


def test_the_checks_catch_what_they_describe() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from db.models import Image\n"
        "def run():\n    import tasks.images\n    from ..pipeline import analyze\n"
        "    from . import base\n    from worker.pipeline.contract import Step\n"
    )
    found = _collect("worker.steps.metadata", source, "worker/steps/metadata.py")
    assert {(imp.target, imp.where) for imp in found} == {
        ("typing", "top"), ("db.models", "type-checking"), ("tasks.images", "function"),
        ("worker.pipeline.analyze", "function"), ("worker.steps.base", "function"),
        ("worker.pipeline.contract", "function"),
    }
    assert {imp.target for imp in found if _leaf_breaks_rule(imp)} == {
        "db.models", "tasks.images", "worker.pipeline.analyze"}
    assert _outside_the_table(Import("worker.io.fetch", "worker.steps.tagging", "p.py", 1, "top"))
    assert _outside_the_table(Import("worker.reports.status", "worker.pipeline.store", "p.py", 1, "function"))
    assert not _outside_the_table(Import("worker.steps.tagging", "worker.models.runtime", "p.py", 1, "top"))
    assert not _outside_the_table(Import("worker.io.fetch", "worker", "p.py", 1, "top"))
    # A function-level import back to a module that imports us at the top is a cycle.
    back = _collect("worker.steps.base", "def f():\n    import worker.steps.metadata\n", "worker/steps/base.py")
    (cycle,) = _cycles([*found, *back])
    assert [imp.target for imp in cycle] == ["worker.steps.metadata", "worker.steps.base"]


def test_no_import_cycles() -> None:
    cycles = list(_cycles(IMPORTS))
    message = "\n".join(
        _report(cycle, "import cycle " + " -> ".join([cycle[0].importer] + [imp.target for imp in cycle]))
        for cycle in cycles
    )
    assert not cycles, message + "\n(a function-level import that only avoids the cycle is still one)"


def _violations(rule: str, applies: object) -> None:
    assert callable(applies)
    bad = [imp for imp in IMPORTS if applies(imp) and not _known(imp)]
    assert not bad, _report(bad, rule)


def _package(module: str) -> str | None:
    owners = [prefix for prefix in MAY_IMPORT if _within(module, prefix)]
    return max(owners, key=len) if owners else None


def _outside_the_table(imp: Import) -> bool:
    owner = _package(imp.importer)
    if owner is None or imp.target == "worker" or not imp.target.startswith(("worker", "tasks", "db")):
        return False  # third-party, the standard library, or the top package itself
    if imp.target not in MODULES or _within(imp.target, owner):
        return False
    return not any(_within(imp.target, allowed) for allowed in MAY_IMPORT[owner])


def test_every_module_belongs_to_a_package_of_the_table() -> None:
    homeless = sorted(m for m in MODULES if m != "worker" and _package(m) is None)
    assert not homeless, f"add these to MAY_IMPORT and to docs/architecture.md: {homeless}"


def test_packages_import_only_what_the_architecture_table_allows() -> None:
    _violations("imports outside the table in docs/architecture.md (MAY_IMPORT)", _outside_the_table)


def test_db_imports_neither_worker_nor_tasks() -> None:
    _violations("db must not import worker or tasks", lambda imp: _within(imp.importer, "db") and (
        _within(imp.target, "worker") or _within(imp.target, "tasks")))


def _leaf_breaks_rule(imp: Import) -> bool:
    if not any(_within(imp.importer, layer) for layer in LEAF_LAYERS):
        return False
    if any(_within(imp.target, allowed) for allowed in LEAF_ALLOWED):
        return False
    return any(_within(imp.target, forbidden) for forbidden in LEAF_FORBIDDEN)


def test_leaf_layers_import_no_database_pipeline_cli_review_or_tasks() -> None:
    _violations(
        "worker.steps/fraud/models/io must not import db, sqlalchemy, worker.cli, worker.pipeline "
        "(other than worker.pipeline.contract), worker.review or tasks", _leaf_breaks_rule)


def test_only_the_cli_imports_the_cli() -> None:
    _violations("only worker.cli may import worker.cli", lambda imp: _within(imp.target, "worker.cli")
                and not _within(imp.importer, "worker.cli"))


def test_worker_never_imports_tasks() -> None:
    _violations("worker must not import tasks (name them by string, see worker/celery_app.py)",
                lambda imp: _within(imp.importer, "worker") and _within(imp.target, "tasks"))


def test_tasks_import_only_worker_and_db_from_the_project() -> None:
    project = ("worker", "tasks", "db", "migrations", "bench", "tests")
    _violations("tasks may import only worker, db and tasks from this project",
                lambda imp: _within(imp.importer, "tasks") and any(_within(imp.target, p) for p in project)
                and not any(_within(imp.target, p) for p in ("worker", "db", "tasks")))


def _is_task(node: ast.FunctionDef) -> bool:
    for decorator in node.decorator_list:
        func = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(func, ast.Attribute) and func.attr in {"task", "shared_task"}:
            return True
        if isinstance(func, ast.Name) and func.id == "shared_task":
            return True
    return False


def test_tasks_are_thin() -> None:
    tasks_found, too_long = [], []
    for module, path in MODULES.items():
        if not _within(module, "tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and _is_task(node):
                # The body without its docstring.
                body = node.body[1:] if ast.get_docstring(node) else node.body
                lines = (body[-1].end_lineno or 0) - body[0].lineno + 1
                tasks_found.append(node.name)
                if lines > MAX_TASK_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno}: task {node.name} has {lines} lines")
    assert {"handle_event", "analyze_image", "requeue_stale_images"} <= set(tasks_found)
    assert not too_long, f"tasks longer than {MAX_TASK_LINES} lines (move the logic into worker/):\n  " + \
        "\n  ".join(too_long)


def test_known_violations_still_exist() -> None:
    present = {(imp.importer, imp.target) for imp in IMPORTS}
    gone = sorted(pair for pair in KNOWN_VIOLATIONS if pair not in present)
    assert not gone, "fixed, remove from KNOWN_VIOLATIONS in tests/test_architecture.py: " + ", ".join(
        f"{importer} -> {target}" for importer, target in gone)
