# solobot image: slim Python, non-root, dependencies in their own cached layer.
# Build with HEALTHCHECK kept:  docker build -t solobot .   or   podman build --format docker -t solobot .
# (podman's default OCI format drops HEALTHCHECK.) Running it: docs/containers.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 solobot \
 && useradd --system --uid 10001 --gid solobot --home-dir /app --shell /usr/sbin/nologin solobot

WORKDIR /app

# Dependencies first, from the lock (exact versions, hashes checked, nothing resolved at build
# time): this layer is rebuilt only when the requirements change. requirements.txt states the
# direct dependencies; requirements.lock is generated from it (see its header).
COPY requirements.txt requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock

COPY main.py bot.py ./
COPY utils/ utils/
# Byte-code compiled once here, as root: at run time nothing is written (the code is not the
# user's), and the first instruction of main.py comes sooner after `docker run`.
RUN python -m compileall -q utils bot.py

# Lock and state each live in a volume. TWO CONTAINERS OF ONE BOT ON ONE HOST MUST SHARE BOTH:
# - LOCK_DIR: the kernel lock that makes exactly one of them active (file backend);
# - STATE_DIR: the SQLite state -- the epoch that fences a deposed holder, the record of handled
#   updates, the posts' states. With only the lock shared, every leader starts at "epoch 1" and a
#   handover may answer an update twice or send a post twice.
#   e.g. docker run -v solobot-lock:/run/solobot -v solobot-state:/app/data ... (both containers)
# Across hosts use LOCK_BACKEND=postgres with DATABASE_URL: lock and state both live in
# PostgreSQL (docker-compose.yml does), and the volumes only hold what is left of them.
RUN mkdir -p /app/data /run/solobot \
 && chown solobot:solobot /app/data /run/solobot \
 && chmod 0700 /app/data /run/solobot
ENV LOCK_DIR=/run/solobot \
    STATE_DIR=/app/data \
    HEALTH_HOST=0.0.0.0 \
    HEALTH_PORT=8080
VOLUME ["/run/solobot", "/app/data"]

USER solobot:solobot
EXPOSE 8080

# Python is PID 1 (exec form below) and handles SIGTERM itself from its first instruction
# (utils/ops/bootstrap.py): a stop during start-up exits 0 at once, a later one drains and
# releases within SHUTDOWN_TIMEOUT (8 s), below the engines' 10 s grace. `--init` works too.
STOPSIGNAL SIGTERM
# Follows HEALTH_HOST/HEALTH_PORT; with HEALTH_PORT=0 (endpoint off) it checks that the bot's
# process lives (utils/ops/healthcheck.py). /health is 200 for a standby too: it is healthy.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-m", "utils.ops.healthcheck", "/health"]

ENTRYPOINT ["python", "main.py"]
