# grand-challenge algorithm image: ToothFairy2 CBCT segmentation (nnU-Net v2 ensemble).
# Build: ./build.sh   Test: ./test.sh   Export: ./export.sh   (see README, "Submit to grand-challenge")
#
# torch: the CUDA 12.6 build, so that hosts whose driver only knows CUDA 12.x (T4 / A10G machines,
# driver >= 525 through CUDA minor-version compatibility) can run it; CUDA 13 builds need driver >= 580,
# and grand-challenge does not publish its driver version. PyTorch 2.14 is the LAST release with CUDA 12
# wheels: from 2.15 on, CUDA 12.6 is build-from-source only (pytorch/pytorch#190385; dev-discuss notice
# "CUDA 12.6 wheels will no longer be published from PyTorch 2.15"), so torch==2.15.0+cu126 does not
# exist and the image uses 2.14.1+cu126 with its torchvision 0.29.1 (0.29.x is the 2.14 series), the
# versions requirements.txt pins for development and CI. Not verified from here (download.pytorch.org
# is unreachable); 2.14.1+cu126 is widely reported in use. For a CUDA 13 host (driver >= 580) build with
#   --build-arg TORCH_VERSION=2.15.0 --build-arg TORCHVISION_VERSION=0.29.2 --build-arg TORCH_CUDA=cu130
# TORCH_INDEX_URL is where torch comes from: PyTorch's index for TORCH_CUDA by default; empty means PyPI
# (whose torch is its default CUDA build, CUDA 13 for 2.14, and runs on a CPU too), for machines that cannot
# reach PyTorch's index: `./build.sh cbctseg --build-arg TORCH_INDEX_URL=`.
# Size (limit 10 GB): built with TORCH_INDEX_URL= (PyPI's torch 2.14.1 and its CUDA 13 libraries) the image
# measures 6.96 GB uncompressed, 5.8 GB of it the torch layer, and 3.2 GiB as export.sh's archive (README,
# "Measured"). The cu126 build (CUDA 12 libraries instead of 13) is not measured: PyTorch's index cannot be
# reached from the machines that built it.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CUDA=cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The container runs as a non-root user with a read-only app; everything that wants to write a cache or
# a config goes to /tmp (one of the two writable paths on grand-challenge, with /output). nnU-Net warns
# at import time when its three folders are unset; inference does not use them.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    nnUNet_raw=/tmp/nnUNet_raw \
    nnUNet_preprocessed=/tmp/nnUNet_preprocessed \
    nnUNet_results=/tmp/nnUNet_results \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# torch first, from PyTorch's index (its dependencies, the nvidia-*-cu12 libraries, come from there too);
# an empty TORCH_INDEX_URL means PyPI, whose versions carry no label (+cu126).
RUN label="${TORCH_INDEX_URL:++${TORCH_CUDA}}" \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL:-https://pypi.org/simple}" \
        "torch==${TORCH_VERSION}${label}" "torchvision==${TORCHVISION_VERSION}${label}" \
    && python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '${TORCH_VERSION}' and v.endswith('${label}'), v"

# Then every other pin of requirements.txt. Its torch/torchvision lines (PyPI's CUDA 13 build) are left
# out and the installed ones are held by a constraint, so nothing can replace the CUDA 12 build.
COPY requirements.txt /tmp/requirements.txt
RUN grep -vE '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/requirements-image.txt \
    && pip freeze | grep -E '^(torch|torchvision)==' > /tmp/constraints.txt \
    && pip install --no-cache-dir -r /tmp/requirements-image.txt -c /tmp/constraints.txt \
    && pip check \
    && pip freeze | grep -E '^(torch|torchvision)==' | diff /tmp/constraints.txt - \
    && rm /tmp/requirements.txt /tmp/requirements-image.txt /tmp/constraints.txt

# uid 1000 as on grand-challenge's templates. /output is created and owned by the user so that a fresh
# docker volume mounted there (test.sh) inherits a writable owner.
RUN groupadd --gid 1000 user \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin user \
    && mkdir -p /opt/app /input /output \
    && chown user:user /output

# The app stays owned by root: read-only for the user, as on grand-challenge (test/test_container.py checks
# in the built image that the user cannot write to it).
WORKDIR /opt/app
COPY process.py /opt/app/process.py
COPY cbctseg/ /opt/app/cbctseg/
COPY resources/ /opt/app/resources/
COPY weights/ /opt/app/weights/
# Bytecode is compiled now because PYTHONDONTWRITEBYTECODE (and a read-only app) stop it at run time.
# The weights (one model, or each model of an ensemble.json) must match their checksums.json (else the build
# fails); demo weights print a WARNING banner.
RUN python -m compileall -q /opt/app/cbctseg /opt/app/process.py \
    && python -m cbctseg.model.ensemble /opt/app/weights

# Numeric, so the host can resolve it without the image's /etc/passwd (hadolint DL3066).
USER 1000:1000

# Exec form: arguments of `docker run IMAGE ...` go to process.py (`train ...`, `phantom ...`, options).
ENTRYPOINT ["python", "-u", "/opt/app/process.py"]
