"""Streaming loader: 2 simulated ranks x 2 workers see every eval sample exactly once and the same
number of training batches; batches have the promised shapes; corrupt samples and shards cut short
are skipped, counted across workers and epochs, and past data.max_bad_fraction stop the run."""

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_shards

from t2f.data.loader import DataAccounting, DataFaultError, make_eval_loader, make_train_loader
from t2f.data.shards import build_shards
from t2f.data.sources import SampleSpec
from t2f.data.vocab import BOS, Vocab

N_TRAIN, N_TEST = 45, 13


def spec(i, split):
    pixels = np.full((8, 8, 3), i * 4, dtype=np.uint8)  # grey level encodes the id
    return SampleSpec(str(i), pixels, [f"face {i} first", f"face {i} second", f"face {i} third"], split,
                      {"Smiling": i % 2, "Male": int(i % 3 == 0)})


class StubEncoder:
    name, dim = "stub", 2

    def encode(self, captions):
        return torch.tensor([[float(c.split()[1]), float(len(c))] for c in captions])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    specs = [spec(i, "train") for i in range(N_TRAIN)] + [spec(i, "test") for i in range(N_TRAIN, N_TRAIN + N_TEST)]
    build_shards(specs, out, resolution=8, shard_size=5, attribute_names=["Smiling", "Male"],
                 text_encoder=StubEncoder(), progress=False)  # 9 train shards, 3 test shards (5, 5, 3)
    return out


@pytest.fixture(scope="module")
def vocab():
    return Vocab.build([f"face {i} first second third" for i in range(N_TRAIN)])


def test_eval_sees_every_sample_once_across_2_ranks_x_2_workers(shard_dir, vocab):
    seen, sizes = [], []
    for rank in range(2):
        loader = make_eval_loader(shard_dir, "test", batch_size=2, resolution=8, vocab=vocab,
                                  rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            seen += batch["key"]
            sizes.append(len(batch["key"]))
            assert batch["caption"] == [f"face {k} first" for k in batch["key"]]
            assert [len(c) for c in batch["all_captions"]] == [3] * len(batch["key"])
    assert Counter(seen) == Counter(str(i) for i in range(N_TRAIN, N_TRAIN + N_TEST))
    assert 1 in sizes  # partial last batches are kept


def test_eval_order_is_deterministic(shard_dir, vocab):
    def keys():
        loader = make_eval_loader(shard_dir, "test", batch_size=4, resolution=8, vocab=vocab, num_workers=2)
        return [k for batch in loader for k in batch["key"]]

    assert keys() == keys()


def test_training_ranks_yield_equal_full_batches(shard_dir, vocab):
    counts = []
    for rank in range(2):
        loader = make_train_loader(shard_dir, "train", batch_size=4, resolution=8, vocab=vocab, rank=rank,
                                   world_size=2, num_workers=2, shuffle_buffer=8)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader) == 6  # ceil(45 / (4 * 2)) = 6 per rank, 3 per worker
        assert all(len(b["key"]) == 4 for b in batches)
    assert counts[0] == counts[1]


def test_training_batch_contents(shard_dir, vocab):
    loader = make_train_loader(shard_dir, "train", batch_size=5, resolution=4, vocab=vocab, shuffle_buffer=10)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 4, 4) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    grey = (batch["image"].mean(dim=(1, 2, 3)) + 1) * 127.5  # the id was written as grey level id * 4
    assert torch.allclose(grey, torch.tensor([int(k) * 4.0 for k in batch["key"]]), atol=1.0)
    assert batch["tokens"].dtype == torch.long and (batch["tokens"][:, 0] == BOS).all()
    assert [vocab.decode(t) for t in batch["tokens"]] == batch["caption"]
    assert all(c.startswith(f"face {k} ") for c, k in zip(batch["caption"], batch["key"]))
    # the feature row belongs to the chosen caption, not just to the image
    assert batch["text_features"].tolist() == [[float(k), float(len(c))] for k, c in zip(batch["key"], batch["caption"])]
    assert batch["attributes"].tolist() == [[int(k) % 2, int(int(k) % 3 == 0)] for k in batch["key"]]


