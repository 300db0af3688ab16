"""`specstream serve`: an OpenAI-compatible local server (app.py), its request schemas
(schemas.py) and the worker that runs one model for many clients (engine.py). Needs the
`serve` extra: pip install 'specstream-mlx[serve]'."""
