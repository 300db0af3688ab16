"""`specstream serve`: a local server speaking OpenAI's and Anthropic's APIs (app.py), their
request schemas (schemas.py, anthropic_api.py), tool-call parsing (tools.py) and the
worker that runs one model for many clients (engine.py). Needs the `serve` extra:
pip install 'specstream-mlx[serve]'."""
