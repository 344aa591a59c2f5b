# syntax=docker/dockerfile:1
# The luaq image: `luaq run /etc/luaq/entries.yaml` by default (what the operator's worker
# Deployments run, the ConfigMap mounted there), `luaq-operator` for the operator (the Helm
# chart's Deployment). Runs as a non-root user on a read-only root filesystem; only /tmp must be
# writable. Build with `docker build -t luaq .`; tests/test_image.py installs the package as the
# build stage does.

# The base image by the digest of its multi-platform index, so that a rebuild gets the same Python
# and Debian packages until this line changes. To bump it, take the newest 3.11 patch release and
# read its index digest ("Digest:", the first line) with
#   docker buildx imagetools inspect python:3.11.X-slim-bookworm
# then replace the tag and the digest here together.
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:b18992999dbe963a45a8a4da40ac2b1975be1a776d939d098c647482bcad5cba

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/luaq
WORKDIR /src
COPY constraints.txt pyproject.toml README.md LICENSE ./
COPY runtime/ runtime/
COPY operator/ operator/
# Wheels only, so nothing is compiled here either; the versions are pinned by constraints.txt.
# The venv gets no pip (nor setuptools, nor wheel): the base image's pip installs into it from
# outside (--python), so the final image carries no installer.
RUN python -m venv --without-pip "$VIRTUAL_ENV" \
    && python -m pip --python "$VIRTUAL_ENV/bin/python" install --only-binary=:all: \
        --constraint constraints.txt ".[operator]"

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
