"""Training machinery behind ``launch/train.py`` and ``launch/eval.py``.

Each module one job, layers bottom up (each imports only those below it):

* ``errors`` (exceptions); ``norms``, ``inits``, ``data``; ``models``; ``config`` (YAML -> typed config)
* ``failures`` (what a failed collective means); ``network`` (gloo's interface); ``distributed`` (process
  group, threads, DDP)
* ``checkpoint`` (atomic save, safe load); ``rundir`` (checks; config.yaml, metrics.jsonl); ``ui`` (what rank 0 prints; every
  rank's log)
* ``build`` (data, model, optimizer from the config); ``resume`` (restore from a checkpoint)
* ``epoch`` (one step, one epoch, evaluation)
* ``loop`` (the run: set up -> restore -> start -> epochs -> finish)
* ``evaluation`` (a checkpoint in one process); ``cli`` (command lines, exit codes)
"""

from syncnorm.train.config import Config, load_config
from syncnorm.train.errors import CheckpointError, ConfigError, DataError

__all__ = ["CheckpointError", "Config", "ConfigError", "DataError", "load_config"]
