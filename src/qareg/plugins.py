"""Methods defined outside the package: a Python file that registers them with
`@qareg.methods.register_method` is loaded by `load_plugin` (`qareg train --plugin FILE`,
`qareg bench --plugin FILE`), after which every command and `qareg.bench.Bench` know them."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from qareg.errors import ConfigError
from qareg.methods import list_methods


def load_plugin(path: str | Path) -> list[str]:
    """Run the Python file `path` as a module; returns the method names it added (none when
    loaded again: its classes then replace their earlier selves)."""
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"--plugin {str(path)!r} must be a Python file (.py) that registers "
                          "methods with @qareg.methods.register_method")
    name = "qareg_plugin_" + re.sub(r"\W", "_", str(path.resolve()))
    spec = importlib.util.spec_from_file_location(name, path)
    module: ModuleType = importlib.util.module_from_spec(spec)
    before = set(list_methods())
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]  # a half-run file leaves nothing behind
        if isinstance(error, ConfigError):  # e.g. a method name already taken: said plainly
            raise
        raise ConfigError(f"--plugin {str(path)!r} failed to load: {type(error).__name__}: "
                          f"{error}") from error
    return sorted(set(list_methods()) - before)
