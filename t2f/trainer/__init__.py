"""The trainer's parts beside `t2f/train.py` (the entry point): optimiser and schedule, loss, EMA, benchmark."""
