# vlmprune runtime + TensorRT tooling (prune-run, prune-build, prune-profile, prune-calibrate's cache path).
#
# x86_64 with an NVIDIA GPU (TensorRT from the base image):
#   docker build -t vlmprune .
# Jetson Orin, JetPack 6.1/6.2 (TensorRT 10.3 and trtexec come with L4T; build on the device):
#   docker build --build-arg BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 --build-arg VARIANT=jetson -t vlmprune:jetson .
# JetPack 6.0 (CUDA 12.2): add --build-arg JETSON_ORT_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu122
# JetPack 5.x is not supported: it is Ubuntu 20.04 with Python 3.8, and vlmprune needs Python >= 3.10.
# Run with the GPU visible: docker run --runtime nvidia (Jetson) or --gpus all (x86).
#
# Export (torch + transformers) is meant for a workstation; the image holds what the device needs.
ARG BASE=nvcr.io/nvidia/tensorrt:24.08-py3
FROM ${BASE}
ARG VARIANT=x86
# ONNX Runtime with the CUDA (and TensorRT) providers, for every graph that has no TensorRT engine. Its source:
# - jetson: NVIDIA's Jetson AI Lab pip index for the JetPack, JETSON_ORT_INDEX (jp6/cu126: JetPack 6.1/6.2, CUDA 12.6,
#   which the r36.4.0 base above has); PyPI has no GPU build of onnxruntime for aarch64;
# - x86: PyPI's onnxruntime-gpu 1.19.2 by default: its TensorRT provider is built for TensorRT 10.2 and CUDA 12, the
#   nearest to this base's TensorRT 10.3 (onnxruntime docs, TensorRT Execution Provider, Requirements: 1.20 wants
#   10.4, 1.22 wants 10.9); a newer base image takes a newer ORT_GPU_VERSION. 1.19 has no CUDA kernel for 8-bit
#   MatMulNBits (1.22+), so an int8 decoder runs on the CPU here (prune-run and prune-doctor say so);
# - ORT_GPU_WHEEL, when given, replaces either (a wheel URL: a build of your own).
# Without it onnxruntime is PyPI's CPU build: the decoder (and any graph without an engine) runs on the CPU, seconds
# per token for a 7B model, and prune-run prints a warning naming this fix. So the build fails instead, unless
# ALLOW_CPU_ORT=1 says to ship that image knowingly.
ARG JETSON_ORT_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG ORT_GPU_WHEEL=
# ORT_GPU_VERSION: a pip version spec for onnxruntime-gpu, e.g. ==1.23.0 (empty: x86 ==1.19.2, Jetson the newest
# its index has)
ARG ORT_GPU_VERSION=
ARG ALLOW_CPU_ORT=0

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
        python3 -m pip install . "polygraphy>=0.49" "onnx>=1.15" "cuda-python>=12,<13" "matplotlib>=3.7" ; \
    else \
        python3 -m pip install ".[trt,plot]" ; \
    fi && \
    python3 -c "import vlmprune.runtime.pipeline, tensorrt; print('vlmprune ready, TensorRT', tensorrt.__version__)"

# The package's dependency brought PyPI's CPU onnxruntime; onnxruntime-gpu installs the same `onnxruntime` module, so the
# CPU one goes first, and the GPU one comes without dependencies (they are the same and already installed).
RUN python3 -m pip uninstall -y onnxruntime && \
    if [ -n "$ORT_GPU_WHEEL" ]; then \
        python3 -m pip install --no-deps "$ORT_GPU_WHEEL" ; \
    elif [ "$VARIANT" = "jetson" ]; then \
        python3 -m pip install --no-deps --index-url "$JETSON_ORT_INDEX" "onnxruntime-gpu${ORT_GPU_VERSION}" ; \
    else \
        python3 -m pip install --no-deps "onnxruntime-gpu${ORT_GPU_VERSION:-==1.19.2}" ; \
    fi || { [ "$ALLOW_CPU_ORT" = "1" ] && python3 -m pip install onnxruntime ; }
# Fail loudly if the GPU build is not what `import onnxruntime` gives (the provider list is compiled in, so this holds
# at build time, when the GPU may not be visible; prune-run reports a provider that fails to load at run time).
RUN python3 -c "import onnxruntime as ort, os, sys; p = ort.get_available_providers(); \
print('onnxruntime', ort.__version__, p); \
sys.exit(0 if 'CUDAExecutionProvider' in p or os.environ.get('ALLOW_CPU_ORT') == '1' else \
'onnxruntime here has no CUDAExecutionProvider, so prune-run would run the decoder on the CPU: give the onnxruntime-gpu \
build for this JetPack (JETSON_ORT_INDEX or ORT_GPU_WHEEL), or ALLOW_CPU_ORT=1 to accept the CPU fallback')" && \
    prune-run --help > /dev/null

ENTRYPOINT []
CMD ["prune-run", "--help"]
