"""The toy world: procedural faces and captions, a tiny fitted StyleGAN2, an attribute classifier, and
its evaluation metrics (metrics.py, registered with t2f.eval when toy shards are evaluated)."""
