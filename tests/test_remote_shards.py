"""Shards from anywhere (t2f/data/remote.py): the loader, the manifest, the vocabulary and
`t2f shards verify` read a URL as they read a folder. Over HTTP from a server on 127.0.0.1
(tests/fault_server.py), a pipe: command and a local S3 endpoint (moto): the same samples in the
same order as the local copy; a dropped connection or a stalled server resumes where it stopped;
a 404 or a shard that keeps failing is skipped after bounded retries, counted as lost and named
by its URL without the query string; a 2-process training run gives the same weights as from the
local copy."""

import shutil
from pathlib import Path

import pytest
import torch
from fault_server import FaultServer
from safetensors.torch import load_file
from test_train_distributed import accelerate_launch
from tiny import tiny_overrides, tiny_shards

from t2f import shards_cli
from t2f.checkpointing import latest_checkpoint
from t2f.data.loader import DataAccounting, DataFaultError, make_eval_loader, make_train_loader
from t2f.data.manifest import read_manifest
from t2f.data.remote import RemoteOptions, location_of, public
from t2f.data.vocab import Vocab

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "sig=SECRET-TOKEN"  # stands for a credential in a query string: it must reach the server and no message
FAST = RemoteOptions(retries=2, timeout=1.0, backoff=0.05)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("remote") / "shards")  # train: 6 shards x 4 samples; test: 2 x 4


