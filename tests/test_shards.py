"""Shard builder: the three source layouts round-trip, bad input is refused (exit 2, no traceback)
or skipped with a record, verify catches a changed byte, a rebuild rewrites only what is missing,
and a training config that asks for another text encoder than the stored features' is refused."""

import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2f import shards_cli as shards
from t2f.config import TextConfig
from t2f.data.manifest import TextFeaturesMismatch, check_text_features, read_manifest
from t2f.data.shards import build_shards
from t2f.data.sources import SampleSpec
from t2f.data.vocab import Vocab

ATTRS = ["Smiling", "Eyeglasses", "Male"]


def caption_lines(i, n=10, split="train"):
    return [f"face {i} caption {k} {split}word{i}" for k in range(n)]


def save_image(path, i, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), (i * 7) % 256, dtype=np.uint8)
    pixels[: size // 2, :, 1] = 200
    Image.fromarray(pixels).save(path)


def make_mmcelebahq(root, n_train=12, n_test=5):
    ids = {"train": [str(i) for i in range(n_train)], "test": [str(i) for i in range(n_train, n_train + n_test)]}
    anno = [str(n_train + n_test), " ".join(ATTRS)]
    for split, split_ids in ids.items():
        (root / split).mkdir(parents=True)
        (root / split / "filenames.pickle").write_bytes(pickle.dumps(split_ids, protocol=2))
        for i in split_ids:
            save_image(root / "CelebA-HQ-img" / f"{i}.jpg", int(i))
            (root / "celeba-caption").mkdir(exist_ok=True)
            (root / "celeba-caption" / f"{i}.txt").write_text("\n".join(caption_lines(i, split=split)) + "\n")
            anno.append(f"{i}.jpg " + " ".join("1" if (int(i) + k) % 2 else "-1" for k in range(len(ATTRS))))
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(anno) + "\n")
    return ids


def make_celebatext(root, n_train=9, n_test=4):
    ids = {"train": [f"{i:05d}" for i in range(n_train)], "test": [f"{i:05d}" for i in range(n_train, n_train + n_test)]}
    (root / "data_flist").mkdir(parents=True)
    (root / "captions").mkdir()
    for split, split_ids in ids.items():
        (root / "data_flist" / f"{split}.flist").write_text("".join(f"{i}.jpg\n" for i in split_ids))
        for i in split_ids:
            save_image(root / "CelebAimg" / f"{i}.jpg", int(i))
            (root / "captions" / f"{i}.txt").write_text("\n".join(caption_lines(i, split=split)))
    return ids