def test_epochs_reshuffle_and_redraw_captions_reproducibly(shard_dir, vocab):
    def run(epoch):
        loader = make_train_loader(shard_dir, "train", batch_size=9, resolution=8, vocab=vocab, seed=3, shuffle_buffer=20)
        loader.set_epoch(epoch)
        return [(k, c) for batch in loader for k, c in zip(batch["key"], batch["caption"])]

    first, again, second = run(0), run(0), run(1)
    assert first == again
    assert [k for k, _ in first] != [k for k, _ in second]
    chosen = {k: c for k, c in first}
    assert any(chosen[k] != c for k, c in second if k in chosen)
    assert len({c.split()[-1] for _, c in first}) == 3  # all three captions get drawn


def test_resampled_mode_and_too_few_shards(shard_dir, vocab):
    with pytest.raises(ValueError, match="need at least 4.*data.resampled=true"):
        make_train_loader(shard_dir, "test", batch_size=2, resolution=8, vocab=vocab, world_size=2, num_workers=2)
    loader = make_train_loader(shard_dir, "test", batch_size=2, resolution=8, vocab=vocab, world_size=2,
                               num_workers=2, resampled=True)
    assert len(list(loader)) == len(loader) == 4


def test_corrupt_sample_is_skipped_and_counted(shard_dir, vocab, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    replace_member(broken / "test-000001.tar", "50.png", b"not a png at all")
    loader = make_eval_loader(broken, "test", batch_size=4, resolution=8, vocab=vocab)
    with pytest.warns(UserWarning, match="skipping corrupt sample 50"):
        keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys, key=int) == [str(i) for i in range(N_TRAIN, N_TRAIN + N_TEST) if i != 50]
    assert loader.corrupt_skipped == 1


