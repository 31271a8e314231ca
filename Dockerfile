# vigil service image: `vigil run` (consume the configured feeds) and `vigil serve` (REST API) in docker-compose.yml.
# Two stages: wheels are built with the full toolchain, the runtime image only installs them and runs as non-root.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vigil ./vigil
COPY ingest ./ingest
COPY ontology ./ontology
COPY monitors ./monitors
COPY alerts ./alerts
COPY retrain_trigger ./retrain_trigger
COPY dashboards ./dashboards
RUN pip wheel --wheel-dir /wheels ".[postgres]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels "vigil[postgres]" \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/vigil --create-home vigil \
 && mkdir -p /var/lib/vigil/dashboards /etc/vigil \
 && chown -R vigil:vigil /var/lib/vigil
# A named volume mounted on /var/lib/vigil/dashboards starts with this ownership, so `vigil dashboards build` can write.
USER vigil
WORKDIR /var/lib/vigil
EXPOSE 8000
ENTRYPOINT ["vigil"]
CMD ["--help"]
