"""Weight-initialization registry: ``model.init`` name -> scheme for conv and linear weights.

Every scheme except ``default`` (PyTorch's own per-layer init) re-initializes the weight of each
``Conv*d`` and ``Linear`` layer and sets its bias to zero. Normalization layers keep weight 1, bias 0.
"""

from typing import Callable, Dict

from torch import nn

# Gain for the kaiming schemes: the models use ReLU-family activations by default.
_KAIMING = {"mode": "fan_in", "nonlinearity": "relu"}

INITS: Dict[str, Callable] = {
    "default": None,
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, **_KAIMING),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, **_KAIMING),
    "orthogonal": nn.init.orthogonal_,
}

INIT_NAMES = tuple(INITS)

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def init_weights(model: nn.Module, name: str) -> nn.Module:
    """Apply scheme ``name`` to every conv/linear layer of ``model`` (in place) and return it.

    Uses the global torch RNG, so seed it first for reproducible weights.
    """
    if name not in INITS:
        raise ValueError(f"expected an init name, one of {', '.join(INIT_NAMES)} (got {name!r})")
    scheme = INITS[name]
    if scheme is None:
        return model
    for layer in model.modules():
        if isinstance(layer, _WEIGHTED):
            scheme(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return model
