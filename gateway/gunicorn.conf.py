"""gunicorn settings for the gateway: `gunicorn -c gateway/gunicorn.conf.py 'crm_gateway:create_app()'`.

Tracing and gRPC channels are created after the fork (post_fork / first request), never in the
master: gRPC and the OTel batch exporter threads do not survive fork().
"""

import os

from crm_gateway.worker import LIMIT_REQUEST_FIELD_SIZE, LIMIT_REQUEST_FIELDS, LIMIT_REQUEST_LINE

bind = f"{os.environ.get('GATEWAY_HOST', '0.0.0.0')}:{os.environ.get('GATEWAY_PORT', '8080')}"
workers = int(os.environ.get("GATEWAY_WORKERS", "2"))
# gthread, whose own error answers (bad request line 400, 414, 431) are problem+json like the app's.
worker_class = "crm_gateway.worker.ProblemThreadWorker"
# Over these gunicorn answers 414 / 431 itself (the OpenAPI document lists them).
limit_request_line = LIMIT_REQUEST_LINE
limit_request_fields = LIMIT_REQUEST_FIELDS
limit_request_field_size = LIMIT_REQUEST_FIELD_SIZE
threads = int(os.environ.get("GATEWAY_THREADS", "8"))
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = None  # the app logs one JSON line per request
errorlog = "-"
# Read-only root filesystem in Kubernetes: heartbeat files go to a writable tmp dir.
worker_tmp_dir = os.environ.get("GUNICORN_TMP_DIR", "/dev/shm" if os.path.isdir("/dev/shm") else None)


def post_fork(server, worker):
    from crm_gateway.app import init_worker

    init_worker()
