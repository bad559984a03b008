# GPU image: NGC PyTorch (CUDA torch, Transformer Engine and apex included) + this toolkit.
#   docker build -t nemo-aligner-mcore .
#   docker build --build-arg TRTLLM=1 --build-arg PIP_EXTRA_INDEX_URL=<NVIDIA index> -t nemo-aligner-mcore:trtllm .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ARG TRTLLM=0
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

WORKDIR /opt/nemo-aligner
COPY setup.py pyproject.toml README.md LICENSE ./
COPY nemo_aligner ./nemo_aligner
# The base image's torch satisfies torch>=2.4, so pip keeps it (no CPU wheel is pulled).
RUN pip install --no-cache-dir -e ".[hf,serve,test]" \
 && python -c "import transformer_engine, megatron.core; print('TE', transformer_engine.__version__)"
RUN if [ "$TRTLLM" = "1" ]; then pip install --no-cache-dir tensorrt_llm; fi
COPY conf ./conf
COPY examples ./examples
COPY data ./data
COPY tests ./tests
COPY benchmarks ./benchmarks
COPY docs ./docs
