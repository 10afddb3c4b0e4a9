# One image for every docpipe process: workers, the callback receiver, Flower and the emulators.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY emulators ./emulators
COPY bench ./bench
RUN pip install --no-cache-dir '.[dev]'
ENV PYTHONUNBUFFERED=1
CMD ["docpipe", "--help"]
