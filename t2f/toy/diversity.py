"""How different the demo's samples of one caption are, against the renderer's own spread.

A caption fixes the 14 attributes and leaves the nuisance open (face shape, position, skin tone,
clothes, background: `Nuisance` in t2f/toy/attributes.py), so the samples of one caption (other
CA noise) should differ in all of it, as random faces with those attributes do. Two measures,
each the mean over captions of a spread over that caption's samples, reported next to the same
spread of the reference: random faces drawn from the world with exactly the caption's
attributes (rejection sampling of the latent map), rendered.

- nuisance (no classifier): the world's latent map reads the nuisance from each *sampled* z (the
  CA head's output, before the mapper); spread = standard deviation over samples, mean over the
  16 nuisance fields. It says whether the CA head leaves the nuisance to its noise. The trained
  mapper sits between z and the face and could still collapse it, which the second measure sees.
- features: mean pairwise L2 distance of the second reader's penultimate features (the seed-2
  classifier, not the judge, t2f/toy/assets/reader) between the generated faces of a caption,
  against that between the reference renders.

`ratio` is generated / reference: 1 is the renderer's own variety, 0 one face per caption.
"""

import numpy as np
import torch

from t2f.toy.attributes import Z_DIM, attribute_vector, attributes_from_vector, check_attributes, params_from_latent
from t2f.toy.captions import parse_caption
from t2f.toy.classifier import READER, features, images_to_tensor, load_classifier
from t2f.toy.render import render

CAPTIONS, SAMPLES = 40, 8
MAX_DRAWS = 500_000  # rejection sampling gives up after this many latents (no face has the attributes)
PROTOCOL = (f"first {CAPTIONS} held-out captions, {SAMPLES} samples each (CA noise seeded per caption and "
            "sample); reference: random faces of the world with the caption's attributes; nuisance = std over "
            "samples of the world's nuisance read from each sampled z, mean of 16 fields; features = mean "
            "pairwise L2 of the second reader's (seed-2 classifier) penultimate features")


def sampled_latents(pipeline, s_row: torch.Tensor, seeds) -> torch.Tensor:
    """The z (K, Z) that `Pipeline.latents` draws for one caption's features with these seeds."""
    rows = []
    for seed in seeds:
        gen = torch.Generator(pipeline.device).manual_seed(int(seed))
        z, _, _ = pipeline.model.ca(s_row[None], deterministic=False, generator=gen)  # (1, Z)
        rows.append(z)
    return torch.cat(rows)


def latents_with_attributes(rng: np.random.Generator, wanted: np.ndarray, count: int) -> np.ndarray:
    """`count` standard-normal z (count, Z) whose face has exactly the attribute vector `wanted`."""
    check_attributes(attributes_from_vector(wanted))  # an impossible face: say which rule it breaks, at once
    found, draws = [], 0
    while len(found) < count:
        if draws >= MAX_DRAWS:
            raise ValueError(f"no face of the toy world has the attributes {wanted.tolist()} in {MAX_DRAWS} draws")
        z = rng.standard_normal((2048, Z_DIM))
        draws += len(z)
        found += [row for row in z if np.array_equal(attribute_vector(params_from_latent(row)[0]), wanted)]
    return np.stack(found[:count])


def nuisance_spread(z: np.ndarray) -> float:
    """Std over samples of each nuisance field the latent map reads from z (K, Z), mean over fields."""
    nuisance = np.stack([params_from_latent(row)[1].to_vector() for row in z])  # (K, 16)
    return float(nuisance.std(axis=0, ddof=1).mean())


def feature_spread(images: torch.Tensor, reader) -> float:
    """Mean pairwise L2 distance of the reader's penultimate features of images (K, 3, H, W)."""
    return torch.pdist(features(images, reader)).mean().item()  # over the K(K-1)/2 pairs


@torch.no_grad()
def sample_diversity(pipeline, captions, samples: int = SAMPLES, seed: int = 0) -> dict:
    """Both spreads of the generated samples and of the reference, and their ratios (module doc)."""
    from t2f.eval.report import truncation_of
    from t2f.inference import sample_seed

    reader = load_classifier(READER, device=pipeline.device)
    rng = np.random.default_rng(seed)
    psi = truncation_of(pipeline.cfg)  # as the evaluation's faces
    spreads = {"nuisance": ([], []), "features": ([], [])}  # (generated, reference)
    s = pipeline.encode(captions)  # (C, S)
    for j, caption in enumerate(captions):
        z = sampled_latents(pipeline, s[j], [sample_seed(seed, j, k) for k in range(samples)])  # (K, Z)
        generated = pipeline.synthesize(pipeline.model.mapping(z, None, truncation_psi=psi))  # (K, 3, H, W)
        reference_z = latents_with_attributes(rng, attribute_vector(parse_caption(caption)), samples)
        renders = images_to_tensor(np.stack([render(*params_from_latent(row)) for row in reference_z]))
        spreads["nuisance"][0].append(nuisance_spread(z.cpu().numpy()))
        spreads["nuisance"][1].append(nuisance_spread(reference_z))
        spreads["features"][0].append(feature_spread(generated, reader))
        spreads["features"][1].append(feature_spread(renders.to(pipeline.device), reader))
    record = {"captions": len(captions), "samples": samples, "protocol": PROTOCOL}
    for name, (gen, ref) in spreads.items():
        record[name] = {"generated": round(float(np.mean(gen)), 4), "reference": round(float(np.mean(ref)), 4),
                        "ratio": round(float(np.mean(gen) / np.mean(ref)), 3)}
    return record

