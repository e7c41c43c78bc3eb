"""Training machinery behind ``launch/train.py``: config, data, models, norms, inits, loop, checkpoints.

Layers, bottom up (each imports only those below it): ``errors``; ``norms``, ``inits``, ``data``;
``models``; ``config``; ``checkpoint``, ``ui``; ``loop``.
"""

from syncnorm.train.config import Config, load_config
from syncnorm.train.errors import CheckpointError, ConfigError, DataError

__all__ = ["CheckpointError", "Config", "ConfigError", "DataError", "load_config"]
