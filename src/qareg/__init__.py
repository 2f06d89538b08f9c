"""qareg: compress neural networks by quantization-aware regularization.

Train with `penalty(model)` added to the loss: it pulls each layer's weights toward a small
codebook of learnable representatives; `convert` then snaps every weight to its nearest one.
"""

from qareg.batchnorm import recalibrate_batchnorm
from qareg.codebook import Codebook, assign
from qareg.compress import (
    CompressedFileError,
    inspect_compressed,
    load_compressed,
    save_compressed,
)
from qareg.errors import ConfigError, DataError, QaregError
from qareg.exact_kmeans import kmeans1d
from qareg.models import create_model, list_models
from qareg.quantize import ConversionReport, convert, penalty, prepare, quantized_tensors
from qareg.straight_through import straight_through

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "CompressedFileError",
    "ConfigError",
    "ConversionReport",
    "DataError",
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
