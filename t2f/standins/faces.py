"""Small MM-CelebA-HQ and CelebAText-HQ trees in their real layouts, for runs of the paper presets.

    write_mmcelebahq(root, faces)    # CelebA-HQ-img/, celeba-caption/, {train,test}/filenames.pickle, attributes
    write_celebatext(root, faces)    # CelebAimg/, captions/, data_flist/{train,test}.flist, attributes

The faces are toy-world renders (t2f/toy) enlarged to 1024² and saved as JPEG (q95, with a little
grain so the files have a photo's size), 10 MM-CelebA-HQ-style captions each that name exactly
their attributes, and CelebAMask-HQ's 40-attribute file (±1; those the toy world does not draw
are random). Layouts are the ones README.md ("Real data") and METHOD.md describe.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
SIZE = 1024


@dataclass
class Face:
    id: str
    split: str
    image: np.ndarray  # (1024, 1024, 3) uint8
    captions: list
    attributes: dict  # the 40 CelebA names -> +1 / -1


def make_faces(count: int = 12, test: int = 4, seed: int = 0) -> list[Face]:
    """`count` faces (the last `test` of them in the test split) with captions and attributes."""
    from t2f.toy.attributes import sample_face
    from t2f.toy.captions import captions_for
    from t2f.toy.render import render

    rng = np.random.default_rng(seed)
    faces = []
    for i in range(count):
        attrs, nuisance = sample_face(rng)
        small = Image.fromarray(render(attrs, nuisance))
        image = np.asarray(small.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)  # (1024, 1024, 3)
        faces.append(Face(str(i), "test" if i >= count - test else "train", image, captions_for(attrs, rng, 10),
                          celeba_attributes(attrs, rng)))
    return faces


def caption_corpus(count: int = 300, seed: int = 1) -> list[str]:
    """Captions of `count` more faces: the words a CLIP stand-in's vocabulary should spell whole."""
    from t2f.toy.attributes import sample_face
    from t2f.toy.captions import captions_for

    rng = np.random.default_rng(seed)
    return [caption for _ in range(count) for caption in captions_for(sample_face(rng)[0], rng, 10)]


def celeba_attributes(toy: dict, rng) -> dict:
    """The 40 CelebA attributes (±1) of a toy face: its own where the toy world has them, else random."""
    known = {**{name: bool(value) for name, value in toy.items() if name in CELEBA_ATTRIBUTES},
             "No_Beard": not toy["Beard"]}
    return {name: (1 if known[name] else -1) if name in known else int(rng.choice([-1, 1])) for name in CELEBA_ATTRIBUTES}


def write_mmcelebahq(root: Path, faces: list[Face]) -> Path:
    """Multi-Modal CelebA-HQ's layout (IIGROUP/MM-CelebA-HQ-Dataset)."""
    _images_and_captions(root / "CelebA-HQ-img", root / "celeba-caption", faces)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / "filenames.pickle", "wb") as f:
            pickle.dump([face.id for face in faces if face.split == split], f, protocol=2)  # as the Python 2 originals
    _attribute_file(root, faces)
    return root


def write_celebatext(root: Path, faces: list[Face]) -> Path:
    """CelebAText-HQ's layout (cripac-sjx/SEA-T2F): image paths in .flist files."""
    _images_and_captions(root / "CelebAimg", root / "captions", faces)
    (root / "data_flist").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = [f"CelebAimg/{face.id}.jpg\n" for face in faces if face.split == split]
        (root / "data_flist" / f"{split}.flist").write_text("".join(lines))
    _attribute_file(root, faces)
    return root


def _images_and_captions(image_dir: Path, caption_dir: Path, faces: list[Face]) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    caption_dir.mkdir(parents=True, exist_ok=True)
    for face in faces:
        Image.fromarray(face.image).save(image_dir / f"{face.id}.jpg", quality=95)
        (caption_dir / f"{face.id}.txt").write_text("\n".join(face.captions) + "\n", encoding="utf-8")


def _attribute_file(root: Path, faces: list[Face]) -> None:
    """CelebAMask-HQ-attribute-anno.txt: the count, the 40 names, then '<id>.jpg ±1 ...' per image."""
    rows = [f"{face.id}.jpg " + " ".join(str(face.attributes[n]) for n in CELEBA_ATTRIBUTES) for face in faces]
    text = "\n".join([str(len(faces)), " ".join(CELEBA_ATTRIBUTES), *rows]) + "\n"
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text(text)
