"""Streaming WebDataset loader for DDP training and evaluation, over shards from t2f/data/shards.py.

    loader = make_train_loader("shards/mmcelebahq", "train", batch_size=12, resolution=256, vocab=vocab,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               num_workers=4, seed=cfg.train.seed, epoch=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:  # exactly len(loader) batches on every rank
            batch["image"]     # (B, 3, H, W) float32 in [-1, 1]
            batch["tokens"]    # (B, T) long: <bos> words <eos> <pad>...  for the recaptioner
            batch["caption"]   # list[str], one caption per image, re-drawn every epoch
            # "text_features" (B, D) float32 when the shards store them, "attributes" (B, A) in {0, 1}
            # when the dataset has labels, "key" list[str]; eval batches add "all_captions";
            # "faults": this worker's data faults since its previous batch (for DataAccounting)

The pipeline is one explicit list of stages (see `stages` in the two `make_*` functions):
shard urls from the manifest -> resampled shards, or shuffled by (seed, epoch) then split by node
then by worker -> tar to samples (a worker cycles its own shards in training) -> shuffle buffer
seeded by (seed, epoch, rank, worker) -> decode to [-1, 1] -> pick one caption -> tokenise ->
batch. Rank and world size are explicit arguments, not torch.distributed globals.

`shards_dir` may also be a URL (https://, s3://, gs://, pipe:; t2f/data/remote.py): the same
stages read the same samples in the same order; a dropped connection resumes where it stopped.

Data faults are skipped, counted and warned about, never fatal inside the loader (only a training
stream that is corrupt through and through stops, after MAX_CONSECUTIVE_CORRUPT, rather than spin):
a *corrupt* sample came out of the tar whole but does not decode; a *lost* sample is one the
manifest promised that did not come out whole (the file ends early, a member is missing, or a
remote shard could not be read after `remote.retries`: a 404, a connection that keeps failing),
so a bad shard reports its name (a URL without its query string) and how many samples it lost.
Each batch carries its worker's counts in `batch["faults"]`, so they add up across DataLoader
worker processes and epochs in `loader.corrupt_skipped`, `loader.samples_lost`, `loader.bad_shards`.
The trainer keeps its own `DataAccounting` (see there) that logs the totals and stops the run with
a `DataFaultError` naming the bad shards once they pass `data.max_bad_fraction` of the samples read.

Why the loader is not passed to `accelerator.prepare`: it is already split by rank here, and
prepare would split it a second time (each rank would see 1/world_size of its own share). In
training every rank yields exactly `len(loader)` batches (`with_epoch`), so DDP never waits on a
rank that ran out. Eval loaders read each sample exactly once across all ranks and keep the
partial last batch; ranks may then get different batch counts, so gather results after the loop.
"""

import io
import itertools
import json
import math
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from t2f.data.faults import DataAccounting, DataFaultError, FaultCounter
from t2f.data.manifest import read_manifest
from t2f.data.remote import DEFAULT_REMOTE, is_remote, location_of, open_location, public

__all__ = ["make_train_loader", "make_eval_loader", "read_manifest", "ShardLoader", "DataAccounting",
           "DataFaultError"]
MAX_CONSECUTIVE_CORRUPT = 1000  # in training a stream that is all corrupt would otherwise spin forever


