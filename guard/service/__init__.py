"""memguard as an HTTP service (FastAPI + uvicorn; ``pip install 'memguard[serve]'``)."""
