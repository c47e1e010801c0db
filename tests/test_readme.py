"""The README's python snippets marked `<!-- test -->` run, the docstrings'
examples (doctests) of the public API run, and docs/API.md matches the
docstrings it is generated from."""
import doctest
import importlib
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
GENERATOR = os.path.join(ROOT, "docs", "generate.py")
MARK = re.compile(r"<!-- test -->\s*\n```python\n(.*?)\n```", re.S)


def _snippets():
    if not os.path.exists(README):
        return []
    with open(README) as f:
        return MARK.findall(f.read())


def test_readme_has_tested_snippets():
    if not os.path.exists(README):
        pytest.skip("README.md is not beside tests/")
    assert _snippets(), "no `<!-- test -->` snippet found in README.md"


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index, monkeypatch, tmp_path):
    code = _snippets()[index]
    for module in re.findall(r"^\s*(?:from|import) ([\w]+)", code, re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def _public_objects():
    sys.path.insert(0, os.path.dirname(GENERATOR))
    try:
        generate = importlib.import_module("generate")
    finally:
        sys.path.pop(0)
    found = []
    for module_name, names, needs in generate.SECTIONS:
        if needs is not None and importlib.util.find_spec(needs) is None:
            continue
        module = importlib.import_module(module_name)
        for name in names or [n for n in getattr(module, "__all__", []) if not n.startswith("__")]:
            found.append((f"{module_name}.{name}", getattr(module, name)))
    return generate, found


def test_docstring_examples_run():
    if not os.path.exists(GENERATOR):
        pytest.skip("docs/ is not beside tests/")
    _, objects = _public_objects()
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    ran = 0
    for qualname, obj in objects:
        for test in finder.find(obj, qualname):
            if test.examples:
                ran += 1
                runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed (output above)"
    assert ran > 0


def test_api_reference_is_up_to_date():
    if not os.path.exists(GENERATOR):
        pytest.skip("docs/ is not beside tests/")
    generate, _ = _public_objects()
    with open(generate.OUT) as f:
        assert f.read() == generate.render(), "docs/API.md is stale: run `make docs` (python docs/generate.py)"
