"""qareg: compress neural networks by quantization-aware regularization.

Train with `penalty(model)` added to the loss: it pulls each layer's weights toward a small
codebook of learnable representatives; `convert` then snaps every weight to its nearest one.
"""

from qareg.batchnorm import recalibrate_batchnorm
from qareg.cluster1d import kmeans1d
from qareg.codebook import Codebook
from qareg.compress import (
    CompressedFileError,
    inspect_compressed,
    load_compressed,
    save_compressed,
)
from qareg.errors import ConfigError, DataError, NotPreparedError, QaregError
from qareg.models import create_model, list_models
from qareg.nearest import assign
from qareg.quantize import ConversionReport, convert, penalty, prepare, quantized_tensors
from qareg.straight_through import straight_through
from qareg.version import __version__

__all__ = [
    "__version__",
    "Codebook",
    "CompressedFileError",
    "ConfigError",
    "ConversionReport",
    "DataError",
    "NotPreparedError",
    "QaregError",
    "assign",
    "convert",
    "create_model",
    "inspect_compressed",
    "kmeans1d",
    "list_models",
    "load_compressed",
    "penalty",
    "prepare",
    "quantized_tensors",
    "recalibrate_batchnorm",
    "save_compressed",
    "straight_through",
]
