"""crm_gateway: the edge HTTP gateway (Flask app factory `create_app`).

`create_app` is imported on first use: gunicorn's master imports crm_gateway.worker before it
forks, and must not load the app (gRPC, tracing) with it.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
