"""Draw a run's loss and accuracy per epoch (train and test) from its metrics.jsonl into a PNG.

    python launch/curves.py runs/lenet                  # writes runs/lenet/curves.png
    python launch/curves.py runs/lenet --out lenet.png

Every run of launch/train.py already writes RUN_DIR/curves.png; this draws it again, for any run
directory. Needs matplotlib (pip install -e '.[train]'). The machinery is ``syncnorm.train.curves``.
"""

import os
import sys

try:
    import syncnorm.train  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from syncnorm.train.curves import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
