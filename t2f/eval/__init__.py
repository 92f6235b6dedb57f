"""Evaluation: FID (clean-fid), LPIPS and text consistency; metrics register in t2f/eval/hooks.py."""
