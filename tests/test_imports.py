"""No import cycle inside peft_ext: the graph of every import statement in the
package (function-level ones included) is acyclic, and every submodule
imports in a fresh interpreter in several orders. A cycle fails here even
where ruff (`ruff check peft_ext`, PLC0415) does not run."""
import ast
import os
import subprocess
import sys

import pytest

import peft_ext

PACKAGE_DIR = os.path.dirname(os.path.abspath(peft_ext.__file__))
ROOT = os.path.dirname(PACKAGE_DIR)


def module_files():
    """{dotted module name: path} of every .py file in the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def imports_of(name, path, known):
    """The package modules `name` imports anywhere in its file."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                target = f"{base}.{a.name}"
                found.add(target if target in known else base)
    return {m for m in found if m in known and m != name}


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def import_graph():
    files = module_files()
    known = set(files) | {"peft_ext._C", "peft_ext._build"}
    graph = {name: imports_of(name, path, known) for name, path in files.items()}
    graph["peft_ext._C"] = set()  # the compiled library imports nothing from the package
    graph["peft_ext._build"] = set()  # written by setup.py: constants only
    return graph


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    for leaf in ("peft_ext._modules", "peft_ext._report", "peft_ext.formats", "peft_ext.reference"):
        assert graph[leaf] == set(), f"{leaf} must import nothing from peft_ext, imports {graph[leaf]}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("order", ["sorted", "reversed", "leaves_first"])
def test_every_submodule_imports_in_a_fresh_interpreter(order):
    graph = import_graph()
    # peft_ext._build exists only where setup.py wrote it (not in a hand-copied build).
    generated = set() if os.path.exists(os.path.join(ROOT, "peft_ext", "_build.py")) else {"peft_ext._build"}
    names = sorted(n for n in graph if n != "peft_ext.__main__" and n not in generated)
    if order == "reversed":
        names.reverse()
    elif order == "leaves_first":
        names.sort(key=lambda n: (len(graph[n]), n))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"importing {names} in this order failed:\n{result.stderr}"
