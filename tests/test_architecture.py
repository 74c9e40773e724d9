"""The architecture holds: imports go one way through the layers, and every DVC stage lists
the library code that can change its outputs.

The layers are import-linter's contract in pyproject.toml. A stage's code deps in dvc.yaml
must be exactly the modules its script imports, directly or through other modules (found
with grimp, the graph library under import-linter), so that a change to any of them reruns
the stage and nothing else does. Two things are left out on purpose: tinyworlds.tracking
(logging; improving a progress bar does not retrain a model), and package `__init__.py`
files that hold nothing but a docstring.
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOT_A_STAGE_INPUT = "tinyworlds.tracking"


def test_imports_follow_the_layers():
    # In its own process: import-linter reconfigures logging, which would mute other tests' loggers.
    check = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", check, str(REPO / "pyproject.toml")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"an import crosses the layers:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"


@cache
def import_graph():
    import grimp

    return grimp.build_graph("tinyworlds", cache_dir=None)


def module_file(module: str) -> Path:
    path = REPO / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def has_code(init: Path) -> bool:
    """Whether a package's __init__.py does anything beyond its docstring."""
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
               and not (isinstance(node, ast.ImportFrom) and node.module == "__future__") for node in body)


def script_modules(script: Path) -> set[str]:
    """The tinyworlds modules a script imports itself (a `from package import module` counts the module)."""
    known = import_graph().modules
    found = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tinyworlds"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinyworlds":
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known}
    return found


def code_deps(script: Path) -> set[str]:
    """Every library file a stage script runs: its imports' closure (not through tracking), plus
    the packages on the way whose __init__.py has code."""
    graph = import_graph()
    todo, seen = list(script_modules(script)), set()
    while todo:
        module = todo.pop()
        if module in seen or module.startswith(NOT_A_STAGE_INPUT):
            continue
        seen.add(module)
        todo.extend(graph.find_modules_directly_imported_by(module))
    packages = {".".join(m.split(".")[:i]) for m in seen for i in range(1, m.count(".") + 1)}
    files = {module_file(m) for m in seen} | {module_file(p) for p in packages if has_code(module_file(p))}
    return {f.relative_to(REPO).as_posix() for f in files if f.name != "__init__.py" or has_code(f)}


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage by its template."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in doc.items()}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_code_deps_are_exactly_what_its_script_imports(name):
    stage = stages()[name]
    script = next(word for word in shlex.split(stage["cmd"]) if word.startswith("pipeline/"))
    listed = {d for d in stage["deps"] if isinstance(d, str) and d.startswith("tinyworlds/")}
    needed = code_deps(REPO / script)
    assert script in stage["deps"], f"dvc.yaml: stage {name} does not list its own script {script}"
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing and not extra, (
        f"dvc.yaml: stage {name}'s code deps drifted: missing {missing}, not imported {extra} "
        "(`python tests/test_architecture.py` rewrites them); it should list\n"
        + "\n".join(f"      - {d}" for d in sorted(needed)))


def test_every_stage_script_exists_and_is_thin():
    for name, stage in stages().items():
        script = REPO / next(w for w in shlex.split(stage["cmd"]) if w.startswith("pipeline/"))
        assert script.is_file(), f"stage {name}: {script} is missing"
        assert len(script.read_text().splitlines()) <= 40, f"{script}: a stage entry point stays thin"


def write_code_deps(path: Path = REPO / "dvc.yaml") -> None:
    """Rewrite every stage's tinyworlds/ deps in dvc.yaml to what its script imports, in place,
    keeping the other deps, the comments and the layout: `python tests/test_architecture.py`."""
    wanted = {name: sorted(code_deps(REPO / next(w for w in shlex.split(stage["cmd"]) if w.startswith("pipeline/"))))
              for name, stage in stages().items()}
    lines, out, stage, i = path.read_text().splitlines(keepends=True), [], None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        out.append(line)
        i += 1
        if line.strip() == "deps:" and stage in wanted:
            item = " " * (len(line) - len(line.lstrip()) + 2) + "- "
            block = []
            while i < len(lines) and lines[i].startswith(item):
                block.append(lines[i])
                i += 1
            out += [b for b in block if not b[len(item):].startswith("tinyworlds/")]
            out += [f"{item}{dep}\n" for dep in wanted[stage]]
    path.write_text("".join(out))


if __name__ == "__main__":
    write_code_deps()
    print("dvc.yaml: code deps rewritten from the imports")
