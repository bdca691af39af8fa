# vlmprune runtime + TensorRT tooling (prune-run, prune-build, prune-profile, prune-calibrate's cache path).
#
# x86_64 with an NVIDIA GPU (TensorRT from the base image):
#   docker build -t vlmprune .
# Jetson Orin, JetPack 6.x (TensorRT 10.3 and trtexec come with L4T; build on the device):
#   docker build --build-arg BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 --build-arg VARIANT=jetson -t vlmprune:jetson .
# JetPack 5.1 (TensorRT 8.5): BASE=nvcr.io/nvidia/l4t-jetpack:r35.4.1, and export bundles with --target trt8.5.
#
# Export (torch + transformers) is meant for a workstation; the image holds what the device needs.
ARG BASE=nvcr.io/nvidia/tensorrt:24.08-py3
FROM ${BASE}
ARG VARIANT=x86

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PATH="/usr/src/tensorrt/bin:${PATH}"
WORKDIR /opt/vlmprune
COPY pyproject.toml README.md ./
COPY vlmprune ./vlmprune
COPY models ./models
COPY prune ./prune
COPY export ./export
COPY runtime ./runtime
COPY calibrate ./calibrate

# On Jetson the tensorrt Python module is JetPack's own (system dist-packages): installing the PyPI wheel would
# shadow it with one built for another CUDA, so the Jetson variant installs the trt extra without it.
RUN python3 -m pip install --upgrade pip && \
    if [ "$VARIANT" = "jetson" ]; then \
        python3 -m pip install . "polygraphy>=0.49" "onnx>=1.15" "cuda-python>=12" "matplotlib>=3.7" ; \
    else \
        python3 -m pip install ".[trt,plot]" ; \
    fi && \
    python3 -c "import vlmprune.runtime.pipeline, tensorrt; print('vlmprune ready, TensorRT', tensorrt.__version__)"

ENTRYPOINT []
CMD ["prune-run", "--help"]
