"""`t2f eval --table`: a run's numbers next to the paper's, with the protocol of every column.

    t2f eval --table --ckpt runs/mmcelebahq                    # that checkpoint's metrics.json
    t2f eval --table runs/mm/metrics.json runs/ct/metrics.json  # several evaluations, one row each

The paper's numbers (Li and Zhang 2024, Tables 1-3, restated in METHOD.md) are FID and LPIPS on
MM-CelebA-HQ and CelebAText-HQ, and an ablation without text reconstruction. The paper states its
test split (6,000 images per set) and its LPIPS pairing, but not its FID implementation, caption
protocol or resolution; every column of a run says what it was measured with and where that
differs from what the paper states, so a reader sees what is comparable and what is not.
Numbers the paper does not report (KID, CLIP score, R-precision, the toy world's) go in a
second table with their protocols.
"""

import json
from pathlib import Path

PAPER = "Li and Zhang 2024 (METHOD.md)"
DATASETS = {"mmcelebahq": "MM-CelebA-HQ", "celebatext": "CelebAText-HQ"}
PAPER_TEST_IMAGES = 6000  # as the paper states for both sets
# model -> (FID MM-CelebA-HQ, FID CelebAText-HQ, LPIPS MM-CelebA-HQ, LPIPS CelebAText-HQ); None = not reported
PAPER_TABLE = {
    "AttnGAN": (41.33, 70.47, 0.548, 0.524),
    "DM-GAN": (38.35, 70.89, None, None),
    "DF-GAN": (31.54, 64.25, 0.482, 0.457),
    "TediGAN": (28.62, 60.58, 0.456, 0.448),
    "this method": (22.81, 60.52, 0.446, 0.431),
}
PAPER_ABLATION = {"without text reconstruction": (44.31, 0.442), "with text reconstruction": (22.81, 0.431)}
COLUMNS = [("fid", "mmcelebahq"), ("fid", "celebatext"), ("lpips_paired", "mmcelebahq"), ("lpips_paired", "celebatext")]
HEADERS = {"fid": "FID", "lpips_paired": "LPIPS"}
PAPER_PROTOCOL = (f"{PAPER}: the sets' test splits ({PAPER_TEST_IMAGES} images each, as the paper states); FID "
                  "implementation, caption protocol and resolution not stated; LPIPS between a generated image and the "
                  "real image of its caption")


def read_result(path) -> dict:
    """A metrics.json written by `t2f eval` (a file, or a checkpoint / run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        from t2f.checkpointing import resolve_checkpoint

        path = resolve_checkpoint(path) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json here; run `t2f eval --ckpt ...` first")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a metrics.json written by t2f eval ({err})") from None
    if not isinstance(record, dict) or "metrics" not in record or "protocol" not in record:
        raise ValueError(f"{path}: not a metrics.json written by t2f eval (no 'metrics' and 'protocol')")
    return {**record, "path": str(path)}


def differences(record: dict) -> list[str]:
    """Where a run's measurement differs from what the paper states (an empty list: comparable as far as it says)."""
    p, dataset = record["protocol"], record.get("dataset")
    out = []
    if record["protocol"]["test_images"] != PAPER_TEST_IMAGES:
        note = "; the CelebAText-HQ release's test list holds about 1300" if dataset == "celebatext" else ""
        out.append(f"{p['test_images']} test images (the paper states {PAPER_TEST_IMAGES}{note})")
    if dataset == "mmcelebahq" and p.get("caption_protocol") != "mmcelebahq":
        out.append(f"captions '{p.get('caption_protocol')}', not the dataset maintainers' random draw (--protocol mmcelebahq)")
    return out


def protocol_line(record: dict) -> str:
    p = record["protocol"]
    seed = f", caption seed {p['caption_seed']}" if "caption_seed" in p else ""
    return (f"`{p.get('caption_protocol', p['captions'].split(':')[0])}` protocol{seed}: {p['test_images']} "
            f"{p['split']} images, {p['generated_images']} generated, {p['resolution']}, truncation {p['truncation_psi']}, "
            f"sample seed {p['seed']}; step {record.get('step')}, {record['path']}")


