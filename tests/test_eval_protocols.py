"""`t2f eval` end to end on a tiny checkpoint: the mmcelebahq caption protocol (seeded, recorded,
printed beside every number), CLIP metrics skipped with the reason when the text encoder has no
image tower, and `t2f eval --table` (the run beside the paper, each column's protocol)."""

import copy
import json

import pytest
from test_eval import eval_setup  # noqa: F401  (module fixture: tiny checkpoint, LPIPS files, toy classifier)

from t2f.eval import evaluate
from t2f.eval.protocols import drawn_caption


def test_caption_draw_depends_only_on_seed_and_image():
    draws = [drawn_caption(0, f"{i:05d}", 10) for i in range(2000)]
    assert draws == [drawn_caption(0, f"{i:05d}", 10) for i in range(2000)]  # no hidden state
    counts = [draws.count(c) for c in range(10)]
    assert min(counts) > 150 and max(counts) < 250  # about uniform over the ten captions
    other = [drawn_caption(1, f"{i:05d}", 10) for i in range(2000)]
    assert sum(a == b for a, b in zip(draws, other)) < 300  # another seed, another draw (~1/10 agree)


def _run(args, out, *extra):
    assert evaluate.main(args + ["--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_mmcelebahq_protocol_draws_one_caption_per_image_and_records_it(eval_setup, tmp_path, capsys):  # noqa: F811
    _, args = eval_setup
    args = args + ["--metrics", "bleu", "--protocol", "mmcelebahq"]
    first = _run(args, tmp_path / "a.json")
    printed = capsys.readouterr().out
    again = _run(args, tmp_path / "b.json")
    other = _run(args, tmp_path / "c.json", "eval.caption_seed=5")

    p = first["protocol"]
    assert p["caption_protocol"] == "mmcelebahq" and p["caption_seed"] == 0 and p["generated_images"] == 8
    assert p["resolution"] == "generated 32px resized to 256px (antialiased bicubic)"
    assert p["deviations"] == ["the split holds 8 images, the protocol's test split 6000"]
    drawn = first["captions_drawn"]
    assert len(drawn) == 8 and set(drawn.values()) == {0, 1}  # the tiny shards hold 2 captions per image
    assert drawn == again["captions_drawn"] and first["metrics"] == again["metrics"]
    assert other["captions_drawn"] != drawn and other["protocol"]["caption_seed"] == 5
    number_line = next(line for line in printed.splitlines() if line.strip().startswith("bleu4"))
    assert "[mmcelebahq, caption seed 0; sacreBLEU" in number_line
    assert "not the mmcelebahq protocol: the split holds 8 images" in printed


def test_mmcelebahq_protocol_refuses_another_resolution(eval_setup, capsys):  # noqa: F811
    _, args = eval_setup
    assert evaluate.main(args + ["--metrics", "bleu", "--protocol", "mmcelebahq", "eval.resolution=64"]) == 2
    err = capsys.readouterr().err
    assert "eval.resolution=64 contradicts --protocol mmcelebahq" in err and "Traceback" not in err


def test_clip_metrics_are_skipped_with_the_reason_without_an_image_tower(eval_setup, tmp_path, capsys):  # noqa: F811
    _, args = eval_setup  # the tiny checkpoint's text encoder is a BERT, like the toy world's MiniLM
    with pytest.warns(UserWarning) as caught:
        record = _run(args, tmp_path / "m.json", "--metrics", "bleu,clip_score,r_precision")
    assert sorted(str(w.message).split(":")[1] for w in caught) == [" skipping clip_score", " skipping r_precision"]
    assert set(record["metrics"]) == {"bleu4"}
    assert set(record["skipped"]) == {"clip_score", "r_precision"}
    assert "has no CLIP image tower" in record["skipped"]["clip_score"]
    assert "clip_score" in capsys.readouterr().out  # printed as skipped, with the reason


# ---------------------------------------------------------------------------- t2f eval --table


@pytest.fixture(scope="module")
def result(eval_setup):  # noqa: F811
    """metrics.json of an evaluation, where `t2f eval` writes it by default: into the checkpoint."""
    from t2f.checkpointing import latest_checkpoint

    tmp, args = eval_setup
    assert evaluate.main(args + ["--metrics", "lpips,bleu", "--protocol", "mmcelebahq"]) == 0
    return json.loads((latest_checkpoint(tmp / "run") / "metrics.json").read_text())


def test_table_of_a_checkpoint_reads_its_metrics_json(eval_setup, result, capsys):  # noqa: F811
    tmp, _ = eval_setup
    capsys.readouterr()
    assert evaluate.main(["--table", "--ckpt", str(tmp / "run")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("### FID and LPIPS: the paper's Tables 1-2 and this run")
    assert f"| [1] | custom | lpips_paired | {result['metrics']['lpips_paired']:.4f} |" in table


def _table(records, tmp_path, capsys) -> str:
    paths = []
    for i, record in enumerate(records):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(record))
    assert evaluate.main(["--table", *map(str, paths)]) == 0
    return capsys.readouterr().out


def test_table_puts_a_run_beside_the_papers_numbers_with_its_protocol(result, tmp_path, capsys):
    table = _table([result], tmp_path, capsys)
    assert "| this method (paper) | 22.81 | 60.52 | 0.446 | 0.431 |" in table
    assert "| without text reconstruction (paper) | 44.31 | 0.442 |" in table
    assert "data 'custom', not one of the paper's sets: nothing here is comparable" in table  # the tiny shards
    assert "| [1] | custom | lpips_paired |" in table and "LPIPS v0.1 AlexNet" in table  # its numbers, elsewhere

    mm = copy.deepcopy(result) | {"dataset": "mmcelebahq"}
    ablation = copy.deepcopy(mm) | {"trl_weight": 0.0}
    full = copy.deepcopy(mm)
    full["protocol"].update(test_images=6000, generated_images=6000)
    table = _table([mm, ablation, full], tmp_path, capsys)
    lpips = f"{result['metrics']['lpips_paired']:.3f}"
    assert f"| **this run** [1] | – | – | {lpips} | – |" in table
    assert f"| **this run without text reconstruction (λ2 = 0)** [2] | – | – | {lpips} | – |" in table
    assert "[1] MM-CelebA-HQ: `mmcelebahq` protocol, caption seed 0: 8 test images" in table
    assert "**not comparable with the paper's column: 8 test images (the paper states 6000).**" in table
    assert "[3] MM-CelebA-HQ" in table and "**comparable with the paper's column as far as the paper states" in table
    assert f"| without text reconstruction: this run [2] | – | {lpips} | MM-CelebA-HQ test |" in table

    one = copy.deepcopy(full)
    one["protocol"]["caption_protocol"] = "one"
    assert "captions 'one', not the dataset maintainers' random draw" in _table([one], tmp_path, capsys)


def test_table_of_nothing_or_of_a_foreign_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    assert evaluate.main(["--table", str(tmp_path / "x.json")]) == 2
    assert "not a metrics.json written by t2f eval" in capsys.readouterr().err
    assert evaluate.main(["--table", str(tmp_path / "missing.json")]) == 2
    assert evaluate.main(["--table"]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "--ckpt" in err and "Traceback" not in err
