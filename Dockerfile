# zonemesh image for the Helm chart (charts/zonemesh): `docker build -t zonemesh/zonemesh:0.1.0 .`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY registry registry
COPY policy policy
COPY zonemesh zonemesh
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home zonemesh
USER 10001
ENTRYPOINT ["zonemesh"]
