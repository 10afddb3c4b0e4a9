# One image for docpipe's processes: workers, the callback receiver, Flower, the metrics
# exporter and the CLI. Built with EXTRAS=local it also runs the provider emulators.
FROM python:3.11-slim AS build
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md celeryconfig.py ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY emulators ./emulators
RUN python -m venv /opt/docpipe \
 && /opt/docpipe/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/docpipe/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 docpipe \
 && mkdir -p /spool && chown docpipe /spool
COPY --from=build /opt/docpipe /opt/docpipe
COPY celeryconfig.py /app/
ENV PATH=/opt/docpipe/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER docpipe
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s CMD ["python", "-c", "import pipeline.config, workers.app"]
CMD ["docpipe", "--help"]
