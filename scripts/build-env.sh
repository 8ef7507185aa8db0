# Environment for building the extension; sourced by setup-env.sh and .ci/run.
# nvcc is a wrapper in /usr/local/bin here, which makes torch guess the wrong CUDA_HOME, and
# TORCH_CUDA_ARCH_LIST must be set on a machine without a GPU (docs/building.md #1, #2).
if [ -d /usr/local/cuda ]; then
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
  export PATH="$CUDA_HOME/bin:$PATH"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
