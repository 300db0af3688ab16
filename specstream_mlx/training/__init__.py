"""Training the streams: real prompt sources and self-distilled data (data.py), and the
training loop over frozen lower-layer states (train.py)."""
