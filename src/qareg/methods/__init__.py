"""Every compression method on one harness (`qareg.methods.base`), registered by name.

Each method is one module of this package; importing the package imports them all, which
registers them. A method defined elsewhere registers itself the same way, with
`@register_method` (see the README: "Adding a method").
"""

import importlib
import pkgutil

from qareg.methods.base import (
    METHODS,
    Method,
    NoOptions,
    Progress,
    attach_codebooks,
    create_method,
    list_methods,
    register_method,
    snap_with,
)

_HARNESS = {"base", "parametrized"}  # the modules that define no method
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _HARNESS:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "Method",
    "NoOptions",
    "Progress",
    "attach_codebooks",
    "create_method",
    "list_methods",
    "register_method",
    "snap_with",
]
