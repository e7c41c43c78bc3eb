"""Train a CNN with synced BatchNorm under DDP, from a YAML config: LeNet on built-in digits, or any
torchvision or timm model on your image folder.

    torchrun --nproc_per_node=2 launch/train.py --config configs/lenet.yaml
    torchrun --nproc_per_node=2 launch/train.py --config configs/resnet18_imagefolder.yaml --set data.root=DIR
    python launch/train.py --config configs/lenet.yaml --set output_dir=runs/lenet_1p
    torchrun --nproc_per_node=2 launch/train.py --config configs/lenet.yaml --resume auto
    srun -N2 -n2 python launch/train.py --config configs/lenet.yaml   # SLURM: ranks from srun, no torchrun

The machinery lives in ``syncnorm.train`` (this file runs ``syncnorm.train.cli.train_main``): user
errors are one line + exit 2, failures of a started run (non-finite loss, a crashed or stuck rank)
one line + exit 1. Under torchrun a failed rank also writes its line to torchrun's error file (its
report's root cause); ``python launch/run.py ...`` (torchrun's options) ends with that line alone and
the rank's exit status. Each run draws ``curves.png``; ``launch/curves.py RUN_DIR`` draws it again.
"""

import os
import sys

try:
    import syncnorm.train  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from syncnorm.train.cli import exit_now  # noqa: E402
from syncnorm.train.cli import train_main as main  # noqa: E402

if __name__ == "__main__":
    exit_now(main())
