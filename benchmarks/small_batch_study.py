"""Small per-rank batches: does SyncBN recover large-batch accuracy? LeNet on mnist5k, test accuracy.

For every per-rank batch ``b`` in ``--batches`` (default 2 4 8 32), every norm in ``--norms`` (default
bn, bn-precise, syncbn, gn) and every seed in ``--seeds`` (default 0 1 2), LeNet is trained through the real loop
(``syncnorm.train.loop.train``, DDP over ``--world-size`` gloo CPU ranks, default 2, one thread per
rank) and its final test accuracy on the 1,000 held-out mnist5k digits is recorded. A reference run,
``bn`` in **one** process with batch ``W*b`` (BatchNorm over the whole global batch), is trained for
every ``b`` and seed as well: SyncBN computes exactly that BatchNorm, and with the same seed both see
the same samples in each step, so the two should agree up to float rounding.

``bn-precise`` trains exactly as ``bn`` (same seed, same steps) and then, before each evaluation,
recomputes the BatchNorm statistics over the whole training set with ``syncnorm.update_bn_stats``
(``train.precise_bn_batches``; the pass uses the training batches, so each layer still normalizes with
its rank's ``b`` samples while the statistics are gathered): it tells whether local BN's small-batch
damage is in its running statistics or in the training itself.

Fair-shot rules, identical for every norm:

* a fixed sample budget: ``--epochs`` (default 2) passes over the 4,000-digit train split for every
  config (drop_last drops at most one incomplete global batch per epoch, < 64 samples);
* SGD, momentum 0.9, weight decay 5e-4, cosine schedule over the epochs, and the linear scaling rule
  ``lr = --base-lr * global_batch / 64`` (default base 0.1 at global batch 64): the LR depends only on
  the global batch, so a config and its 1-process reference get the same LR.

    python benchmarks/small_batch_study.py            # ~10 minutes on 2 cores
    python benchmarks/small_batch_study.py --quick    # smoke run, ~2 minutes
    python benchmarks/small_batch_study.py --world-size 4   # oversubscribes a 2-core box, slow
    python benchmarks/small_batch_study.py --norms bn-precise --no-reference --keep-results --update-results
                                                      # one column added to the committed results
    python benchmarks/small_batch_study.py --norms syncbn_act --no-reference --keep-results --update-results
                                                      # SyncBatchNormAct (LeNet with LeakyReLU), likewise

Results: a rich table on stdout and, under ``runs/benchmarks/`` (``--update-results``: the committed
``benchmarks/results/``), ``small_batch_study.json`` (every run), ``small_batch_study.md`` (mean +- std
table) and ``small_batch_study.png`` (accuracy vs per-rank batch, one line per norm).
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import launch, results_path, under_torchrun  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "lenet.yaml")
REF = "bn-global"  # the reference: bn, 1 process, batch W*b
PRECISE = "bn-precise"  # local bn training, then exact statistics over the whole training set
LABELS = {"bn": "bn (local, per rank)", PRECISE: "bn + precise BN", "syncbn": "syncbn",
          "syncbn_act": "syncbn_act (LeakyReLU)", "gn": "gn",
          "ln": "ln", "none": "none", REF: "bn, 1 process, batch W*b"}
ORDER = list(LABELS)  # column order of the tables and the plot
# train.precise_bn_batches of the precise config: more than any epoch has, so the pass covers every
# training batch of every rank (the loader ends first).
ALL_BATCHES = 1_000_000


def lr_for(global_batch: int, base_lr: float) -> float:
    return base_lr * global_batch / 64


def train_once(norm: str, batch: int, seed: int, global_batch: int, args: argparse.Namespace) -> Dict:
    """One run of ``syncnorm.train.loop.train`` in the current process (group or not)."""
    from syncnorm.train.config import load_config
    from syncnorm.train.loop import train
    from syncnorm.train.ui import Reporter

    out_dir = tempfile.mkdtemp(prefix="small-batch-")
    lr = lr_for(global_batch, args.base_lr)
    start = time.perf_counter()
    try:
        precise = ALL_BATCHES if norm == PRECISE else 0
        # syncbn_act fuses BatchNorm with a LeakyReLU (SyncBatchNormAct): LeNet is built with that activation.
        act = ["model.act=leaky_relu"] if norm == "syncbn_act" else []
        cfg = load_config(CONFIG, [
            f"model.norm={'bn' if norm == PRECISE else norm}", f"train.precise_bn_batches={precise}",
            "data.name=mnist5k", f"train.batch_size={batch}", f"train.epochs={args.epochs}",
            f"train.lr={lr!r}", "train.momentum=0.9", "train.weight_decay=0.0005", "train.schedule=cosine",
            f"train.seed={seed}", "train.keep_checkpoints=1", f"output_dir={out_dir}", *act,
        ])
        result = train(cfg, reporter=Reporter(enabled=False))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    last = result.metrics[-1]
    return {"norm": norm, "per_rank_batch": batch, "global_batch": global_batch, "seed": seed, "lr": lr,
            "test_acc": last["test_acc"], "test_loss": last["test_loss"], "train_acc": last["train_acc"],
            "samples_seen": sum(m["samples"] for m in result.metrics),
            "seconds": time.perf_counter() - start}


def ranks_body(rank: int, world_size: int, jobs: Sequence, args: argparse.Namespace) -> List[Dict]:
    """Every multi-rank run, one after the other, in one process group; rank 0 reports progress."""
    rows = []
    for i, (norm, batch, seed) in enumerate(jobs):
        row = train_once(norm, batch, seed, batch * world_size, args)
        row["world_size"] = world_size
        rows.append(row)
        if rank == 0:
            print(f"  [{i + 1:2d}/{len(jobs)}] {world_size} ranks  {norm:<6} b={batch:<3d} seed={seed}  "
                  f"test acc {row['test_acc']:.2%}  ({row['seconds']:.0f} s)", flush=True)
    return rows


def _reference_job(job) -> Dict:
    batch, world_size, seed, args = job
    torch.set_num_threads(1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # one plain process, no group
        os.environ.pop(name, None)
    row = train_once("bn", batch * world_size, seed, batch * world_size, args)
    row.update(norm=REF, per_rank_batch=batch, world_size=1)
    return row


def run_references(jobs: Sequence, args: argparse.Namespace, workers: int) -> List[Dict]:
    """The 1-process reference runs, ``workers`` at a time (one thread each)."""
    rows = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for i, row in enumerate(pool.imap(_reference_job, [(b, w, s, args) for b, w, s in jobs])):
            rows.append(row)
            print(f"  [{i + 1:2d}/{len(jobs)}] 1 process {'bn':<6} b={row['global_batch']:<3d} seed={row['seed']}"
                  f"  test acc {row['test_acc']:.2%}  ({row['seconds']:.0f} s)", flush=True)
    return rows


def summarize(runs: List[Dict], norms: Sequence[str], batches: Sequence[int]) -> Dict:
    table = {}
    for norm in norms:
        for batch in batches:
            accs = [r["test_acc"] for r in runs if r["norm"] == norm and r["per_rank_batch"] == batch]
            if accs:
                table.setdefault(norm, {})[str(batch)] = {
                    "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs), "accs": accs}
    return table


def markdown(summary: Dict, norms: Sequence[str], batches: Sequence[int], world_size: int,
             base_lr: float) -> str:
    head = ["per-rank batch", "global batch", "lr"] + [LABELS[n].replace("W*b", f"{world_size}*b") for n in norms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for b in batches:
        g = b * world_size
        cells = [str(b), str(g), f"{lr_for(g, base_lr):g}"]
        for n in norms:
            s = summary.get(n, {}).get(str(b))
            cells.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: Dict, norms: Sequence[str], batches: Sequence[int], world_size: int, epochs: int,
         seeds: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"bn": ("tab:red", "o", "-"), PRECISE: ("tab:orange", "D", ":"), "syncbn": ("tab:blue", "s", "-"),
              "syncbn_act": ("tab:purple", "v", "-."), "gn": ("tab:green", "^", "-"), REF: ("black", "x", "--")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for i, norm in enumerate(norms):
        rows = summary.get(norm, {})
        xs = [b for b in batches if str(b) in rows]
        if not xs:
            continue
        means = [100 * rows[str(b)]["mean"] for b in xs]
        stds = [100 * rows[str(b)]["std"] for b in xs]
        color, marker, line = styles.get(norm, (None, "o", "-"))
        shifted = [x * (1 + 0.04 * (i - (len(norms) - 1) / 2)) for x in xs]  # de-overlap error bars
        ax.errorbar(shifted, means, yerr=stds, label=LABELS[norm].replace("W*b", f"{world_size}*b"),
                    color=color, marker=marker, linestyle=line, capsize=3, markersize=5, linewidth=1.4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batches))
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel(f"per-rank batch size ({world_size} ranks; global batch = {world_size} x per-rank)")
    ax.set_ylabel("test accuracy (%), mean ± std")
    ax.set_title(f"LeNet on mnist5k: {epochs} epochs, {seeds} seeds, lr = 0.1 x global batch / 64", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: Dict, norms: Sequence[str], batches: Sequence[int], world_size: int, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("per-rank batch", justify="right")
    table.add_column("global", justify="right")
    for n in norms:
        table.add_column(LABELS[n].replace("W*b", f"{world_size}*b"), justify="right")
    for b in batches:
        cells = [str(b), str(b * world_size)]
        for n in norms:
            s = summary.get(n, {}).get(str(b))
            cells.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "")
        table.add_row(*cells)
    Console(width=max(110, shutil.get_terminal_size((110, 24)).columns)).print(table)


def _earlier_runs(path: str, ran: Sequence[str], args: argparse.Namespace) -> List[Dict]:
    """``--keep-results``: the runs of ``path`` for the configs not run now, after checking that they
    were measured with the same settings (else the columns would not compare)."""
    with open(path, encoding="utf-8") as f:
        earlier = json.load(f)
    old = earlier["settings"]
    for key in ("world_size", "epochs", "base_lr"):
        if old.get(key) != getattr(args, key):
            raise SystemExit(f"--keep-results: {path} has {key}={old.get(key)} (this run: {getattr(args, key)}); "
                             "run every config again instead")
    return [r for r in earlier["runs"] if r["norm"] not in ran]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[2, 4, 8, 32], help="per-rank batch sizes")
    p.add_argument("--norms", nargs="+", default=["bn", PRECISE, "syncbn", "gn"],
                   choices=["bn", PRECISE, "syncbn", "syncbn_act", "gn", "ln", "none"],
                   help=f"configs of the multi-rank runs ({PRECISE}: bn, then train.precise_bn_batches over the "
                        "whole training set before each evaluation)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--world-size", type=int, default=2, help="ranks of the multi-rank runs (default 2)")
    p.add_argument("--epochs", type=int, default=2, help="sample budget, in epochs of the 4,000-digit train split")
    p.add_argument("--base-lr", type=float, default=0.1, help="lr at global batch 64 (linear scaling)")
    p.add_argument("--no-reference", action="store_true", help="skip the 1-process bn runs at batch W*b")
    p.add_argument("--keep-results", action="store_true",
                   help="start from the runs in the output's existing .json and replace only the configs run "
                        "now (e.g. --norms bn-precise --no-reference adds that column to the committed study)")
    p.add_argument("--quick", action="store_true", help="smoke run: batches 4 32, seeds 0 1, 1 epoch")
    p.add_argument("--update-results", action="store_true",
                   help="write to benchmarks/results/ (the committed results) instead of runs/benchmarks/")
    p.add_argument("--out", default=None,
                   help="output path without extension: .json .md .png (default runs/benchmarks/small_batch_study)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = results_path("small_batch_study", args.update_results)
    if args.quick:
        args.batches, args.seeds, args.epochs = [4, 32], [0, 1], 1
    if under_torchrun():
        p.error("run this script with plain python (it starts its own ranks, several times); not under torchrun")
    batches = sorted(args.batches)
    world = args.world_size

    setting = (f"LeNet, mnist5k (4,000 train / 1,000 test), {args.epochs} epoch(s) per config, seeds "
               f"{' '.join(map(str, args.seeds))}, lr = {args.base_lr:g} x global batch / 64, SGD momentum 0.9, "
               f"cosine; {world} gloo CPU ranks, 1 thread per rank, {os.cpu_count()} cores, torch {torch.__version__}")
    print(setting, flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    # Order: seed-major, batch sizes interleaved, so a partial run is still spread over configs.
    jobs = [(n, b, s) for s in args.seeds for b in batches for n in args.norms]
    print(f"{len(jobs)} runs on {world} ranks:", flush=True)
    runs = launch(ranks_body, world, jobs, args, threads=1, timeout=4 * 3600.0)
    if not args.no_reference:
        ref_jobs = [(b, world, s) for s in args.seeds for b in batches]
        print(f"{len(ref_jobs)} reference runs (bn, 1 process, batch {world}*b), 2 at a time:", flush=True)
        runs += run_references(ref_jobs, args, workers=min(2, os.cpu_count() or 1))
    load_after = os.getloadavg()

    ran = list(args.norms) + ([] if args.no_reference else [REF])
    earlier = _earlier_runs(args.out + ".json", ran, args) if args.keep_results else []
    runs = earlier + runs
    present = {r["norm"] for r in runs}
    norms = [n for n in ORDER if n in present]
    summary = summarize(runs, norms, batches)
    print_table(summary, norms, batches, world,
                f"Test accuracy (%) on mnist5k, mean ± std over {len(args.seeds)} seed(s), final epoch")
    if "syncbn" in args.norms and not args.no_reference:
        diffs = []
        for r in runs:
            if r["norm"] == "syncbn":
                ref = [x for x in runs if x["norm"] == REF and x["per_rank_batch"] == r["per_rank_batch"]
                       and x["seed"] == r["seed"]]
                if ref:
                    diffs.append(abs(r["test_acc"] - ref[0]["test_acc"]))
        if diffs:
            print(f"syncbn vs its 1-process reference (same seed, same samples per step): max |difference| "
                  f"{100 * max(diffs):.1f} points over {len(diffs)} pairs")
    print(f"1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"total {time.perf_counter() - started:.0f} s")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = {
        "benchmark": "small_batch_study", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/small_batch_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "kept_from_earlier": sorted({r["norm"] for r in earlier}),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "backend": "gloo",
                    "threads_per_rank": 1},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "lr_rule": f"lr = {args.base_lr} * global_batch / 64",
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "runs": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
    }
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(summary, norms, batches, world, args.base_lr))
    plot(summary, norms, batches, world, args.epochs, len(args.seeds), args.out + ".png")
    print(f"wrote {os.path.relpath(args.out)}.json .md .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
