#!/bin/bash
# The GPU tier on a lent machine, from the archives pack.sh made. Two calls of the device tool:
#   run(command="bash .gpu/run.sh engines", carry=[".gpu/a.tar.xz", ".gpu/run.sh"])     engines, MiniLM, bnb
#   run(command="bash .gpu/run.sh train", carry=[".gpu/site.tar.xz", ".gpu/run.sh"])    compression, Ray Train
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MASS_HOME=/tmp/masshome TOKENIZERS_PARALLELISM=false
rm -rf /tmp/site; mkdir -p /tmp/site /tmp/masshome
if [ "$1" = engines ]; then tar xJf .gpu/a.tar.xz -C /tmp/site; else tar xJf .gpu/site.tar.xz -C /tmp/site; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import sys,torch,transformers;print(sys.version.split()[0],torch.__version__,transformers.__version__,torch.cuda.get_device_name())"
if [ "$1" = engines ]; then
  timeout 280 python3 -m pytest tests/gpu/test_engines_gpu.py tests/gpu/test_compression_gpu.py -v -s -rA -p no:cacheprovider --timeout 200 2>&1 \
    | tee $OUT/gpu_engines.log | grep -v Warning
else
  python3 -c "import ray,mlflow;print('ray',ray.__version__,'mlflow',mlflow.__version__)"
  timeout 400 python3 -m pytest tests/gpu/test_compression_gpu.py tests/gpu/test_train_gpu.py -v -s -rA \
    -p no:cacheprovider --timeout 380 2>&1 | tee $OUT/gpu_train.log | tail -80
fi
