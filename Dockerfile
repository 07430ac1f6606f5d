# The relay: small, always on. Build from the repository root:
#   docker build --build-arg VERSION_SHA=$(git rev-parse HEAD) -t textslash-relay .
FROM python:3.11-slim-bookworm

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv

ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app
# Only the relay's half of the lock file: no agent SDK, no browser.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --extra relay

COPY common/ common/
COPY relay/ relay/
# WORKER_MODE=per-owner makes each owner's Machine as vm/fly.toml describes the worker's.
COPY vm/fly.toml vm/fly.toml

# Fly mounts the volume with the uid of the image's user, so a non-root user can own /data.
RUN useradd --create-home --uid 1000 textslash && mkdir -p /data && chown textslash:textslash /data
USER 1000:1000

ARG VERSION_SHA=unknown
ENV DEPLOYED_SHA=${VERSION_SHA} \
    PATH=/app/.venv/bin:${PATH} \
    PORT=3000 \
    HOST=0.0.0.0 \
    RELAY_DB=/data/relay.sqlite3

EXPOSE 3000
CMD ["python", "-m", "relay"]
