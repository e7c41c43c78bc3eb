"""SyncBatchNorm in a Lightning Trainer on 2 CPU processes: one plugin instead of sync_batchnorm=True.

    python examples/lightning_cpu.py            # syncnorm's plugin: trains, both ranks agree
    python examples/lightning_cpu.py --stock    # Trainer(sync_batchnorm=True): fails on CPU

Needs: pip install -e '.[lightning]'
"""

import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from syncnorm.integrations.lightning import SyncNormLayerSync


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 2))

    def training_step(self, batch, batch_index):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(256, 1, 12, 12, generator=generator)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def main():
    stock = "--stock" in sys.argv[1:]
    torch.manual_seed(0)  # the same weights on every run (Lightning starts rank 1 by rerunning this script)
    model = Classifier()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=5,
        **({"sync_batchnorm": True} if stock else {"plugins": [SyncNormLayerSync()]}),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)
    # After fit the plugin has given the model its plain BatchNorm2d back; its statistics are global.
    print(f"rank {trainer.global_rank}: {type(model.net[1]).__name__} running_mean[:3] = "
          f"{model.net[1].running_mean[:3].tolist()}", flush=True)


if __name__ == "__main__":
    main()
