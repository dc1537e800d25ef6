# solobot image: slim Python, non-root, dependencies in their own cached layer.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 solobot \
 && useradd --system --uid 10001 --gid solobot --home-dir /app --shell /usr/sbin/nologin solobot

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY main.py bot.py ./
COPY utils/ utils/

# LOCK_DIR must be shared between containers that share a bot on one host (a volume);
# across hosts use LOCK_BACKEND=postgres (docker-compose.yml does).
RUN mkdir -p /app/data /run/solobot \
 && chown solobot:solobot /app/data /run/solobot \
 && chmod 0700 /run/solobot
ENV LOCK_DIR=/run/solobot \
    STATE_DIR=/app/data \
    HEALTH_HOST=0.0.0.0 \
    HEALTH_PORT=8080

USER solobot:solobot
EXPOSE 8080

# Python is PID 1 (exec form below) and handles SIGTERM itself: stop fetching, drain, release.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('HEALTH_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["python", "main.py"]
