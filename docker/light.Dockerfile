# The light side: CLI, watcher and Flower. No torch: a small image that starts in a second.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY joycap_queue ./joycap_queue
COPY worker ./worker
RUN pip install .

RUN useradd --create-home --uid 1000 joycap && mkdir -p /inbox && chown joycap:joycap /inbox
USER joycap

CMD ["joycap-queue", "--help"]