def _cell(value, metric: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if metric == "fid" else f"{value:.3f}"


def _run_label(record: dict, n: int) -> str:
    ablation = " without text reconstruction (λ2 = 0)" if record.get("trl_weight") == 0 else ""
    return f"**this run{ablation}** [{n}]"


def paper_table(records: list[dict]) -> list[str]:
    head = "| model | " + " | ".join(f"{HEADERS[m]} {DATASETS[d]}" for m, d in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for model, values in PAPER_TABLE.items():
        lines.append(f"| {model} (paper) | " + " | ".join(_cell(v, m) for v, (m, _) in zip(values, COLUMNS)) + " |")
    for n, record in enumerate(records, 1):
        cells = [_cell(record["metrics"].get(m) if record.get("dataset") == d else None, m) for m, d in COLUMNS]
        lines.append(f"| {_run_label(record, n)} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(records: list[dict]) -> list[str]:
    lines = ["| model | FID | LPIPS | data |", "|---|---:|---:|---|"]
    for model, (fid, lpips) in PAPER_ABLATION.items():
        lines.append(f"| {model} (paper) | {fid:.2f} | {lpips:.3f} | CelebAText-HQ test |")
    for n, record in enumerate(records, 1):
        if record.get("dataset") in DATASETS:
            m = record["metrics"]
            label = "without" if record.get("trl_weight") == 0 else "with"
            data = f"{DATASETS[record['dataset']]} {record['protocol']['split']}"
            lines.append(f"| {label} text reconstruction: this run [{n}] | {_cell(m.get('fid'), 'fid')} | "
                         f"{_cell(m.get('lpips_paired'), 'lpips')} | {data} |")
    return lines


def other_numbers(records: list[dict]) -> list[str]:
    """Every number of every run that the paper tables do not show, with its metric's protocol line."""
    shown = {m for m, _ in COLUMNS}
    lines = ["| run | data | metric | value | protocol |", "|---|---|---|---:|---|"]
    for n, record in enumerate(records, 1):
        values, data = record["metrics"], DATASETS.get(record.get("dataset"), record.get("dataset") or "?")
        for name, value in values.items():
            if (name in shown and record.get("dataset") in DATASETS) or name.endswith("_std"):
                continue
            spread = f" ± {values[name + '_std']:.4f}" if name + "_std" in values else ""
            lines.append(f"| [{n}] | {data} | {name} | {value:.4f}{spread} | {_metric_protocol(record, name)} |")
    return lines if len(lines) > 2 else []


def _metric_protocol(record: dict, value_name: str) -> str:
    metric = record.get("metric_of", {}).get(value_name, value_name)
    line = record["protocol"].get(metric)
    return line.replace("|", "/") if isinstance(line, str) else "see metrics.json"


def markdown_table(records: list[dict]) -> str:
    lines = ["### FID and LPIPS: the paper's Tables 1-2 and this run", "", *paper_table(records), "",
             "Protocol of each column:", f"- paper rows: {PAPER_PROTOCOL}."]
    for n, record in enumerate(records, 1):
        data = DATASETS.get(record.get("dataset"))
        if record.get("dataset") is None:
            verdict = "the record does not name its data set (an older t2f wrote it): evaluate again to place it"
        elif data is None:
            verdict = f"data '{record.get('dataset')}', not one of the paper's sets: nothing here is comparable"
        else:
            diff = differences(record)
            verdict = ("comparable with the paper's column as far as the paper states (its FID implementation is unknown; "
                       "ours is clean-fid)") if not diff else "not comparable with the paper's column: " + "; ".join(diff)
        lines.append(f"- [{n}] {data or record.get('dataset')}: {protocol_line(record)}. **{verdict}.**")
    lines += ["", "### Ablation: the paper's Table 3 and this run", "", *ablation_table(records), "",
              "The paper gives its ablation on CelebAText-HQ, yet its 'with' FID (22.81) is Table 1's MM-CelebA-HQ value; "
              "both are shown as METHOD.md restates them. Runs: λ2 = loss.trl_weight of the evaluated checkpoint."]
    others = other_numbers(records)
    if others:
        lines += ["", "### Numbers the paper does not report", "", *others]
    return "\n".join(lines) + "\n"


def main(sources: list, out=None) -> int:
    """`t2f eval --table`: print (and with `out`, write) the Markdown; 2 on bad input."""
    import sys

    from t2f.checkpointing import CheckpointNotFound

    if not sources:
        print("t2f eval --table: name metrics.json files or checkpoint dirs, or give --ckpt", file=sys.stderr)
        return 2
    try:
        text = markdown_table([read_result(source) for source in sources])
    except (CheckpointNotFound, FileNotFoundError, ValueError) as err:
        print(f"t2f eval --table: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    if out:
        Path(out).write_text(text)
    return 0
