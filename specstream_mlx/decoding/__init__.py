"""Decoding: the KV cache, draft trees, context drafts, the per-step controller, and the
single-pass draft/verify step with its token generator (step.py)."""
