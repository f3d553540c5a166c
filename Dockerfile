# zonemesh image for the Helm chart (charts/zonemesh): `docker build -t zonemesh/zonemesh:0.1.0 .`
# The wheel is built where gcc is (the request path is compiled with mypyc), then installed in a slim image.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway gateway
COPY registry registry
COPY policy policy
COPY zonemesh zonemesh
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels && useradd --uid 10001 --no-create-home zonemesh
USER 10001
ENTRYPOINT ["zonemesh"]
