"""The package's shape: no import cycles, a core free of integrations, small modules and functions.

Read from the source with ``ast`` (nothing is imported). "Core" is every module of ``branchify``
except ``branchify.integrations`` (framework glue, found through entry points) and
``branchify.recipes`` (the training application built on the public API, like a user's script).
Imports inside functions count everywhere. Imports under ``if TYPE_CHECKING:`` count for import
cycles (a type-only cycle is still two modules that cannot be read apart) but not for the
core -> integration/framework rule (nothing is imported at run time).

Every check is a function of a set of modules, and ``test_each_check_fails_on_a_package_that_breaks_it``
runs each one on a small package written to break it, so a check that can no longer fail is caught.
"""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "branchify"
FRAMEWORKS = ("transformers", "timm", "lightning", "pytorch_lightning")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@functools.lru_cache(maxsize=None)
def _module_names(root: Path) -> frozenset[str]:
    """Every module name under ``root``, listed once per root (``_imports`` asks for each file)."""
    return frozenset(_module_name(p, root) for p in root.rglob("*.py"))


def _imports(path: Path, root: Path = ROOT, *, type_only: bool = False) -> set[str]:
    """Absolute names of every module ``path`` imports (at any depth); imports under
    ``if TYPE_CHECKING:`` only with ``type_only``."""
    known = _module_names(root)
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_only:
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                # "from pkg import submodule" depends on the submodule (pkg, its parent, is already being
                # imported); "from pkg import name" on pkg itself, whose __init__ must have run.
                subs = {f"{target}.{a.name}" for a in child.names}
                found.update(subs if subs <= known else subs | {target})
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


MODULES = _modules(ROOT)
CORE = {m: p for m, p in MODULES.items()
        if not m.startswith(("branchify.integrations", "branchify.recipes"))}