def read_shard_samples(out, split):
    """{id: json} and {id: image size} of every sample in a split's shards, read back with tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    metas, sizes = {}, {}
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    metas[meta["id"]] = meta
                elif member.name.endswith((".png", ".jpg")):
                    sizes[member.name.split(".")[0]] = Image.open(tarfile.io.BytesIO(data)).size
    return metas, sizes


def run_build(*args):
    return shards.main(["build", *map(str, args)])


def test_mmcelebahq_round_trip_and_verify(tmp_path, capsys):
    ids = make_mmcelebahq(tmp_path / "mm")
    out = tmp_path / "out"
    assert run_build("--source", "mmcelebahq", "--root", tmp_path / "mm", "--out", out,
                     "--resolution", 16, "--shard-size", 5, "--workers", 2) == 0
    manifest = read_manifest(out)
    assert [e["name"] for e in manifest["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar",
                                                                          "train-000002.tar"]
    assert manifest["splits"]["train"]["count"] == 12 and manifest["splits"]["test"]["count"] == 5
    assert manifest["resolution"] == 16 and manifest["image_format"] == "png" and manifest["attributes"] == ATTRS
    for split in ("train", "test"):
        metas, sizes = read_shard_samples(out, split)
        assert sorted(metas, key=int) == ids[split]
        assert all(size == (16, 16) for size in sizes.values())
        for i, meta in metas.items():
            assert meta["captions"] == caption_lines(i, split=split) and meta["split"] == split
            assert meta["attributes"] == {a: int((int(i) + k) % 2 == 1) for k, a in enumerate(ATTRS)}
    vocab = Vocab.load(out / manifest["vocab"])
    assert "trainword0" in vocab.stoi and "testword12" not in vocab.stoi  # train captions only

    assert shards.main(["verify", str(out)]) == 0
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert shards.main(["verify", str(out)]) == 1
    assert "train-000001.tar: sha256 differs" in capsys.readouterr().err


def test_celebatext_round_trip_as_jpeg(tmp_path):
    ids = make_celebatext(tmp_path / "ct")
    out = tmp_path / "out"
    assert run_build("--source", "celebatext", "--root", tmp_path / "ct", "--out", out, "--resolution", 8,
                     "--format", "jpg", "--quality", 90, "--shard-size", 4, "--workers", 0) == 0
    manifest = read_manifest(out)
    assert manifest["image_format"] == "jpg" and manifest["attributes"] == []
    for split in ("train", "test"):
        metas, sizes = read_shard_samples(out, split)
        assert sorted(metas) == ids[split] and set(sizes.values()) == {(8, 8)}
        assert metas[ids[split][0]]["captions"] == caption_lines(ids[split][0], split=split)
        assert "attributes" not in metas[ids[split][0]]


def test_jsonl_round_trip_with_attributes_and_limit(tmp_path):
    lines = []
    for i in range(10):
        save_image(tmp_path / "img" / f"p{i}.png", i)
        lines.append(json.dumps({"image": f"img/p{i}.png", "captions": [f"person {i}", f"someone {i}"],
                                 "split": "train" if i < 7 else "val", "attributes": {"Smiling": 1 if i % 2 else -1}}))
    (tmp_path / "faces.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    assert run_build("--source", "jsonl", "--manifest", tmp_path / "faces.jsonl", "--out", out,
                     "--resolution", 16, "--limit", 5, "--workers", 0) == 0
    manifest = read_manifest(out)
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 5, "val": 3}
    metas, _ = read_shard_samples(out, "val")
    assert metas["p8"]["captions"] == ["person 8", "someone 8"] and metas["p8"]["attributes"] == {"Smiling": 0}


def make_bad_dataset(root):
    """MM-CelebA-HQ layout with one sample broken in each way the issue lists."""
    make_mmcelebahq(root, n_train=12, n_test=3)
    caps = root / "celeba-caption"
    (root / "CelebA-HQ-img" / "1.jpg").unlink()  # id in a split file with no image
    (root / "CelebA-HQ-img" / "2.jpg").write_bytes(b"this is not a jpeg")  # unreadable image
    (caps / "3.txt").unlink()  # missing caption file
    (caps / "4.txt").write_text("\n \n")  # empty caption file
    (caps / "5.txt").write_text("only one caption\n")  # fewer captions than expected
    (caps / "6.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)  # not UTF-8
    return {"1": "no image", "2": "unreadable image", "3": "missing caption file", "4": "empty caption file",
            "5": "only 1 captions, expected at least 10", "6": "is not UTF-8"}


def test_bad_input_is_listed_and_nothing_written(tmp_path, capsys):
    expected = make_bad_dataset(tmp_path / "mm")
    out = tmp_path / "out"
    assert run_build("--source", "mmcelebahq", "--root", tmp_path / "mm", "--out", out, "--workers", 0) == 2
    err = capsys.readouterr().err
    assert "6 bad sample(s)" in err and "--skip-bad" in err
    for sample_id, reason in expected.items():
        line = next(line for line in err.splitlines() if line.strip().startswith(f"{sample_id} (train)"))
        assert reason in line
    assert not out.exists()

    assert run_build("--source", "mmcelebahq", "--root", tmp_path / "mm", "--out", out, "--workers", 0,
                     "--resolution", 8, "--skip-bad") == 0
    manifest = read_manifest(out)
    skipped = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(expected) and all(expected[i] in skipped[i] for i in expected)
    assert manifest["splits"]["train"]["count"] == 12 - 6


def test_image_that_fails_to_decode_leaves_no_shard_and_no_finished_manifest(tmp_path, capsys):
    make_mmcelebahq(tmp_path / "mm", n_train=6, n_test=2)
    good = (tmp_path / "mm" / "CelebA-HQ-img" / "3.jpg")
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:800])  # header intact, scan data truncated
    out = tmp_path / "out"
    args = ["--source", "mmcelebahq", "--root", tmp_path / "mm", "--out", out,
            "--shard-size", 3, "--resolution", 8, "--workers", 0]
    assert run_build(*args) == 2
    assert "3 (train): image could not be decoded" in capsys.readouterr().err
    assert not (out / "train-000001.tar").exists() and not list(out.glob(".*tmp*"))
    with pytest.raises(ValueError, match="unfinished build"):
        read_manifest(out)
    assert run_build(*args, "--skip-bad") == 0
    assert read_manifest(out)["splits"]["train"]["count"] == 5


def test_rebuild_rewrites_only_the_deleted_shard(tmp_path):
    make_mmcelebahq(tmp_path / "mm", n_train=12, n_test=3)
    out = tmp_path / "out"
    args = ["--source", "mmcelebahq", "--root", tmp_path / "mm", "--out", out,
            "--shard-size", 4, "--resolution", 8, "--workers", 0]
    assert run_build(*args) == 0
    first = read_manifest(out)
    names = sorted(p.name for p in out.glob("*.tar"))
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / "train-000001.tar").unlink()
    assert run_build(*args) == 0
    after = {n: (out / n).stat().st_mtime_ns for n in names}
    assert [n for n in names if after[n] != before[n]] == ["train-000001.tar"]
    assert read_manifest(out)["splits"] == first["splits"]  # rewritten byte for byte
    assert shards.main(["verify", str(out)]) == 0


def test_api_with_in_memory_images_and_text_features(tmp_path):
    class StubEncoder:  # the writer needs only .name and .encode
        name, dim = "stub", 4

        def encode(self, captions):
            import torch

            return torch.tensor([[len(c), 1.0, 2.0, 3.0] for c in captions])

    specs = [SampleSpec(f"s.{i}", np.full((12, 12, 3), i, np.uint8), ["a" * (i + 1), "bb"], "train",
                        {"Smiling": i % 2 == 1}) for i in range(5)]
    manifest = build_shards(specs, tmp_path / "out", resolution=12, shard_size=2, text_encoder=StubEncoder(), progress=False)
    probe = manifest["text_encoder"].pop("probe")
    assert manifest["text_encoder"] == {"name": "stub", "pooling": None, "max_length": None, "dim": 4,
                                        "dtype": "float16", "file": "text.npy"}
    assert probe["caption"] == "a"  # the first caption of the set
    assert manifest["attributes"] == ["Smiling"]  # inferred from the samples
    with tarfile.open(tmp_path / "out" / "train-000001.tar") as tar:
        names = tar.getnames()
        rows = np.load(tarfile.io.BytesIO(tar.extractfile("s_2.text.npy").read()))
        meta = json.loads(tar.extractfile("s_3.json").read())
    assert names == ["s_2.json", "s_2.png", "s_2.text.npy", "s_3.json", "s_3.png", "s_3.text.npy"]
    assert rows.dtype == np.float16 and rows[:, 0].tolist() == [3.0, 2.0]
    assert meta["id"] == "s.3" and meta["attributes"] == {"Smiling": 1}


def test_cli_stores_features_of_the_packaged_text_encoder(tmp_path):
    make_celebatext(tmp_path / "ct", n_train=3, n_test=1)
    out = tmp_path / "out"
    assert run_build("--source", "celebatext", "--root", tmp_path / "ct", "--out", out, "--resolution", 8,
                     "--text-encoder", "all-MiniLM-L6-v2", "--local-files-only", "--workers", 0) == 0
    record = read_manifest(out)["text_encoder"]
    assert (record["name"], record["pooling"], record["max_length"], record["dim"]) == ("all-MiniLM-L6-v2", "auto", 77, 384)
    with tarfile.open(out / "train-000000.tar") as tar:
        rows = np.load(tarfile.io.BytesIO(tar.extractfile("00000.text.npy").read()))
    assert rows.shape == (10, 384) and rows.dtype == np.float16

    # Trained on a cluster as a local folder: the same weights under another name pass the check.
    from t2f.models.text_encoder import TextEncoder, resolve_model_path

    folder = resolve_model_path("all-MiniLM-L6-v2")
    text = TextConfig(encoder=folder, pooling="mean", max_length=77, local_files_only=True)
    check_text_features(read_manifest(out), text, True, encoder=TextEncoder(folder, "mean", 77, True))


def test_missing_layout_names_the_paths_tried(tmp_path, capsys):
    (tmp_path / "mm" / "CelebA-HQ-img").mkdir(parents=True)
    assert run_build("--source", "mmcelebahq", "--root", tmp_path / "mm", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no caption folder" in err and "celeba-caption" in err and "captions" in err


# ---------------------------------------------------------------------------- array jobs (slices)


def comparable(out):
    """The manifest minus what names the output folder."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["options"].pop("out")
    return manifest


