"""What producers import: `from tasks import generate; generate.delay("Leather Jacket")`."""

from .app import app, configure
from .generate import generate
from .requests import BadRequest, GenerateRequest
from .router import FleetNotConfigured, NoRoute

__all__ = ["BadRequest", "FleetNotConfigured", "GenerateRequest", "NoRoute", "app", "configure", "generate"]
