"""crm_gateway: the edge HTTP gateway (Flask app factory `create_app`)."""

from .app import create_app

__all__ = ["create_app"]