def test_truncated_shard_is_counted_not_fatal(shard_dir, vocab, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    cut_inside_sample(broken / "test-000002.tar", 1)  # samples 55, 56, 57: 56 and 57 are lost
    loader = make_eval_loader(broken, "test", batch_size=4, resolution=8, vocab=vocab)
    with pytest.warns(UserWarning, match="test-000002.tar is cut short or damaged: 2 samples lost each time"):
        keys = {k for batch in loader for k in batch["key"]}
    assert keys == {str(i) for i in range(N_TRAIN, N_TRAIN + 11)}
    assert (loader.samples_lost, loader.corrupt_skipped) == (2, 0)  # 56's json came out alone: lost, not corrupt


# ---------------------------------------------------------------------------- data accounting (tests/tiny.py shards)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("tiny"))  # train: 6 shards x 4 samples; test: 2 x 4


@pytest.fixture()
def tiny_copy(tiny_dir, tmp_path):
    return Path(shutil.copytree(tiny_dir, tmp_path / "shards"))


@pytest.fixture(scope="module")
def tiny_vocab():
    return Vocab.build(["the woman man has blond black hair and is smiling a with ."])


def tiny_train_loader(shards, vocab):
    return make_train_loader(shards, "train", batch_size=4, resolution=32, vocab=vocab, num_workers=2, shuffle_buffer=8)


def test_cut_shard_reports_its_name_and_exact_loss_across_2_workers(tiny_copy, tiny_vocab):
    cut_inside_sample(tiny_copy / "train-000002.tar", 1)  # samples 009..011 do not come out whole
    loader = make_eval_loader(tiny_copy, "train", batch_size=4, resolution=32, vocab=tiny_vocab, num_workers=2)
    accounting = DataAccounting(max_bad_fraction=None)
    with pytest.warns(UserWarning, match=r"train-000002.tar is cut short or damaged: 3 samples lost each time"):
        keys = drain(loader, accounting)
    assert sorted(keys) == [f"{i:03d}" for i in range(24) if i not in (9, 10, 11)]
    assert loader.bad_shards == {str(tiny_copy / "train-000002.tar"): {"lost": 3, "corrupt": 0, "short_reads": 1}}
    assert accounting.totals() == {"corrupt_skipped": 0, "samples_lost": 3}


def test_corrupt_samples_counted_across_workers(tiny_copy, tiny_vocab):
    replace_member(tiny_copy / "train-000000.tar", "001.png", b"not a png")  # worker 0 reads shards 0, 2, 4
    replace_member(tiny_copy / "train-000001.tar", "006.png", b"not a png")  # worker 1 reads shards 1, 3, 5
    loader = make_eval_loader(tiny_copy, "train", batch_size=4, resolution=32, vocab=tiny_vocab, num_workers=2)
    accounting = DataAccounting(max_bad_fraction=None)
    keys = drain(loader, accounting)
    assert len(keys) == 22 and "001" not in keys and "006" not in keys
    assert accounting.totals() == {"corrupt_skipped": 2, "samples_lost": 0} and loader.corrupt_skipped == 2
    assert accounting.shards == {str(tiny_copy / "train-000000.tar"): [0, 1, 0], str(tiny_copy / "train-000001.tar"): [0, 1, 0]}


def test_training_counts_add_up_across_workers_and_epochs(tiny_copy, tiny_vocab):
    cut_inside_sample(tiny_copy / "train-000002.tar", 1)  # 3 lost each time a worker reads the shard
    loader, accounting, lost = tiny_train_loader(tiny_copy, tiny_vocab), DataAccounting(max_bad_fraction=None), []
    for epoch in range(3):  # one loader per run, set_epoch per epoch, as in training
        loader.set_epoch(epoch)
        drain(loader, accounting)
        lost.append(accounting.totals()["samples_lost"])
    assert lost[0] > 0 and lost[0] < lost[1] < lost[2] and all(n % 3 == 0 for n in lost)
    assert loader.samples_lost == lost[-1] and list(accounting.shards) == [str(tiny_copy / "train-000002.tar")]


def test_bad_fraction_stops_training_and_lists_the_bad_shards(tiny_copy, tiny_vocab):
    cut_inside_sample(tiny_copy / "train-000001.tar", 1)  # 3 lost
    cut_inside_sample(tiny_copy / "train-000003.tar", 2)  # 2 lost: 5 of the 24 samples of an epoch
    loader, accounting = tiny_train_loader(tiny_copy, tiny_vocab), DataAccounting(max_bad_fraction=0.1, min_samples=40)
    with pytest.raises(DataFaultError) as caught:  # each worker's first batch reports its first pass over its shards
        drain(loader, accounting)
    message = str(caught.value)
    assert "train-000001.tar (3 lost)" in message and "train-000003.tar (2 lost)" in message
    assert f"t2f shards verify {tiny_copy}`" in message and "data.max_bad_fraction=0.1 passed" in message


def test_below_the_bad_fraction_training_goes_on(tiny_copy, tiny_vocab):
    cut_inside_sample(tiny_copy / "train-000001.tar", 3)  # 1 of 24 samples lost per read
    loader, accounting = tiny_train_loader(tiny_copy, tiny_vocab), DataAccounting(max_bad_fraction=0.1, min_samples=10)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert len(drain(loader, accounting)) == len(loader) * 4
    assert accounting.totals()["samples_lost"] > 0 and not accounting.exceeded()


def test_default_warm_up_forgives_one_bad_sample_at_the_start():
    accounting = DataAccounting(max_bad_fraction=0.01)  # judged over at least 1000 samples
    accounting.update({"faults": {"read": 10, "corrupt": 1, "lost": 0, "shards": {"s/a.tar": [0, 1, 0]}}})
    accounting.update({"faults": {"read": 990, "corrupt": 9, "lost": 0, "shards": {"s/a.tar": [0, 9, 0]}}})
    with pytest.raises(DataFaultError, match=r"=0.01 passed: 22 of 1012 samples read here .*"
                                             r"a.tar \(12 lost over 3 reads, 10 corrupt\)"):
        accounting.update({"faults": {"read": 0, "corrupt": 0, "lost": 12, "shards": {"s/a.tar": [12, 0, 3]}}})
    with pytest.raises(ValueError, match="data.max_bad_fraction must be between 0 and 1"):
        DataAccounting(max_bad_fraction=1.5)


def test_missing_manifest_says_how_to_build(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match="t2f shards build"):
        make_train_loader(tmp_path, "train", batch_size=2, resolution=8, vocab=vocab)


def drain(loader, accounting) -> list:
    """The keys of every batch, each batch passed to `accounting` as the trainer does."""
    keys = []
    for batch in loader:
        accounting.update(batch)
        keys += batch["key"]
    return keys


def cut_inside_sample(path, index):
    """Truncate a tar in the middle of the image of its `index`-th sample (as a copy cut short would be)."""
    with tarfile.open(path) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith(".png")][index]
    path.write_bytes(path.read_bytes()[:image.offset_data + image.size // 2])


def replace_member(path, name, data):
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, content in members:
            content = data if member.name == name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
