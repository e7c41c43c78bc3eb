"""Glue for training frameworks. Each submodule imports its framework; ``import syncnorm`` imports none.

- :mod:`syncnorm.integrations.lightning`: ``SyncNormLayerSync`` for ``lightning.pytorch.Trainer(plugins=[...])``
- :mod:`syncnorm.integrations.pytorch_lightning`: the same for the ``pytorch_lightning`` package

Fabric and HF accelerate need no glue: call :func:`syncnorm.convert_sync_batchnorm` on the model
before ``fabric.setup`` / ``accelerator.prepare`` (see docs/integrations.md).
"""
