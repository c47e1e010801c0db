"""Writes docs/API.md from the docstrings of peft_ext's public API.

    python docs/generate.py           # rewrite docs/API.md
    python docs/generate.py --check   # exit 1 if docs/API.md is stale (tests/test_readme.py)

The public API is what `peft_ext.__all__` exports and the integrations whose third-party package is installed. Each
entry gets its signature and its docstring; the `Example:` sections are
doctests, run by tests/test_readme.py.
"""
import argparse
import importlib
import importlib.util
import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "API.md")

# (module, names or None for its __all__, the package it needs or None)
SECTIONS = [
    ("peft_ext", None, None),
    ("peft_ext.integrations.transformers", ["PeftExtConfig", "attach", "detach", "sync"], "transformers"),
]


def _signature(obj):
    try:
        target = obj.__init__ if inspect.isclass(obj) else obj
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return ""
    params = list(sig.parameters.values())
    if inspect.isclass(obj) and params and params[0].name == "self":
        params = params[1:]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _entry(module_name, name, obj):
    kind = "class" if inspect.isclass(obj) else ("module" if inspect.ismodule(obj) else "function")
    lines = [f"### `{module_name}.{name}`", ""]
    if kind == "module":
        lines += [f"module `{obj.__name__}`", ""]
    else:
        lines += ["```python", f"{'class ' if kind == 'class' else ''}{name}{_signature(obj)}", "```", ""]
    doc = inspect.getdoc(obj) or "(no docstring)"
    lines += [doc, ""]
    if kind == "class":
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_"):
                continue
            func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            # Own docstrings only: inspect.getdoc would repeat nn.Module's.
            if inspect.isfunction(func) and func.__doc__:
                lines += [f"#### `{name}.{attr}{_signature(func)}`", "", inspect.cleandoc(func.__doc__), ""]
            elif isinstance(member, property) and member.__doc__:
                lines += [f"#### `{name}.{attr}` (property)", "", inspect.cleandoc(member.__doc__), ""]
    return lines


def _has_example(obj):
    return ">>>" in (inspect.getdoc(obj) or "")


def render():
    lines = ["# peft_ext API reference", "",
             "Generated from the docstrings by `docs/generate.py` (`make docs`); do not edit by hand.",
             "`Example:` blocks are doctests, run by `tests/test_readme.py`.", ""]
    body, missing = [], []
    for module_name, names, needs in SECTIONS:
        if needs is not None and importlib.util.find_spec(needs) is None:
            continue
        module = importlib.import_module(module_name)
        names = names or sorted(n for n in getattr(module, "__all__", []) if not n.startswith("__"))
        body += [f"## `{module_name}`", ""]
        summary = (inspect.getdoc(module) or "").split("\n\n")[0]
        if summary:
            body += [summary, ""]
        for name in names:
            obj = getattr(module, name)
            body += _entry(module_name, name, obj)
            if not inspect.ismodule(obj) and not _has_example(obj):
                missing.append(f"`{module_name}.{name}`")
    if missing:
        lines += ["Without an example so far: " + ", ".join(missing) + ".", ""]
    return "\n".join(lines + body).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if docs/API.md is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = open(OUT).read() if os.path.exists(OUT) else ""
        if current != text:
            sys.exit("docs/API.md is stale: run `make docs` (python docs/generate.py)")
        return
    with open(OUT, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
