"""Every compression method on one harness (`qareg.methods.base`), registered by name.

Importing this package registers them all: qareg and the baselines it is compared with.
"""

# Importing a method's module registers it.
from qareg.methods import (  # noqa: F401
    codebook_methods,  # qareg, ptq-kmeans, fp
    cpq,
    dkm,
    gradl1,
    lsq,
    uniform,  # ptq-uniform
)
from qareg.methods.base import (
    METHODS,
    Method,
    Progress,
    attach_codebooks,
    check_bits,
    create_method,
    list_methods,
    register_method,
    snap_with,
)

__all__ = [
    "METHODS",
    "Method",
    "Progress",
    "attach_codebooks",
    "check_bits",
    "create_method",
    "list_methods",
    "register_method",
    "snap_with",
]