def test_three_slices_then_finalize_give_the_local_build(tmp_path):
    make_mmcelebahq(tmp_path / "mm", n_train=12, n_test=5)
    args = ["--source", "mmcelebahq", "--root", tmp_path / "mm", "--shard-size", 3, "--resolution", 8, "--workers", 0]
    local, array = tmp_path / "local", tmp_path / "array"
    assert run_build(*args, "--out", local) == 0

    assert run_build(*args, "--out", array, "--num-slices", 3, "--slice", 0) == 0
    # round robin over the plan (test-0, test-1, train-0 .. train-3): slice 0 owns positions 0 and 3
    assert sorted(p.name for p in array.glob("*.tar")) == ["test-000000.tar", "train-000001.tar"]
    assert not (array / "manifest.json").exists() and not (array / "vocab.json").exists()
    for index in (1, 2):
        assert run_build(*args, "--out", array, "--num-slices", 3, "--slice", index) == 0
    names = sorted(p.name for p in local.glob("*.tar"))
    before = {n: (array / n).stat().st_mtime_ns for n in names}
    (array / "train-000002.tar").unlink()  # slice 1's; a re-run of slice 1 rewrites only it
    assert run_build(*args, "--out", array, "--num-slices", 3, "--slice", 1) == 0
    assert [n for n in names if (array / n).stat().st_mtime_ns != before[n]] == ["train-000002.tar"]

    assert run_build(*args, "--out", array, "--num-slices", 3, "--finalize") == 0
    assert comparable(array) == comparable(local) and read_manifest(array)["complete"] is True
    assert sorted(p.name for p in array.glob("*.tar")) == names
    assert all((array / n).read_bytes() == (local / n).read_bytes() for n in names)
    assert (array / "vocab.json").read_bytes() == (local / "vocab.json").read_bytes()
    assert not list(array.glob(".slice-*")) and shards.main(["verify", str(array)]) == 0


