"""Measurement tools: the speculative-vs-plain benchmark (bench.py) and the replay tuner of
drafting settings (tune.py)."""
