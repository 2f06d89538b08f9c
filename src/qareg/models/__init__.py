"""Image classifiers behind one registry, built by `create_model(name, ...)`.

Every registered constructor takes `(num_classes, in_channels, input_size)` and returns an
`nn.Module` mapping `(B, in_channels, input_size, input_size)` images to `(B, num_classes)`
logits. Constructors validate their arguments and raise `ConfigError` on bad values.
"""

# Importing an architecture's file registers it.
from qareg.models import alexnet, cnn, lenet, vgg  # noqa: F401
from qareg.models.registry import MODELS, create_model, list_models, register_model

__all__ = ["MODELS", "create_model", "list_models", "register_model"]
