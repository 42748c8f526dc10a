# One image for every b24sync service; the command picks the service (core, bitrix, portal, migrate).
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --system --uid 10001 b24sync

USER b24sync
EXPOSE 3000 3001 3100
ENTRYPOINT ["b24sync"]
CMD ["core"]
