"""Evaluation: FID (clean-fid), LPIPS and text consistency."""