class ShardLoader:
    """Iterates a DataLoader over a WebDataset pipeline; adds epoch control and the fault counts."""

    def __init__(self, pipeline, num_workers: int, num_batches: int, state: dict):
        self.batches_per_epoch = num_batches
        self.faults = DataAccounting()  # never stops: the trainer's own DataAccounting does
        self._state = state
        # Own generator: creating an iterator draws a base seed, which would otherwise advance the
        # global torch RNG and make a resumed run's CA noise differ from an uninterrupted one.
        self._loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                                   pin_memory=torch.cuda.is_available(),
                                                   generator=torch.Generator().manual_seed(0))

    def set_epoch(self, epoch: int) -> None:
        """Re-seed shard order, shuffle buffer and caption choice (workers restart every epoch)."""
        self._state["epoch"] = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def corrupt_skipped(self) -> int:
        return self.faults.corrupt

    @property
    def samples_lost(self) -> int:
        return self.faults.lost

    @property
    def bad_shards(self) -> dict:
        """{shard path: {"lost": n, "corrupt": n, "short_reads": n}} summed over all workers and epochs so far."""
        return {path: dict(zip(("lost", "corrupt", "short_reads"), counts)) for path, counts in self.faults.shards.items()}

    def __iter__(self):
        for batch in self._loader:
            self.faults.warn_new_bad_shards(batch["faults"])  # here, in the main process: once per shard, not per worker
            self.faults.update(batch)
            if "image" in batch:  # a batch of only "faults" reports them at the end of a stream
                yield batch


def make_train_loader(shards_dir, split, *, batch_size, resolution, vocab, rank=0, world_size=1, num_workers=0,
                      seed=0, epoch=0, resampled=False, shuffle_buffer=1000, max_tokens=50,
                      remote=DEFAULT_REMOTE) -> ShardLoader:
    """Shuffled training batches of exactly `batch_size`, the same number on every rank. `shards_dir`
    may be a URL (t2f/data/remote.py); `remote` bounds the retries of a remote shard."""
    manifest, urls, total = _split_shards(shards_dir, split, remote)
    read = _shard_reader(manifest, urls, split, remote)
    readers = world_size * max(1, num_workers)
    if not resampled and len(urls) < readers:
        raise ValueError(f"split {split!r} in {public(shards_dir)} has {len(urls)} shards, but {world_size} rank(s) x "
                         f"{max(1, num_workers)} worker(s) need at least {readers} (one each); rebuild with a smaller "
                         "--shard-size, use fewer data.num_workers, or set data.resampled=true")
    state, counter = {"epoch": int(epoch)}, FaultCounter(limit=MAX_CONSECUTIVE_CORRUPT)
    if resampled:
        shards = [partial(_resampled_urls, urls, seed, state, rank)]
    else:
        shards = [partial(_url_list, urls, seed, state), partial(_split_by_node, rank=rank, world_size=world_size),
                  _split_by_worker]
    stages = shards + [
        partial(_read_shards, read=read, counter=counter, cycle=not resampled, seed=seed, state=state, rank=rank),
        partial(_shuffle, bufsize=shuffle_buffer, seed=seed, state=state, rank=rank),
        partial(_decode, resolution=resolution, counter=counter, features=manifest["text_encoder"] is not None),
        partial(_pick_caption, vocab=vocab, max_tokens=max_tokens, seed=seed, state=state, train=True),
        partial(_batch, batch_size=batch_size, vocab=vocab, attribute_names=manifest["attributes"], counter=counter,
                keep_partial=False),
    ]
    per_worker = math.ceil(math.ceil(total / (batch_size * world_size)) / max(1, num_workers))
    pipeline = wds.DataPipeline(*stages).with_epoch(nbatches=per_worker)
    return ShardLoader(pipeline, num_workers, per_worker * max(1, num_workers), state)


def make_eval_loader(shards_dir, split, *, batch_size, resolution, vocab, rank=0, world_size=1, num_workers=0,
                     max_tokens=50, remote=DEFAULT_REMOTE) -> ShardLoader:
    """Every sample exactly once across ranks, in a fixed order, first caption, partial last batch."""
    manifest, urls, _ = _split_shards(shards_dir, split, remote)
    read = _shard_reader(manifest, urls, split, remote)
    state, counter = {"epoch": 0}, FaultCounter(limit=None)
    stages = [
        partial(_url_list, urls, None, state),
        partial(_split_by_node, rank=rank, world_size=world_size),
        _split_by_worker,
        partial(_read_shards, read=read, counter=counter, cycle=False, seed=0, state=state, rank=rank),
        partial(_decode, resolution=resolution, counter=counter, features=manifest["text_encoder"] is not None),
        partial(_pick_caption, vocab=vocab, max_tokens=max_tokens, seed=0, state=state, train=False),
        partial(_batch, batch_size=batch_size, vocab=vocab, attribute_names=manifest["attributes"], counter=counter,
                keep_partial=True),
    ]
    num_batches = _eval_batches(manifest, split, rank, world_size, num_workers, batch_size)
    return ShardLoader(wds.DataPipeline(*stages), num_workers, num_batches, state)


