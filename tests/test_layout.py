"""The package's shape: one import namespace, no import cycles, services never import the
local launcher, and the shared vocabulary depends on nothing of the project.

Imports are read with ``ast`` from every module file (function-level imports included), so
the checks see what could be imported at run time, not only what one test happened to load.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The folders the pyproject maps into the `tailbridge` namespace.
PACKAGE_DIRS = {"tailbridge": "tailbridge", "tailbridge.streams": "streams", "tailbridge.models": "models",
                "tailbridge.feature_repo": "feature_repo", "tailbridge.serving": "serving",
                "tailbridge.infra": "infra", "tailbridge.bench": "bench"}
LAUNCHER = "tailbridge.infra"
# Who may import the launcher (tests, outside the package, may too).
LAUNCHER_USERS = ("tailbridge.cli", "tailbridge.infra")
# A part may import only the parts listed for it, besides itself and the vocabulary/settings.
ALLOWED = {
    "tailbridge.models": {"tailbridge.models"},
    "tailbridge.feature_repo": {"tailbridge.feature_repo"},
    "tailbridge.streams": {"tailbridge.streams", "tailbridge.models", "tailbridge.feature_repo"},
    "tailbridge.serving": {"tailbridge.serving", "tailbridge.streams", "tailbridge.models", "tailbridge.feature_repo"},
}
FOUNDATION = ("tailbridge.vocab", "tailbridge.settings")


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.startswith("tailbridge.") and name.split(".")[1] in ("streams", "models", "feature_repo",
                                                                          "serving", "infra", "bench") \
                    and package == "tailbridge":
                continue  # a mapped folder is read under its own package, not twice
            modules[name] = path
    return modules


MODULES = module_files()


def imports_of(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports (``from pkg import mod`` counts as importing pkg.mod)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_mapped_folders_are_read():
    assert {"tailbridge.streams.events", "tailbridge.models.retrieval.model", "tailbridge.serving.app",
            "tailbridge.infra.stack", "tailbridge.cli", "tailbridge.vocab"} <= MODULES.keys()


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep):] + [dep] if dep in trail else [node, dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_cli_imports_the_launcher():
    offenders = sorted(f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps
                       if part(d) == LAUNCHER and not m.startswith(LAUNCHER_USERS))
    assert not offenders, offenders


def test_parts_import_only_what_their_layer_allows():
    offenders = []
    for module, deps in GRAPH.items():
        allowed = ALLOWED.get(part(module))
        if allowed is None:
            continue
        offenders += [f"{module} imports {d}" for d in deps if part(d) not in allowed and d not in FOUNDATION]
    assert not offenders, "\n".join(sorted(offenders))


def test_vocabulary_imports_nothing_of_the_project():
    assert GRAPH["tailbridge.vocab"] == set()


def test_no_file_edits_sys_path():
    offenders = [str(path.relative_to(ROOT)) for path in [*MODULES.values(), *ROOT.joinpath("tests").rglob("*.py")]
                 if path != Path(__file__).resolve() and "sys.path" in path.read_text()]
    assert not offenders, offenders


@pytest.mark.parametrize("generic", ["models", "streams", "serving", "infra", "feature_repo", "bench"])
def test_generic_names_are_not_importable(generic, tmp_path):
    # From an empty directory only what is installed can be found; from the repository root
    # the folder is found, and its guard refuses to load under the wrong name.
    for cwd in (tmp_path, ROOT):
        result = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=cwd, capture_output=True, text=True)
        assert result.returncode != 0, f"`import {generic}` worked from {cwd}"


def test_namespace_imports_from_anywhere(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import tailbridge.streams.events, tailbridge.vocab"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
