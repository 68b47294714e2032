# tcp-info: TCP socket collector. Run with host networking; needs no capabilities:
#   docker run --network=host --cap-drop=ALL --read-only \
#     -v tcpinfo-data:/data -v tcpinfo-sock:/run/tcpinfo IMAGE
# BASE may be any Debian-like image with python3 + pip (CI uses a debootstrap image).
ARG BASE=python:3.12-slim

# ---- build stage: compiles the cffi C core into a wheel, fetches dependency wheels
FROM ${BASE} AS build
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
      || apt-get install -y -qq --no-install-recommends python3-dev >/dev/null; } \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY cffi_build/ cffi_build/
COPY src/ src/
RUN pip wheel -q --wheel-dir /wheels .

# ---- runtime stage: no compiler, non-root, read-only friendly
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OUTPUT=/data \
    TCPINFO_EVENTSOCKET=/run/tcpinfo/tcpevents.sock \
    PROMETHEUSX_LISTEN_ADDRESS=:9990
COPY --from=build /wheels /tmp/wheels
# installs tcp-info, csvtool and tcpinfo-events (the consumer deploy/compose.yaml runs)
RUN pip install -q --no-index --find-links /tmp/wheels tcpinfo \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin tcpinfo \
 && mkdir -p /data /run/tcpinfo \
 && chown tcpinfo:tcpinfo /data /run/tcpinfo
USER 10001:10001
WORKDIR /data
VOLUME ["/data", "/run/tcpinfo"]
EXPOSE 9990
# Port follows PROMETHEUSX_LISTEN_ADDRESS (default :9990).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; p = os.environ.get('PROMETHEUSX_LISTEN_ADDRESS', ':9990').rsplit(':', 1)[1]; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % p, timeout=4).read()"]
ENTRYPOINT ["tcp-info"]
