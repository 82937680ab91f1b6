"""What producers import: `from tasks import generate; generate.delay("Leather Jacket")`."""

from .app import app, configure
from .errors import JobFailed, JobRefused
from .generate import generate
from .requests import BadRequest, GenerateRequest
from .router import FleetNotConfigured, NoRoute

__all__ = ["BadRequest", "FleetNotConfigured", "GenerateRequest", "JobFailed", "JobRefused", "NoRoute", "app", "configure", "generate"]
