"""Run an integration module right after a third-party package is imported.

peft_ext must not import transformers itself (seconds of import time, and not
a dependency), yet its quantizer has to be registered before the first
from_pretrained reads a config that names it. A one-shot meta-path finder
wraps the package's loader: when the package finishes importing, the
integration module is imported too. If the package is already imported, the
integration is imported at once.
"""
import importlib
import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)


def _import_integration(module_name):
    try:
        importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001  (an integration must never break the user's import)
        log.warning("peft_ext: could not load %s (%s: %s)", module_name, type(error).__name__, error)


class _AfterImport(importlib.abc.MetaPathFinder):
    # Stays in sys.meta_path until the package really executes: a bare
    # importlib.util.find_spec(package) probe (transformers does this for peft)
    # must not use it up.
    def __init__(self, package, integration):
        self.package = package
        self.integration = integration
        self.busy = False

    def find_spec(self, name, path=None, target=None):
        if name != self.package or self.busy:
            return None
        self.busy = True  # the real finders answer the lookup below, not this one
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_integrate(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _import_integration(self.integration)

        spec.loader.exec_module = exec_then_integrate
        return spec


def on_import(package: str, integration: str) -> None:
    """Import `integration` as soon as `package` is imported (now, if it already is).
    Does nothing when `package` is not installed."""
    if package in sys.modules:
        _import_integration(integration)
    elif importlib.util.find_spec(package) is not None:
        sys.meta_path.insert(0, _AfterImport(package, integration))


def after_patch(model) -> None:
    """Called by patch() and unpatch(): lets the loaded integrations record what
    changed (transformers: the save format of a patched model, see
    peft_ext.integrations.transformers.sync). Imports nothing."""
    hf = sys.modules.get("peft_ext.integrations.transformers")
    if hf is not None:
        hf.sync(model)
