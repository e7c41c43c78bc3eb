"""The launcher's data.shard=uneven: every sample once per epoch, ranks with different numbers of batches
under syncnorm.join, and the same training as one process with the global batch."""

import pytest
import torch

from syncnorm.testing import run_ranks
from syncnorm.train.config import from_dict, to_dict
from syncnorm.train.data import UnevenShardSampler, uneven_step_samples
from syncnorm.train.errors import ConfigError, DataError
from syncnorm.train.loop import train
from trainkit import QUIET

SAMPLES = 50  # 3 ranks: 17, 17 and 16 samples; batch 4: 5, 5 and 4 batches, the last ones of 1 sample


def _config(out, batch_size, shard="uneven", drop_last=False):
    return to_dict(from_dict({
        "model": {"name": "lenet", "norm": "syncbn"},
        "data": {"name": "synthetic", "synthetic_samples": SAMPLES, "shard": shard},
        "train": {"epochs": 2, "batch_size": batch_size, "drop_last": drop_last, "dtype": "float64",
                  "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "seed": 3},
        "output_dir": out,
    }))


def _train_rank(rank, world_size, cfg):
    result = train(from_dict(cfg), reporter=QUIET)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}, result.metrics


def test_uneven_shards_cover_every_sample_once():
    for epoch in (0, 1):
        shards = []
        for rank in range(3):
            sampler = UnevenShardSampler(SAMPLES, rank, 3, seed=3)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler)
        assert sorted(i for shard in shards for i in shard) == list(range(SAMPLES))
        assert [len(s) for s in shards] == [17, 17, 16]
    # Step k covers the one-process batch k of 12: 12 samples, then 2 at the end.
    assert [uneven_step_samples(SAMPLES, 3, 4, k) for k in range(6)] == [12, 12, 12, 12, 2, 0]


def test_uneven_shard_training_equals_one_process_with_the_global_batch(tmp_path):
    results = run_ranks(_train_rank, 3, _config(str(tmp_path / "uneven3"), 4), timeout=300, pg_timeout=60)
    state, metrics = results[0]
    for other, _ in results[1:]:
        assert all(torch.equal(state[k], other[k]) for k in state), "ranks disagree"
    assert [row["samples"] for row in metrics] == [SAMPLES, SAMPLES]  # each sample once per epoch

    reference = train(from_dict(_config(str(tmp_path / "one"), 12, shard="pad")), reporter=QUIET)
    ref_state = {k: v.detach() for k, v in reference.model.state_dict().items()}
    for key, expected in ref_state.items():
        torch.testing.assert_close(state[key], expected, rtol=1e-10, atol=1e-10, msg=key)
    for row, ref_row in zip(metrics, reference.metrics):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-10, abs=1e-10), key


def test_uneven_shard_needs_drop_last_false(tmp_path):
    with pytest.raises(DataError, match="expected train.drop_last=false"):
        train(from_dict(_config(str(tmp_path / "x"), 4, drop_last=True)), reporter=QUIET)


def test_uneven_shard_refuses_compile(tmp_path):
    cfg = _config(str(tmp_path / "c"), 4)
    cfg["train"]["compile"] = True
    with pytest.raises(ConfigError, match="expected train.compile=false"):
        train(from_dict(cfg), reporter=QUIET)
