# syntax=docker/dockerfile:1
# The router: `docker build -t llm-router .` then
# `docker run -p 8000:8000 -v router-data:/data llm-router` (settings: environment variables, see README).
# Two stages from the same slim Python: the builder installs the package into /opt/venv (every dependency
# ships manylinux wheels, so no compiler is needed even there); the final stage gets only that venv.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
RUN python -m venv /opt/venv
WORKDIR /src
# the package (and only what building it reads); the rest of the tree is kept out by .dockerignore
COPY pyproject.toml README.md ./
COPY router ./router
COPY local_agent ./local_agent
# versions: pyproject.toml's ranges; pip and setuptools are not needed at run time
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
# a fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it; /data holds the registry and logs
RUN groupadd --system --gid 10001 router \
    && useradd --system --uid 10001 --gid router --home-dir /data --no-create-home --shell /usr/sbin/nologin router \
    && mkdir -p /data \
    && chown router:router /data
COPY --from=builder /opt/venv /opt/venv
# Settings the router reads (router.config.Settings); everything else comes from `docker run -e` / env_file
ENV SQLITE_DB_PATH=/data/models.db \
    LOG_DIR=/data/logs \
    HF_CACHE_DIR=/data/hf_models \
    ROUTER_WORKERS=1
VOLUME ["/data"]
# an empty working directory: no .env or pyproject.toml is read from it, so the environment is the only source
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# worker processes: ROUTER_WORKERS
CMD ["/opt/venv/bin/router", "serve", "--host", "0.0.0.0", "--port", "8000"]
