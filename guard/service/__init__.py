"""memguard as an HTTP service (FastAPI + uvicorn; ``pip install 'memguard[serve]'``), in one process or as replicas
of a Ray Serve deployment (``guard.service.ray_serve``, ``pip install 'memguard[ray]'``)."""

from .app import create_app
from .batching import Batcher, BatcherFactory, MicroBatcher

__all__ = ["Batcher", "BatcherFactory", "MicroBatcher", "create_app"]