def _eval_batches(manifest, split, rank, world_size, num_workers, batch_size) -> int:
    """Each worker batches its own shards, so the count is a sum of per-worker ceilings."""
    mine = [e["count"] for e in manifest["splits"][split]["shards"]][rank::world_size]
    workers = max(1, num_workers)
    return sum(math.ceil(sum(mine[w::workers]) / batch_size) for w in range(workers))


# ---------------------------------------------------------------------------- shard stages


def _split_shards(shards_dir, split, remote):
    manifest = read_manifest(shards_dir, remote)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in {public(location_of(shards_dir, 'manifest.json'))}; "
                         f"it has: {', '.join(manifest['splits']) or 'none'}")
    urls = [location_of(shards_dir, e["name"]) for e in manifest["splits"][split]["shards"]]
    # a remote shard that is missing is skipped and counted when it is read (one request per shard here would be slow)
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}; "
                                f"re-run the build command or `t2f shards verify {shards_dir}`")
    total = manifest["splits"][split]["count"]
    if not urls or total == 0:
        raise ValueError(f"split {split!r} in {public(shards_dir)} holds no samples")
    return manifest, urls, total


def _shard_reader(manifest, urls, split, remote):
    """_read_shard with each shard's sample count and the members every sample has (t2f/data/writer.py)."""
    counts = {url: e["count"] for url, e in zip(urls, manifest["splits"][split]["shards"])}
    required = {"json", manifest.get("image_format") or "png"} | ({"text.npy"} if manifest["text_encoder"] else set())
    return partial(_read_shard, counts=counts, required=frozenset(required), remote=remote)


def _worker_id():
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _rng(*parts) -> random.Random:
    return random.Random("-".join(map(str, parts)))  # str seeds hash stably across processes


def _url_list(urls, seed, state):
    """The split's shards: manifest order for eval, shuffled by (seed, epoch) for training (the
    same order on every rank, so the node split below is a partition)."""
    order = list(urls)
    if seed is not None:
        _rng(seed, state["epoch"]).shuffle(order)
    yield from ({"url": u} for u in order)


def _resampled_urls(urls, seed, state, rank):
    rng = _rng(seed, state["epoch"], rank, *_worker_id())
    while True:
        yield {"url": rng.choice(urls)}


def _split_by_node(src, rank, world_size):
    yield from itertools.islice(src, rank, None, world_size)


def _split_by_worker(src):
    worker, workers = _worker_id()
    yield from itertools.islice(src, worker, None, workers)


def _read_shards(src, read, counter, cycle, seed, state, rank):
    """Samples of one shard after another. In training a worker cycles its own shards (reshuffled
    each pass) until `with_epoch` ends the epoch, so a worker with few samples never runs short."""
    if not cycle:  # eval, or resampled urls (an endless stream already)
        for item in src:
            yield from read(item["url"], counter)
        return
    urls = [item["url"] for item in src]
    rng = _rng(seed, state["epoch"], rank, *_worker_id(), "cycle")
    while True:
        found = 0
        for url in urls:
            for sample in read(url, counter):
                found += 1
                yield sample
        if found == 0:
            raise RuntimeError(f"no readable sample in shards {urls}; check them with `t2f shards verify`")
        rng.shuffle(urls)


