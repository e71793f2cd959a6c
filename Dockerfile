# The pclease service image, and (target `airflow`) Airflow's image with the pclease provider.
#
#   docker build -t pclease:0.1.0 .                            # the service (last stage)
#   docker build --target airflow -t pclease-airflow:3.3.2 .   # Airflow + the provider
#
# Debian slim, because the Polars wheels are manylinux (glibc); musl images would compile
# them. Everything is installed from wheels into one virtualenv in the build stage; the
# final stage copies that virtualenv and adds only tini, so no compiler, pip cache or
# source tree ships. docs/deploy.md explains the signals, the probes and the volumes.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG AIRFLOW_BASE_IMAGE=apache/airflow:3.3.2-python3.11

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pclease_service ./pclease_service
COPY pclease_client ./pclease_client
COPY airflow_plugin ./airflow_plugin
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/pclease \
 && /opt/pclease/bin/pip install --only-binary=:all: "$(ls /wheels/pclease-*.whl)[service]" \
 && /opt/pclease/bin/pclease --version

# Airflow's own image plus the provider (never the service, never the Polars Cloud secret).
# Pass AIRFLOW_BASE_IMAGE to extend an Airflow image of your own instead.
FROM ${AIRFLOW_BASE_IMAGE} AS airflow
COPY --from=build /wheels /tmp/pclease-wheels
RUN pip install --no-cache-dir "$(ls /tmp/pclease-wheels/pclease-*.whl)[airflow]"

FROM ${PYTHON_IMAGE} AS service
# tini as PID 1: forwards SIGTERM and SIGHUP to pclease and reaps the local backend's
# worker processes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pclease \
 && useradd --system --uid 10001 --gid pclease --home-dir /var/lib/pclease \
      --shell /usr/sbin/nologin pclease \
 && install -d -o pclease -g pclease -m 0750 /var/lib/pclease \
 && install -d -m 0755 /etc/pclease
COPY --from=build /opt/pclease /opt/pclease
COPY deploy/docker/healthcheck.py /opt/pclease/healthcheck.py
ENV PATH=/opt/pclease/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# data_dir (this replica's own files) defaults to .pclease under the working directory; the
# deployment configs set data_dir = "/var/lib/pclease" and mount a volume there.
WORKDIR /var/lib/pclease
USER 10001:10001
EXPOSE 8040
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/opt/pclease/bin/python", "/opt/pclease/healthcheck.py", "http://127.0.0.1:8040/healthz"]
ENTRYPOINT ["/usr/bin/tini", "--", "pclease"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8040"]
