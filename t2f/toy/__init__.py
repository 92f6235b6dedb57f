"""The toy world: procedural faces and captions, a tiny fitted StyleGAN2, an attribute classifier."""