def _read_shard(url, counter, counts, required, remote):
    """A shard's samples that came out of the tar whole; the rest of its manifest count is lost.
    (A tar cut short ends quietly, or with one error, mid-sample: only the count tells. A remote
    stream that gave up after its retries ends the shard the same way, and says why.)"""
    name, whole = public(url), 0  # samples and counts carry the name without a query string
    try:
        stream = open_location(url, remote)
    except OSError as err:  # a local shard removed since the loader started
        counter.lose(name, counts[url], unreadable=f"{name}: {err.strerror or err}")
        return
    with stream:  # unreadable data ends the shard or skips a member; the count below tells what it cost
        files = tar_file_expander([{"url": name, "stream": stream}], handler=wds.ignore_and_continue)
        for sample in group_by_keys(files, handler=wds.ignore_and_continue):
            if required <= sample.keys():
                whole += 1
                counter.read += 1
                yield sample
    error = getattr(stream, "error", None)  # a RemoteError once a remote stream gave up
    # not reached when with_epoch stops mid-shard: nothing lost
    counter.lose(name, counts[url] - whole, unreadable=str(error) if error else None)


def _shuffle(src, bufsize, seed, state, rank):
    """Buffer shuffle seeded by (seed, epoch, rank, worker): reproducible, different per reader."""
    rng = _rng(seed, state["epoch"], rank, *_worker_id(), "buffer")
    buffer = []
    for sample in src:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        i = rng.randrange(bufsize)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------- sample stages


def _decode(src, resolution, counter, features):
    for sample in src:
        try:
            yield _decode_one(sample, resolution, features)
            counter.consecutive = 0
        except Exception as err:  # any malformed member: skip the sample, never the run
            counter.skip(sample, err)


def _decode_one(sample, resolution, features) -> dict:
    from PIL import Image

    meta = json.loads(sample["json"])
    data = sample.get("png") or sample.get("jpg")
    if data is None:
        raise ValueError("no .png or .jpg member")
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    out = {"key": meta["id"], "image": pixels, "captions": list(meta["captions"]),
           "attributes": meta.get("attributes")}
    if not out["captions"]:
        raise ValueError("no captions")
    if features:
        rows = np.load(io.BytesIO(sample["text.npy"]), allow_pickle=False)  # (n_captions, D)
        if rows.shape[0] != len(out["captions"]):
            raise ValueError(f"{rows.shape[0]} feature rows for {len(out['captions'])} captions")
        out["features"] = rows
    return out


def _pick_caption(src, vocab, max_tokens, seed, state, train):
    """Training: one caption uniformly at random, the draw depending on (seed, epoch, key) only."""
    for sample in src:
        n = len(sample["captions"])
        index = _rng(seed, state["epoch"], sample["key"], "caption").randrange(n) if train else 0
        sample["caption"] = sample["captions"][index]
        sample["tokens"] = vocab.encode(sample["caption"], max_tokens=max_tokens)
        if "features" in sample:
            sample["features"] = sample["features"][index]
        yield sample


def _batch(src, batch_size, vocab, attribute_names, counter, keep_partial):
    group = []
    for sample in src:
        group.append(sample)
        if len(group) == batch_size:
            yield _collate(group, vocab, attribute_names, counter, keep_partial)
            group = []
    if group and keep_partial:
        yield _collate(group, vocab, attribute_names, counter, keep_partial)
    elif counter.pending():
        yield {"faults": counter.take()}


def _collate(group, vocab, attribute_names, counter, eval_mode) -> dict:
    # uint8 until here: one vectorised conversion per batch instead of one per image
    batch = {"image": torch.stack([s["image"] for s in group]).float().div_(127.5).sub_(1.0),  # (B, 3, H, W)
             "caption": [s["caption"] for s in group],
             "tokens": vocab.pad_batch([s["tokens"] for s in group]),  # (B, T)
             "key": [s["key"] for s in group], "faults": counter.take()}
    if all("features" in s for s in group):
        batch["text_features"] = torch.from_numpy(np.stack([s["features"] for s in group]).astype(np.float32))  # (B, D)
    if attribute_names and all(s["attributes"] for s in group):
        rows = [[float(s["attributes"][name]) for name in attribute_names] for s in group]
        batch["attributes"] = torch.tensor(rows, dtype=torch.float32)  # (B, A)
    if eval_mode:
        batch["all_captions"] = [s["captions"] for s in group]
    return batch
