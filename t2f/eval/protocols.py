"""Caption protocols of `t2f eval --protocol`: which captions make the generated images, at what size.

- one: one image per test image, from its first caption;
- all: one image per caption, every caption of every test image;
- mmcelebahq: the MM-CelebA-HQ maintainers' protocol (IIGROUP/MM-CelebA-HQ-Dataset, issue 9):
  the 6,000 test images, one of each image's captions drawn at random, 6,000 generated images
  compared with the 6,000 real test images at 256x256 (FID and LPIPS in their papers).
  The draw is seeded by `eval.caption_seed` and recorded (the seed beside every number, the drawn
  caption of every image in metrics.json); each image's draw depends only on the seed and the
  image id, so it is the same on any number of ranks and in any batch. A run that differs from
  the protocol (a subset, another split size) says so in the record's `deviations`.
"""

from t2f.inference import sample_seed

PROTOCOLS = {"one": "one image per test image, from its first caption",
             "all": "one image per caption, every caption of every test image",
             "mmcelebahq": "the MM-CelebA-HQ maintainers' protocol: every test image, one of its captions drawn at random "
                           "(seeded by eval.caption_seed), compared with the real test images at 256px"}
MMCELEBAHQ_TEST_IMAGES = 6000
MMCELEBAHQ_RESOLUTION = 256


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def drawn_caption(caption_seed: int, key: str, count: int) -> int:
    """The index of the caption the mmcelebahq protocol draws for image `key` among its `count` captions."""
    return sample_seed("caption-draw", caption_seed, key) % count


def protocol_captions(e, key: str, captions: list) -> list[tuple[int, str]]:
    """(caption index, caption) pairs to generate from for one test image under `e.protocol`."""
    if e.protocol == "all":
        return list(enumerate(captions))
    index = drawn_caption(e.caption_seed, key, len(captions)) if e.protocol == "mmcelebahq" else 0
    return [(index, captions[index])]


def eval_resolution(cfg) -> int:
    """The size images are compared at: 256 under mmcelebahq, else eval.resolution or data.resolution."""
    e = cfg.eval
    if e.protocol == "mmcelebahq":
        if e.resolution not in (0, MMCELEBAHQ_RESOLUTION):
            raise ValueError(f"eval.resolution={e.resolution} contradicts --protocol mmcelebahq, which compares at "
                             f"{MMCELEBAHQ_RESOLUTION}px; drop the override or use --protocol one")
        return MMCELEBAHQ_RESOLUTION
    return e.resolution or cfg.data.resolution


def deviations(protocol: str, seen: int, split_count: int) -> list[str]:
    """How this evaluation differs from the named protocol (empty: it is the protocol)."""
    if protocol != "mmcelebahq":
        return []
    out = []
    if split_count != MMCELEBAHQ_TEST_IMAGES:
        out.append(f"the split holds {split_count} images, the protocol's test split {MMCELEBAHQ_TEST_IMAGES}")
    if seen != split_count:
        out.append(f"{seen} of the split's {split_count} images evaluated (a subset)")
    return out
