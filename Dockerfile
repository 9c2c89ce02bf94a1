# The gateway's container image. Build and run (docs/deploy.md):
#   docker build -t mirror-gateway:0.1.0 .
#   docker run --rm -p 8080:8080 mirror-gateway:0.1.0
# The install steps are the README's lock-based commands; tests/test_image.py runs this file's
# build stage outside Docker on every test run, so CI proves them.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/venv
# Dependencies first, at the lock's exact versions: this layer is reused until the lock changes.
COPY requirements/runtime.txt requirements/runtime.txt
RUN /opt/venv/bin/pip install -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY geodata geodata
RUN /opt/venv/bin/pip install --no-deps .

# Only the runtime: the virtualenv, the example config and the GeoIP updater script (with curl,
# which it needs, for the chart's updater CronJob).
FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent gateway
COPY --from=build /opt/venv /opt/venv
COPY geodata/update_geoip.sh /opt/mirror-gateway/geodata/update_geoip.sh
COPY config/gateway.yaml /etc/mirror-gateway/gateway.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MIRROR_GATEWAY_CONFIG=/etc/mirror-gateway/gateway.yaml
USER 10001:10001
EXPOSE 8080
# The port is server.port of the config; change both together.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["mirror-gateway"]
CMD ["serve"]
