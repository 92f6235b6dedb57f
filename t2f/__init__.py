"""t2f: text-to-face training on a frozen StyleGAN2, driven by a show-attend-tell recaptioner."""

__version__ = "0.1.0"
