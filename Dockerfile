# vigil service image: `vigil run` (consume the configured feeds) and `vigil serve` (REST API) in docker-compose.yml.
# Two stages: wheels are built with the full toolchain, the runtime image only installs them and runs as non-root.
# Base image pinned by exact tag (CPython 3.11.7, Debian 12 "bookworm"; the version the project's venv and tests run
# on). Not pinned by digest: no registry of images is reachable where this file was written, so no digest could be
# verified; pin `python:3.11.7-slim-bookworm@sha256:...` once you have pulled it (`docker buildx imagetools inspect`).
# Dependencies: requirements.lock holds the full runtime closure at exact versions (pyproject.toml pins the direct
# ones); both stages resolve with it as a constraints file, so a rebuild installs exactly the tested versions.
FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY vigil ./vigil
COPY ingest ./ingest
COPY ontology ./ontology
COPY monitors ./monitors
COPY alerts ./alerts
COPY retrain_trigger ./retrain_trigger
COPY dashboards ./dashboards
RUN pip wheel --wheel-dir /wheels -c requirements.lock ".[postgres]"

FROM python:3.11.7-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIGIL_CONFIG=/etc/vigil/vigil.yaml
COPY --from=build /wheels /tmp/wheels
COPY --from=build /src/requirements.lock /tmp/requirements.lock
RUN pip install --no-index --find-links /tmp/wheels -c /tmp/requirements.lock "vigil[postgres]" \
 && rm -rf /tmp/wheels /tmp/requirements.lock \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/vigil --create-home vigil \
 && mkdir -p /var/lib/vigil/dashboards /etc/vigil \
 && chown -R vigil:vigil /var/lib/vigil
# A named volume mounted on /var/lib/vigil/dashboards starts with this ownership, so `vigil dashboards build` can write.
# The configuration (vigil.yaml, concept maps, PCCPs) is mounted at /etc/vigil by docker-compose.yml, not baked in:
# it is site-specific, and changing it must not need a rebuild.
USER vigil
WORKDIR /var/lib/vigil
EXPOSE 8000
ENTRYPOINT ["vigil"]
CMD ["--help"]