@pytest.fixture()
def server(shards):
    with FaultServer(shards, prefix="/data/shards", lifetime_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def vocab():
    return Vocab.build(["the woman man has blond black hair and is smiling a with ."])


def train_samples(location, vocab, remote=FAST, epoch=1):
    """(key, caption, image checksum) of one training epoch, 2 workers, as the trainer reads it."""
    loader = make_train_loader(location, "train", batch_size=4, resolution=32, vocab=vocab, num_workers=2, seed=7,
                               shuffle_buffer=8, remote=remote)
    loader.set_epoch(epoch)
    accounting = DataAccounting(max_bad_fraction=None)
    samples = []
    for batch in loader:
        accounting.update(batch)
        samples += [(k, c, float(img.sum())) for k, c, img in zip(batch["key"], batch["caption"], batch["image"])]
    return samples, loader, accounting


def test_locations_join_names_and_hide_credentials():
    assert location_of("https://h.org/a/shards?sig=x", "train-000000.tar") == "https://h.org/a/shards/train-000000.tar?sig=x"
    assert location_of("s3://bucket/set/", "manifest.json") == "s3://bucket/set/manifest.json"
    assert location_of("shards/toy", "vocab.json") == str(Path("shards/toy/vocab.json"))
    assert location_of("pipe:aws s3 cp s3://b/s/{name} -", "a b.tar") == "pipe:aws s3 cp s3://b/s/'a b.tar' -"
    assert public("https://user:pw@h.org:8080/a/t.tar?sig=x#f") == "https://h.org:8080/a/t.tar"
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        location_of("pipe:cat shards/train.tar", "manifest.json")


def test_http_gives_the_local_samples_in_the_local_order(shards, server, vocab):
    local, _, _ = train_samples(shards, vocab)
    remote, loader, accounting = train_samples(f"{server.url}?{TOKEN}", vocab)
    assert remote == local and len(remote) == len(loader) * 4
    assert accounting.totals() == {"corrupt_skipped": 0, "samples_lost": 0}
    served = {name for name, _, query in server.requests if query == TOKEN}
    assert {"manifest.json", "train-000000.tar", "train-000005.tar"} <= served  # the token reaches the server

    def eval_keys(location):  # 2 ranks x 2 workers: every test sample once, in a fixed order
        return [k for rank in (0, 1) for batch in make_eval_loader(location, "test", batch_size=3, resolution=32, vocab=vocab,
                                                                    rank=rank, world_size=2, num_workers=2) for k in batch["key"]]

    assert eval_keys(server.url) == eval_keys(shards) and sorted(eval_keys(server.url)) == [f"{i:03d}" for i in range(24, 32)]
    assert read_manifest(server.url) == read_manifest(shards)
    assert Vocab.load(f"{server.url}/vocab.json?{TOKEN}").itos == Vocab.load(shards / "vocab.json").itos


@pytest.mark.parametrize("fault", ["drop", "stall", "drop, Range ignored"])
def test_dropped_or_stalled_connection_resumes_without_repeating_a_sample(shards, server, vocab, fault):
    local, _, _ = train_samples(shards, vocab)
    server.honour_range = fault != "drop, Range ignored"  # then the client skips what it had already read
    fault = fault.split(",")[0]
    server.faults = {"train-000001.tar": [fault], "train-000004.tar": [fault]}  # "stall": silent past the 1 s timeout
    remote, _, accounting = train_samples(server.url, vocab)
    assert remote == local and accounting.totals() == {"corrupt_skipped": 0, "samples_lost": 0}
    for name in ("train-000001.tar", "train-000004.tar"):
        resumed = server.requested(name)[1]
        assert resumed and resumed.startswith("bytes=") and resumed != "bytes=0-", server.requested(name)


def test_missing_and_failing_shards_are_skipped_counted_and_named_by_url(shards, server, vocab):
    server.faults = {"train-000002.tar": ["404"] * 50, "train-000003.tar": ["drop"] * 50}
    with pytest.warns(UserWarning) as caught:
        samples, loader, accounting = train_samples(f"{server.url}?{TOKEN}", vocab)
    assert len(samples) == len(loader) * 4  # the epoch is whole: the other shards fill it
    keys = {k for k, _, _ in samples}
    # shard 2 holds 008..011; shard 3 holds 012..015, whose connection always drops in the middle of the file
    assert not keys & {"008", "009", "010", "011", "014", "015"} and {"012", "013"} <= keys
    messages = [str(w.message) for w in caught if "skipping shard" in str(w.message)]
    assert any(f"{server.url}/train-000002.tar: HTTP 404 Not Found" in m for m in messages)
    assert any(f"{server.url}/train-000003.tar: ConnectionError" in m and "gave up after 3 tries" in m for m in messages)
    tries = server.requested("train-000003.tar")  # 1 + FAST.retries per read, each resumed where the first one stopped
    assert tries[0] is None and tries[1] == tries[2] and tries[1].startswith("bytes=") and tries[1] != "bytes=0-"
    assert server.requested("train-000002.tar")[:2] == [None, None]  # a 404 is not retried within one read
    lost = accounting.totals()["samples_lost"]
    per_shard = {name: tally[0] for name, tally in accounting.shards.items()}  # lost over every read of the epoch
    assert set(per_shard) == {f"{server.url}/train-000002.tar", f"{server.url}/train-000003.tar"}
    assert per_shard[f"{server.url}/train-000002.tar"] % 4 == 0 and per_shard[f"{server.url}/train-000003.tar"] % 2 == 0
    assert lost == sum(per_shard.values()) == loader.samples_lost and lost >= 6
    strict = DataAccounting(max_bad_fraction=0.1, min_samples=10)
    with pytest.raises(DataFaultError) as stopped:
        strict.update({"faults": {"read": len(samples), "corrupt": 0, "lost": lost, "shards": accounting.shards,
                                  "unreadable": accounting.unreadable}})
    assert f"{server.url}/train-000002.tar: HTTP 404 Not Found" in str(stopped.value)
    assert f"t2f shards verify {server.url}`" in str(stopped.value)
    assert "SECRET" not in " ".join(messages) + str(stopped.value)


def test_http_password_comes_from_netrc_and_is_never_shown(shards, server, tmp_path, monkeypatch, capsys):
    server.auth = ("reader", "NETRC-PASSWORD")
    assert shards_cli.main(["verify", server.url, "--retries", "0"]) == 2  # refused: not retried, bad input
    assert capsys.readouterr().err.strip() == f"t2f shards verify: {server.url}/manifest.json: HTTP 401 Unauthorized"
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login reader password NETRC-PASSWORD\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert shards_cli.main(["verify", server.url]) == 0
    assert "NETRC-PASSWORD" not in "".join(capsys.readouterr())


def test_verify_over_http_names_every_bad_shard(shards, tmp_path, capsys):
    broken = Path(shutil.copytree(shards, tmp_path / "broken"))
    data = bytearray((broken / "train-000001.tar").read_bytes())
    data[700] ^= 0xFF  # a changed byte inside the first image
    (broken / "train-000001.tar").write_bytes(bytes(data))
    (broken / "test-000001.tar").unlink()
    with FaultServer(shards, lifetime_s=60) as good, FaultServer(broken, lifetime_s=60) as bad:
        good.faults["train-000003.tar"] = ["drop"]  # one dropped connection is retried, not a problem
        assert shards_cli.main(["verify", f"{good.url}?{TOKEN}"]) == 0
        assert capsys.readouterr().out.strip() == f"{good.url}: OK"
        bad.faults["train-000004.tar"] = ["500"] * 9
        assert shards_cli.main(["verify", f"{bad.url}?{TOKEN}", "--retries", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == f"{bad.url}: 3 problem(s)"
    assert f"{bad.url}/train-000001.tar: sha256 differs from the manifest" in err
    assert f"{bad.url}/test-000001.tar: HTTP 404 Not Found (missing)" in err
    assert f"{bad.url}/train-000004.tar: HTTP 500 Internal Server Error; gave up after 2 tries" in err
    assert "SECRET" not in out + err


def test_verify_refuses_a_missing_manifest_and_an_unreachable_server_in_one_line(tmp_path, capsys):
    with FaultServer(tmp_path, lifetime_s=30) as empty:
        assert shards_cli.main(["verify", empty.url]) == 2
        assert f"no shard manifest at {empty.url}/manifest.json" in capsys.readouterr().err
        closed = empty.url
    assert shards_cli.main(["verify", closed, "--retries", "0"]) == 1  # the server is gone: connection refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{closed}/manifest.json: ConnectionRefusedError" in err


def test_pipe_command_reads_the_shards(shards, tmp_path, vocab):
    local, _, _ = train_samples(shards, vocab)
    assert train_samples(f"pipe:cat {shards}/{{name}}", vocab)[0] == local
    flaky = tmp_path / "flaky.sh"  # the first run for each file stops half-way and fails; a re-run sends it whole
    flaky.write_text('f="$1"; m="$2/$(basename "$f").tried"\n'
                     'if [ -e "$m" ]; then cat "$f"; else touch "$m"; head -c $(( $(wc -c < "$f") / 2 )) "$f"; exit 3; fi\n')
    samples, _, accounting = train_samples(f"pipe:sh {flaky} {shards}/{{name}} {tmp_path}", vocab)
    assert samples == local and accounting.totals()["samples_lost"] == 0
    assert len(list(tmp_path.glob("train-*.tar.tried"))) == 6
    missing = Path(shutil.copytree(shards, tmp_path / "gappy"))
    (missing / "train-000005.tar").unlink()
    with pytest.warns(UserWarning, match=r"skipping shard pipe:cat .*train-000005.tar: OSError: command exited with status 1"):
        samples, _, accounting = train_samples(f"pipe:cat {missing}/{{name}}", vocab)
    assert accounting.totals()["samples_lost"] >= 4 and not {k for k, _, _ in samples} & {"020", "021", "022", "023"}


def test_s3_endpoint_on_localhost(shards, vocab, monkeypatch, capsys):
    """s3:// through s3fs against moto's S3 server on 127.0.0.1, credentials from the environment."""
    pytest.importorskip("s3fs", reason="the dev extra installs s3fs (pip install -e '.[dev]')")
    server_module = pytest.importorskip("moto.server", reason="the dev extra installs moto[s3], flask, flask-cors")
    s3 = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    try:
        host, port = s3.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(key, value)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("t2f-test")
        fs.put([str(p) for p in sorted(shards.iterdir())], "t2f-test/set/")
        url = "s3://t2f-test/set"
        assert train_samples(url, vocab)[0] == train_samples(shards, vocab)[0]
        assert shards_cli.main(["verify", url]) == 0
        fs.rm("t2f-test/set/train-000000.tar")
        assert shards_cli.main(["verify", url]) == 1
        assert f"{url}/train-000000.tar: FileNotFoundError" in capsys.readouterr().err
        with pytest.warns(UserWarning, match=f"skipping shard {url}/train-000000.tar: FileNotFoundError"):
            _, _, accounting = train_samples(url, vocab)
        assert accounting.totals()["samples_lost"] >= 4
    finally:
        s3.stop()


def test_two_process_training_from_http_gives_the_local_weights(tmp_path):
    """2 CPU ranks x 2 loader workers under accelerate launch (gloo): node and worker split, seeded
    shuffle and equal batches per rank read the same samples from HTTP as from the local copy."""
    overrides = [*tiny_overrides(tmp_path, tmp_path / "unused", steps=6), "data.num_workers=2"]
    weights = {}
    with FaultServer(tmp_path / "shards", lifetime_s=240) as server:
        server.faults["train-000002.tar"] = ["drop"]  # resumed mid-shard: still the same samples
        for name, shards in (("local", tmp_path / "shards"), ("http", f"{server.url}?{TOKEN}")):
            run = tmp_path / name
            args = ["--cpu", "--config", "toy", *overrides, f"data.shards={shards}", f"train.run_dir={run}"]
            result = accelerate_launch(ROOT / "t2f" / "train.py", args, tmp_path)
            weights[name] = load_file(str(latest_checkpoint(run) / "t2f.safetensors"))
    assert "SECRET" not in result.stdout + result.stderr
    assert {n for n, _, _ in server.requests if n.startswith("train-")} == {f"train-{i:06d}.tar" for i in range(6)}
    assert server.requested("train-000002.tar")[1].startswith("bytes=")
    assert weights["local"].keys() == weights["http"].keys()
    for key in weights["local"]:
        torch.testing.assert_close(weights["http"][key], weights["local"][key], rtol=0, atol=0, msg=f"differs at {key}")

