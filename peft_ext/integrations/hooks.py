"""Run a callback right after an optional library is imported, so peft_ext can
plug into it without importing it (peft alone takes seconds to import)."""
import importlib
import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

_pending = {}  # top-level module name -> [(module path, function name)]


def _run(name):
    for module, function in _pending.pop(name, []):
        try:
            getattr(importlib.import_module(module), function)()
        except Exception:  # a broken bridge must not break the user's import
            logger.exception("peft_ext: could not register with %s (%s.%s)", name, module, function)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for a watched module it asks the other finders and
    wraps the loader so the callbacks run once the module has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                _run(fullname)

            def __getattr__(self, attr):  # get_source, is_package, resource readers
                return getattr(loader, attr)

        spec.loader = _Loader()
        return spec


_finder = _Finder()


def when_imported(name, module, function):
    """Call `module.function()` once the top-level module `name` is imported
    (now, if it already is; never, if it is never imported)."""
    if name in sys.modules:
        _pending.setdefault(name, []).append((module, function))
        _run(name)
        return
    _pending.setdefault(name, []).append((module, function))
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