def test_finalize_names_the_slice_that_did_not_run(tmp_path, capsys):
    make_mmcelebahq(tmp_path / "mm", n_train=12, n_test=5)
    args = ["--source", "mmcelebahq", "--root", tmp_path / "mm", "--out", tmp_path / "out",
            "--shard-size", 3, "--resolution", 8, "--workers", 0, "--num-slices", 3]
    for index in (0, 2):
        assert run_build(*args, "--slice", index) == 0
    capsys.readouterr()
    assert run_build(*args, "--finalize") == 1
    err = capsys.readouterr().err
    assert "1 of 3 slice(s) did not finish" in err
    line = next(line for line in err.splitlines() if "slice 1:" in line)
    assert "no record .slice-1-of-3.json" in line and "test-000001.tar, train-000002.tar" in line
    assert "slice 0:" not in err and "slice 2:" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert run_build(*args, "--slice", 3) == 2 and "--slice 3 is outside 0..2" in capsys.readouterr().err


def test_a_slice_refuses_bad_input_and_skips_it_like_a_local_build(tmp_path, capsys):
    make_bad_dataset(tmp_path / "mm")
    args = ["--source", "mmcelebahq", "--root", tmp_path / "mm", "--shard-size", 2, "--resolution", 8, "--workers", 0]
    assert run_build(*args, "--out", tmp_path / "array", "--num-slices", 2, "--slice", 1) == 2
    assert "6 bad sample(s)" in capsys.readouterr().err and not (tmp_path / "array").exists()
    assert run_build(*args, "--skip-bad", "--out", tmp_path / "local") == 0
    for step in (["--slice", 0], ["--slice", 1], ["--finalize"]):
        assert run_build(*args, "--skip-bad", "--out", tmp_path / "array", "--num-slices", 2, *step) == 0
    assert comparable(tmp_path / "array") == comparable(tmp_path / "local")
    assert len(comparable(tmp_path / "array")["skipped"]) == 6


def test_api_slices_carry_the_text_features_dimension_to_the_manifest(tmp_path):
    class CountingEncoder:
        name, calls = "stub", 0

        def encode(self, captions):
            import torch

            CountingEncoder.calls += 1
            return torch.ones(len(captions), 3)

    def specs():  # fresh ones each time: the checks normalise specs in place
        return [SampleSpec(str(i), np.full((8, 8, 3), i, np.uint8), [f"cap {i}"]) for i in range(5)]

    common = dict(resolution=8, shard_size=2, text_encoder=CountingEncoder(), progress=False)
    local = build_shards(specs(), tmp_path / "local", **common)
    for index in (0, 1):
        build_shards(specs(), tmp_path / "array", num_slices=2, slice_index=index, **common)
    calls = CountingEncoder.calls
    manifest = build_shards(specs(), tmp_path / "array", num_slices=2, finalize=True, **common)
    assert CountingEncoder.calls == calls  # finalize never encodes
    assert manifest == local and manifest["text_encoder"]["dim"] == 3


# ---------------------------------------------------------------------------- exit status