def _graph(modules: dict[str, Path], root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, type-only imports included."""
    return {m: {t for t in _imports(p, root, type_only=True) if t in modules and t != m} for m, p in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                cycle = dfs(t)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = dfs(m)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_branchify_modules():
    # Type-only imports included: describe.py and views.py type the model without importing model.py back.
    cycle = _find_cycle(_graph(MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_imports_neither_integrations_nor_frameworks(module):
    bad = [t for t in _imports(CORE[module])
           if t.startswith("branchify.integrations") or t.startswith("branchify.recipes")
           or t.split(".")[0] in FRAMEWORKS]
    assert not bad, f"{module} imports {bad}"


def test_modules_and_functions_are_small():
    big, long_functions = [], []
    for module, path in MODULES.items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            big.append(f"{module} ({source.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name} ({length} lines)")
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_import_branchify_imports_no_framework():
    code = ("import sys, branchify, branchify.methods, branchify.registry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (FRAMEWORKS,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_public_namespace_is_what_it_exports():
    import branchify as bf

    public = {n for n in dir(bf) if not n.startswith("_")}
    submodules = {n for n in public if type(getattr(bf, n)).__name__ == "module"}
    assert public - submodules == set(bf.__all__) - submodules
    assert not {"nn", "annotations", "torch"} & public


TEXT_SUFFIXES = (".py", ".md", ".ipynb", ".toml", ".yaml", ".yml")
OUTSIDE_DOCUMENTS = ("METHODS" + ".md", "../" + "shared", "/work/" + "shared")  # split: no self-match


def _tracked_text_files() -> list[Path]:
    repo = ROOT.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): every text file there
        return [p for p in repo.rglob("*") if p.suffix in TEXT_SUFFIXES and ".venv" not in p.parts]
    return [repo / name for name in listed.stdout.split("\0") if name.endswith(TEXT_SUFFIXES)]


def _outside_references(files: list[Path], repo: Path) -> list[str]:
    return [f"{p.relative_to(repo).as_posix()}: {needle}" for p in files if p.is_file()
            for needle in OUTSIDE_DOCUMENTS if needle in p.read_text(errors="replace")]


def test_no_reference_to_documents_outside_the_repository():
    files = _tracked_text_files()
    assert any(p.name == "README.md" for p in files), "found no tracked text file: wrong repository root?"
    bad = _outside_references(files, ROOT.parent)
    assert not bad, f"formulas and sources belong inside the repository (docs/methods/), found: {bad}"


def _exception_classes(modules: dict[str, Path]) -> dict[str, tuple[str, list[str]]]:
    """Every class the package defines whose bases (transitively, by name) include a builtin
    exception: ``{name: (module, base names)}``."""
    import builtins

    builtin_errors = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    classes: dict[str, tuple[str, list[str]]] = {}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
                classes[node.name] = (module, bases)
    errors = dict.fromkeys(builtin_errors)
    changed = True
    while changed:  # fixed point: a class is an exception when one of its bases is
        changed = False
        for name, (_, bases) in classes.items():
            if name not in errors and any(b in errors for b in bases):
                errors[name] = None
                changed = True
    return {n: classes[n] for n in errors if n in classes}


def _errors_outside_the_base(modules: dict[str, Path]) -> list[str]:
    found = _exception_classes(modules)

    def derives(name: str) -> bool:
        if name == "BranchifyError":
            return True
        return name in found and any(derives(b) for b in found[name][1])

    return [f"{module}.{name}" for name, (module, _) in found.items() if not derives(name)]


def test_every_exception_derives_from_branchify_error():
    found = _exception_classes(MODULES)
    assert {"SpecError", "TraceError", "MethodError", "RankFailed", "HFTracerError"} <= set(found), sorted(found)
    bad = _errors_outside_the_base(MODULES)
    assert not bad, f"exceptions that do not derive from branchify.errors.BranchifyError: {bad}"


def test_errors_keep_their_builtin_base():
    import branchify as bf
    from branchify.methods import MethodError

    assert issubclass(bf.SpecError, ValueError) and issubclass(bf.SpecError, bf.BranchifyError)
    assert issubclass(bf.TraceError, RuntimeError) and issubclass(MethodError, ValueError)
    with pytest.raises(bf.BranchifyError, match="unknown"):
        bf.method("no_such_method", __import__("torch").nn.Linear(2, 2))


def _all_names(path: Path) -> list[str]:
    """The string entries of every ``__all__ = [...]`` / ``__all__ += [...]`` in a module."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            names += [e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return names


def _private_names_in_all(modules: dict[str, Path]) -> list[str]:
    return [f"{module}: {name}" for module, path in modules.items() for name in _all_names(path)
            if name.startswith("_")]


def test_no_private_name_in_any_all():
    assert sum(len(_all_names(p)) for p in MODULES.values()) > 50, "found almost no __all__: is the parser broken?"
    bad = _private_names_in_all(MODULES)
    assert not bad, f"private names in __all__ (rename them public or drop them): {bad}"


def test_integrations_import_no_core_private_name():
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("branchify.integrations"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("branchify") \
                    and not node.module.startswith("branchify.integrations"):
                bad += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, f"integrations importing core private names (give them a public home): {bad}"


def _benchmark_drivers(modules: dict[str, Path]) -> list[str]:
    return [m for m in modules if "benchmark" in m]


def test_no_benchmark_driver_in_the_package():
    # Benchmark drivers are applications of the package (they live in benchmarks/ at the repository
    # root and may import branchify); the wheel ships none of them.
    assert len(MODULES) > 20, "found almost no modules: wrong package root?"
    drivers = _benchmark_drivers(MODULES)
    assert not drivers, f"benchmark drivers inside the package (move them to benchmarks/): {drivers}"


def test_each_check_fails_on_a_package_that_breaks_it(tmp_path):
    root = tmp_path / "pkg"
    sources = {
        "__init__.py": '__all__ = ["_hidden", "shown"]\n',
        "a.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .b import B\n",  # type-only
        "b.py": "from .a import A\n",
        "errors.py": ("class BranchifyError(Exception): ...\nclass GoodError(BranchifyError, ValueError): ...\n"
                      "class LoneError(ValueError): ...\n"),
        "tools/__init__.py": "",
        "tools/benchmark_speed.py": "",
        "README.md": f"The formulas are in {OUTSIDE_DOCUMENTS[0]}.\n",
    }
    for name, text in sources.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    modules = _modules(root)
    assert _find_cycle(_graph(modules, root)) == ["pkg.a", "pkg.b", "pkg.a"]
    run_time = {m: {t for t in _imports(p, root) if t in modules and t != m} for m, p in modules.items()}
    assert _find_cycle(run_time) is None  # the cycle above runs through the type-only import alone
    assert _private_names_in_all(modules) == ["pkg: _hidden"]
    assert _errors_outside_the_base(modules) == ["pkg.errors.LoneError"]
    assert _benchmark_drivers(modules) == ["pkg.tools.benchmark_speed"]
    assert _outside_references(sorted(root.rglob("*.md")), tmp_path) == [f"pkg/README.md: {OUTSIDE_DOCUMENTS[0]}"]


TREE_HOME = "branchify.tree"  # the tree vocabulary: node paths, segment keys, the child-0 rule


def _tree_vocabulary_restated(path: Path) -> list[str]:
    """Places in a module that spell out the tree vocabulary instead of importing it from ``branchify.tree``:
    the trunk's segment key as a literal, a ``Path``/``TreePath`` alias of its own, a ``model_key``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value == "trunk":
            found.append(f'line {node.lineno}: the literal "trunk" (use tree.TRUNK_KEY / segment_key)')
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if {"Path", "TreePath"} & set(names) and "tuple" in ast.unparse(node.value or ast.Constant(None)):
                found.append(f"line {node.lineno}: a tree-path alias {names} (use tree.TreePath)")
        elif isinstance(node, ast.FunctionDef) and node.name in ("model_key", "segment_key"):
            found.append(f"line {node.lineno}: def {node.name} (use tree.segment_key)")
    return found


def test_tree_vocabulary_has_one_home():
    assert _tree_vocabulary_restated(MODULES[TREE_HOME]), "the vocabulary's home defines none of it: parser broken?"
    bad = [f"{module} {where}" for module, path in MODULES.items() if module != TREE_HOME
           for where in _tree_vocabulary_restated(path)]
    assert not bad, f"the tree vocabulary restated outside {TREE_HOME}: {bad}"
