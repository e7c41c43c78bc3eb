"""Evaluate a training checkpoint on the full test set, in one process, with plain BatchNorm.

    python launch/eval.py --checkpoint runs/lenet/ckpt_epoch5.pt
    python launch/eval.py --checkpoint runs/lenet            # newest good checkpoint of a run dir
    python launch/eval.py --checkpoint PATH --set data.root=/data --json
    python launch/eval.py --checkpoint PATH --export lenet_plain.pt   # weights for a plain-BN model
"""

import argparse
import json
import os
import sys

try:
    import syncnorm.train  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from syncnorm.train.errors import ConfigError  # noqa: E402
from syncnorm.train.ui import error_line  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="ckpt_epoch{N}.pt, or a run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the checkpoint's config (e.g. data.root)")
    parser.add_argument("--export", metavar="PATH",
                        help="also save the plain-BatchNorm model's state_dict to PATH (load it into a model "
                             "built with model.norm=bn)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)

    from syncnorm.train.loop import evaluate_checkpoint
    from syncnorm.train.ui import Reporter

    try:
        result = evaluate_checkpoint(args.checkpoint, args.overrides, Reporter(), export=args.export)
    except ConfigError as error:
        error_line(str(error))
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['checkpoint']} (epoch {result['epoch']}, {result['model']} + {result['norm']} as plain "
              f"BatchNorm): test accuracy {result['test_acc']:.2%} ({result['test_correct']}/"
              f"{result['test_count']}) on {result['dataset']}, test loss {result['test_loss']:.4f}")
        if args.export:
            print(f"plain-BatchNorm state_dict written to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
