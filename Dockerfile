# syntax=docker/dockerfile:1
# The luaq image: `luaq run /etc/luaq/entries.yaml` by default (what the operator's worker
# Deployments run, the ConfigMap mounted there), `luaq-operator` for the operator (the Helm
# chart's Deployment). Runs as a non-root user on a read-only root filesystem; only /tmp must be
# writable. Build with `docker build -t luaq .`; tests/test_image.py installs the package as the
# build stage does.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/luaq
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
# Wheels only, so nothing is compiled here either; the versions are pinned by constraints.txt.
RUN python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --only-binary=:all: --constraint constraints.txt ".[operator]"

FROM ${PYTHON_IMAGE}
ENV VIRTUAL_ENV=/opt/luaq
COPY --from=build $VIRTUAL_ENV $VIRTUAL_ENV
ENV PATH="$VIRTUAL_ENV/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["luaq"]
CMD ["run", "/etc/luaq/entries.yaml"]
