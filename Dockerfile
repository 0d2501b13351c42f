# syntax=docker/dockerfile:1
# The one image definition of the suite: every service in services.toml and the gateway.
# The build context is the repository root; the build argument SERVICE names what to build:
#   docker build --build-arg SERVICE=customer-svc -t registry.example.com/crm/customer-svc:1.4.0 .
#   docker build --build-arg SERVICE=gateway      -t registry.example.com/crm/gateway:1.4.0 .
#
# Stage "build" generates the gRPC stubs with grpcio-tools and builds wheels for the stubs,
# the chassis and the service; stage "runtime" holds only a virtualenv with those wheels and
# their pinned dependencies (constraints.txt): no compiler, no pip, no grpcio-tools, no tests.
# The runtime runs as a non-root user and writes nothing outside /tmp, so it works with a
# read-only root filesystem (mount an emptyDir on /tmp). Its entrypoint, written from
# services.toml by tools/registry.py, execs `python -m <package>` (serve when given no
# arguments; Kubernetes passes serve or migrate), or gunicorn for the gateway.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Build tools for this stage only (pinned; grpcio-tools matches grpcio in constraints.txt).
RUN pip install --no-cache-dir "grpcio-tools==1.85.1" "setuptools==84.2.1"
COPY constraints.txt ./
COPY tools/gen_protos.py tools/gen_protos.py
COPY proto/ proto/
RUN python tools/gen_protos.py
COPY chassis/ chassis/
COPY services.toml ./
COPY tools/registry.py tools/registry.py
ARG SERVICE
# Refuses a SERVICE that services.toml does not list; /out holds what the runtime copies.
RUN test -n "${SERVICE}" || { echo "--build-arg SERVICE=<a name in services.toml, or gateway> is required" >&2; exit 1; } \
 && mkdir -p /out/bin /out/app \
 && python tools/registry.py entrypoint "${SERVICE}" > /out/bin/crm-entrypoint \
 && chmod 0755 /out/bin/crm-entrypoint \
 && cp services.toml /out/app/services.toml
COPY ${SERVICE}/ ${SERVICE}/
# Non-editable wheels; the runtime virtualenv gets them plus pinned third-party dependencies.
# A gunicorn.conf.py beside the package (the gateway's) goes to /app.
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels ./proto ./chassis "./${SERVICE}" \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --compile -c constraints.txt /wheels/*.whl \
 && if [ -f "${SERVICE}/gunicorn.conf.py" ]; then cp "${SERVICE}/gunicorn.conf.py" /out/app/; fi

FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
LABEL org.opencontainers.image.title="${SERVICE}" \
      org.opencontainers.image.description="CRM ${SERVICE} (its port: services.toml)"
# CRM_REGISTRY: where crm_chassis.registry finds services.toml in the image.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CRM_RUN_DIR=/tmp \
    CRM_REGISTRY=/app/services.toml \
    SERVICE_NAME=${SERVICE} \
    GUNICORN_TMP_DIR=/tmp \
    GUNICORN_CONF=/app/gunicorn.conf.py
RUN groupadd --system --gid 10001 crm \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin crm
COPY --from=build /opt/venv /opt/venv
COPY --from=build /out/app /app
COPY --from=build /out/bin/crm-entrypoint /usr/local/bin/crm-entrypoint
WORKDIR /tmp
USER 10001:10001
# Services: serve = migrate (under an advisory lock) + gRPC + outbox relay + consumers;
# Kubernetes runs `migrate` as an init container first. SIGTERM drains (health NOT_SERVING,
# then in-flight calls). Gateway: gunicorn (gthread workers); HOME=/tmp holds its control
# socket, GUNICORN_TMP_DIR its worker heartbeat files. The script execs: PID 1 is Python.
ENTRYPOINT ["/usr/local/bin/crm-entrypoint"]
