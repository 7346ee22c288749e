# fashionlab model server, following the SageMaker inference container contract:
# `docker run IMAGE serve` answers GET /ping and POST /invocations on port 8080, with the model
# read from /opt/ml/model (where SageMaker unpacks the model.tar.gz of `fashionlab package RUN`).
#
#   docker build -t fashionlab .
#   docker run --rm -p 8080:8080 -v "$PWD/runs/cnn:/opt/ml/model:ro" fashionlab serve
#
# Settings come from the environment (see docs/deploy.md): SAGEMAKER_BIND_TO_PORT,
# SAGEMAKER_MODEL_SERVER_WORKERS, FASHIONLAB_BACKEND=onnx, FASHIONLAB_MAX_BODY_BYTES, ...
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FASHIONLAB_HOST=0.0.0.0 \
    FASHIONLAB_OFFLINE=1

WORKDIR /opt/fashionlab

# CPU-only PyTorch first (a fraction of the CUDA build's size), in its own cached layer.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2"

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve,onnx]" \
    && useradd --system --uid 1000 --no-create-home fashionlab

# The service writes nothing; it runs as an unprivileged user.
USER fashionlab
EXPOSE 8080

# `docker run IMAGE serve` (what SageMaker runs) becomes `fashionlab serve`.
ENTRYPOINT ["fashionlab"]
CMD ["serve"]
