"""`t2f generate` on a tiny checkpoint written by hand in the layout of t2f/checkpointing.py: the
grid a user gets, its determinism, and the one-line errors (exit 2) for every kind of bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_overrides

from t2f import generate

N, RES = 2, 32


def tiny_checkpoint(tmp: Path, step: int = 4) -> Path:
    """A run directory with one complete checkpoint: tiny BERT, tiny saved generator, small recaptioner."""
    from safetensors.torch import save_file

    from t2f.checkpointing import CKPT_DIR, WEIGHTS, checkpoint_name
    from t2f.config import load_config, save_config
    from t2f.data.vocab import Vocab
    from t2f.models.generator import architecture_from_config, build_generator
    from t2f.models.text_encoder import TextEncoder
    from t2f.models.text_to_face import build_text_to_face
    from t2f.models.weights import save_generator

    run = tmp / "run"
    overrides = tiny_overrides(tmp, run, steps=step)
    torch.manual_seed(0)
    generator = build_generator(architecture_from_config(load_config("toy", overrides).generator), impl="ref")
    weights, _ = save_generator(generator, tmp / "generator")
    cfg = load_config("toy", overrides + [f"generator.checkpoint={weights}", "generator.impl=ref"])
    vocab = Vocab.load(Path(cfg.data.shards) / "vocab.json")
    model = build_text_to_face(cfg, TextEncoder(cfg.text.encoder).dim, generator, len(vocab))
    ckpt = run / CKPT_DIR / checkpoint_name(step)
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / WEIGHTS))
    save_config(cfg, ckpt / "config.yaml")
    save_config(cfg, run / "config.yaml")
    vocab.save(ckpt / "vocab.json")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "epoch": 0}))
    (run / CKPT_DIR / "latest").write_text(ckpt.name + "\n")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gen"))


def _generate(run_dir, *args):
    return generate.main(["--ckpt", str(run_dir), "--device", "cpu", *map(str, args)])


def test_grid_has_a_row_per_caption_and_same_seed_gives_same_bytes(run_dir, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    captions = ["the woman has blond hair .", "a smiling man with black hair ."]
    assert _generate(run_dir, *captions, "--n", N, "--seed", 3, "--out", a) == 0
    assert _generate(run_dir, *captions, "--n", N, "--seed", 3, "--out", b) == 0
    assert _generate(run_dir, *captions, "--n", N, "--seed", 4, "--out", c) == 0
    grid = Image.open(a)
    assert grid.width == N * RES and grid.height > 2 * RES  # two rows of images plus caption strips
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_out_dir_writes_one_png_per_image_and_images_do_not_depend_on_other_captions(run_dir, tmp_path):
    alone, together = tmp_path / "alone", tmp_path / "together"
    assert _generate(run_dir, "the woman has blond hair .", "--n", N, "--out-dir", alone) == 0
    assert _generate(run_dir, "the woman has blond hair .", "a man .", "--n", N, "--out-dir", together) == 0
    files = sorted(p.name for p in together.glob("*.png"))
    assert len(files) == 2 * N and Image.open(together / files[0]).size == (RES, RES)
    assert (alone / files[1]).read_bytes() == (together / files[1]).read_bytes()
    assert "a man ." in (together / "captions.tsv").read_text()


def test_captions_file_and_read_back(run_dir, tmp_path):
    listing = tmp_path / "captions.txt"
    listing.write_text("the man has black hair .\n\n  a smiling woman .  \n")
    assert _generate(run_dir, "--captions", listing, "--n", 1, "--read-back", "--out", tmp_path / "g.png") == 0
    assert Image.open(tmp_path / "g.png").width == RES


def test_long_caption_is_cut_with_a_warning_and_the_grid_stays_small(run_dir, tmp_path, capsys):
    words = "the woman has blond hair and is smiling .".split()
    long = " ".join(words[i % len(words)] for i in range(5000))  # far past the toy window of 64 tokens
    assert _generate(run_dir, long, "--n", 1, "--out", tmp_path / "g.png", "--out-dir", tmp_path / "d") == 0
    err = capsys.readouterr().err
    assert "longer than the text encoder's window" in err and err.count("warning:") == 1
    grid = Image.open(tmp_path / "g.png")
    assert grid.height <= 2 * RES + 16  # the image, then at most an image's height of caption (was 33,716 px)
    shown = (tmp_path / "d" / "captions.tsv").read_text(encoding="utf-8").split("\t", 1)[1].strip()
    assert shown.endswith("…") and long.startswith(shown[:-1].rstrip()) and len(shown) < 64 * 8


def test_truncation_edges_are_accepted(run_dir, tmp_path):
    for psi in (0, 2):
        assert _generate(run_dir, "a man .", "--n", 1, "--truncation", psi, "--out", tmp_path / "g.png") == 0


@pytest.mark.parametrize("text", ["äöü ßñç", "Ωμέγα λόγος", "Жизнь мир", "漢字書道", "かなカナ", "한글"])
def test_captions_in_any_script_are_drawn_with_real_glyphs(text):
    """A missing glyph draws the font's .notdef box; a caption must not look like a row of those."""
    from t2f.visual import caption_grid

    image = torch.zeros(1, 3, 96, 96)
    def draw(caption):
        return np.asarray(caption_grid(image, [caption], per_row=1))[96:]  # the caption strip

    missing = "\U0010fffd"  # private use, plane 16: in no font, so it renders as .notdef
    drawn = draw(text)
    assert drawn.min() < 128  # something was written
    assert not np.array_equal(drawn, draw("".join(missing if c != " " else c for c in text)))
    assert not np.array_equal(drawn, draw(text[::-1]))  # distinct characters look distinct


def _bad_inputs(run_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "t2f.safetensors").write_bytes(b"not a safetensors file at all")
    (foreign / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes through permission bits, but not into sysfs
        locked = Path("/sys")
    ok = ["a man ."]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    return {
        "empty caption": (["a man .", "  "], [], "caption 2 is empty"),
        "no caption": ([], [], "no captions"),
        "missing checkpoint": (ok, ["--ckpt", tmp_path / "nowhere"], "no t2f checkpoint here"),
        "wrong-format checkpoint": (ok, ["--ckpt", foreign], "not a readable safetensors file"),
        "missing output folder": (ok, ["--out", tmp_path / "no" / "such" / "dir" / "g.png"], "does not exist"),
        "output is a folder": (ok, ["--out", tmp_path], "is a directory"),
        "unwritable output": (ok, ["--out", locked / "g.png"], "permission denied"),
        "unreadable captions file": (ok, ["--captions", tmp_path / "missing.txt"], "cannot read captions file"),
        "empty captions file": ([], ["--captions", blank], "holds no caption"),
        "NaN truncation": (ok, ["--truncation", "nan"], "--truncation must be a number from 0 to 2"),
        "negative truncation": (ok, ["--truncation", "-0.5"], "--truncation must be a number from 0 to 2"),
        "huge truncation": (ok, ["--truncation", "7"], "--truncation must be a number from 0 to 2"),
    }


@pytest.mark.parametrize("case", ["empty caption", "no caption", "missing checkpoint", "wrong-format checkpoint",
                                  "missing output folder", "output is a folder", "unwritable output",
                                  "unreadable captions file", "empty captions file", "NaN truncation",
                                  "negative truncation", "huge truncation"])
def test_bad_input_gives_one_clear_line_and_status_2(run_dir, tmp_path, capsys, case):
    captions, extra, message = _bad_inputs(run_dir, tmp_path)[case]
    status = generate.main([*captions, "--ckpt", str(run_dir), "--device", "cpu", *map(str, extra)])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
