"""Evaluate a training checkpoint on the full test set, in one process, with plain BatchNorm.

    python launch/eval.py --checkpoint runs/lenet/ckpt_epoch5.pt
    python launch/eval.py --checkpoint runs/lenet            # newest good checkpoint of a run dir
    python launch/eval.py --checkpoint PATH --set data.root=/data --json
    python launch/eval.py --checkpoint PATH --export lenet_plain.pt   # weights for a plain-BN model

The machinery lives in ``syncnorm.train`` (this file runs ``syncnorm.train.cli.eval_main``).
"""

import os
import sys

try:
    import syncnorm.train  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from syncnorm.train.cli import eval_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
