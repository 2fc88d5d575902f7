"""OpenAI-compatible serving: FastAPI app, request validation, continuous-batching scheduler."""

from jaxformer.serve.app import ServerThread, create_app, serve
from jaxformer.serve.protocol import APIError
from jaxformer.serve.scheduler import Scheduler

__all__ = ["APIError", "Scheduler", "ServerThread", "create_app", "serve"]
