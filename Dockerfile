# flexq: one image for the worker, the simulator and the admin/batch CLI.
#   docker build -t flexq .
#   docker run --rm -e REDIS_URL=redis://host:6379/0 -e GEMINI_API_KEY=... flexq            # a worker
#   docker run --rm -e REDIS_URL=redis://host:6379/0 flexq stats                            # any subcommand
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies first, read from pyproject.toml alone: this layer is rebuilt only when the
# dependency list changes, not on every source edit.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (setuptools needs the packages present to build it).
COPY producer/ producer/
COPY worker/ worker/
COPY flexq/ flexq/
COPY simulator/ simulator/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

# Never run as root. The working directory is not /src, so the installed package is what runs
# (arq puts the working directory on sys.path).
RUN useradd --create-home --uid 10001 --user-group flexq
USER flexq
WORKDIR /home/flexq

ENTRYPOINT ["flexq"]
CMD ["worker"]