def test_cli_bad_input_exits_2_with_one_message_and_no_traceback(tmp_path):
    t2f = Path(sys.executable).parent / "t2f"
    cases = {
        "missing root": (["build", "--source", "celebatext", "--root", tmp_path / "nowhere"], "is not a directory"),
        "unknown source": (["build", "--source", "flickr", "--root", tmp_path], "invalid choice: 'flickr'"),
        "no manifest to verify": (["verify", tmp_path], "no shard manifest"),
    }
    for what, (args, message) in cases.items():
        result = subprocess.run([str(t2f), "shards", *map(str, args)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (what, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (what, result.stderr)


# ---------------------------------------------------------------------------- stored text features vs text.*


class FeatureStub:
    """A 3-wide text encoder; `kind` picks its 'weights' (features of the same width either way)."""

    def __init__(self, name, kind="a", pooling="mean", max_length=32):
        self.name, self.kind, self.pooling, self.max_length = name, kind, pooling, max_length

    def encode(self, captions):
        import torch

        rows = [[len(c), 1.0, -2.0] if self.kind == "a" else [1.0, -2.0, len(c)] for c in captions]
        return torch.tensor(rows)


def featured_manifest(tmp_path, encoder):
    specs = [SampleSpec(str(i), np.full((8, 8, 3), i, np.uint8), [f"face {i} smiles", "a face"]) for i in range(3)]
    return build_shards(specs, tmp_path / "out", resolution=8, shard_size=2, text_encoder=encoder, progress=False)


def test_features_from_another_text_encoder_are_refused_with_the_fix(tmp_path):
    manifest = featured_manifest(tmp_path, FeatureStub("enc-a"))
    assert {k: manifest["text_encoder"][k] for k in ("name", "pooling", "max_length", "dim")} == \
           {"name": "enc-a", "pooling": "mean", "max_length": 32, "dim": 3}
    same = TextConfig(encoder="enc-a", pooling="mean", max_length=32)
    check_text_features(manifest, same, True)
    with pytest.raises(TextFeaturesMismatch) as err:
        check_text_features(manifest, TextConfig(encoder="enc-b", pooling="mean", max_length=32), True)
    message = str(err.value)
    assert "\n" not in message and "'enc-a'" in message and "'enc-b'" in message
    assert "--text-encoder enc-b" in message and "data.use_precomputed_text=false" in message
    check_text_features(manifest, TextConfig(encoder="enc-b"), False)  # features not used: nothing to check
    for other in (TextConfig(encoder="enc-a", pooling="mean", max_length=77),
                  TextConfig(encoder="enc-a", pooling="clip", max_length=32)):
        with pytest.raises(TextFeaturesMismatch):
            check_text_features(manifest, other, True)
    check_text_features(featured_manifest(tmp_path / "plain", None), TextConfig(encoder="enc-b"), True)  # no features


def test_the_probe_knows_the_same_weights_under_another_name_and_another_model_under_the_same(tmp_path):
    manifest = featured_manifest(tmp_path, FeatureStub("org/enc-a"))
    folder = TextConfig(encoder="/models/enc-a", pooling="mean", max_length=32)
    with pytest.raises(TextFeaturesMismatch):
        check_text_features(manifest, folder, True)  # by name alone
    check_text_features(manifest, folder, True, encoder=FeatureStub("/models/enc-a"))
    same_name = TextConfig(encoder="org/enc-a", pooling="mean", max_length=32)
    with pytest.raises(TextFeaturesMismatch, match="'org/enc-a'"):
        check_text_features(manifest, same_name, True, encoder=FeatureStub("org/enc-a", kind="b"))


def test_a_manifest_from_before_the_record_is_checked_by_name_and_warns(tmp_path):
    old = {"text_encoder": {"name": "enc-a", "dim": 3, "dtype": "float16", "file": "text.npy"}}
    with pytest.warns(UserWarning, match="pooling and max_length cannot be checked"):
        check_text_features(old, TextConfig(encoder="enc-a"), True, encoder=FeatureStub("enc-a"))
    with pytest.raises(TextFeaturesMismatch):
        check_text_features(old, TextConfig(encoder="enc-b"), True)


def test_shard_workers_are_not_forked_from_the_caller():
    """A worker forked from a process with other threads (a server, a process group, W&B) can
    inherit a lock one of them held and wait forever, and the build with it: this hung the test
    suite once. The pool's workers start from a forkserver instead."""
    import os

    from t2f.data.writer import worker_pool

    with worker_pool(2) as pool:
        parents = {pool.apply(os.getppid) for _ in range(4)}
    assert os.getpid() not in parents
