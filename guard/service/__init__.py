"""memguard as an HTTP service (FastAPI + uvicorn; ``pip install 'memguard[serve]'``)."""

from .app import create_app
from .batching import MicroBatcher

__all__ = ["MicroBatcher", "create_app"]
