#!/usr/bin/env bash
# Prepare a bare, offline GPU machine for benchmarks/gpu.py (see docs/gpu-benchmark.md).
#
#   bash benchmarks/gpu_setup.sh [WHEELDIR] [--dry-run] [--target DIR]
#
# 1. Checks that the Python in $PYTHON (default python3) imports torch, and prints whether it
#    sees CUDA (`import torch; print(torch.cuda.is_available())`).
# 2. Lists the modules gpu.py uses that this Python cannot import (with DIR on its path).
# 3. Installs the missing ones from WHEELDIR, offline:
#      $PYTHON -m pip install --no-index --find-links WHEELDIR --no-deps --target DIR NAMES...
#    (DIR default /tmp/poise-site; --target because the image's own environment is not ours to
#    change). --dry-run prints that command instead of running it.
# 4. Checks again and prints the line that runs the benchmark.
#
# Exit status: 0 ready (peers that are still missing are only recorded as missing by gpu.py);
# 1 a required module (torch, numpy, transformers, tokenizers) is missing and no wheel folder
# was given or it did not provide it; 2 torch cannot be imported; 3 pip failed; 64 bad arguments.
# GPU_SETUP_MODULES / GPU_SETUP_REQUIRED override the module lists (the tests use them).
set -uo pipefail

PY="${PYTHON:-python3}"
TARGET="${GPU_SETUP_TARGET:-/tmp/poise-site}"
WHEELS=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --target) shift; TARGET="${1:?--target needs a folder}" ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu_setup.sh: unknown option $1 (valid: WHEELDIR, --dry-run, --target DIR)" >&2; exit 64 ;;
    *) if [ -n "$WHEELS" ]; then echo "gpu_setup.sh: one wheel folder only (got $WHEELS and $1)" >&2; exit 64; fi
       WHEELS="$1" ;;
  esac
  shift
done
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
  echo "gpu_setup.sh: wheel folder $WHEELS does not exist" >&2; exit 64
fi

REQUIRED="${GPU_SETUP_REQUIRED:-torch numpy transformers tokenizers}"
MODULES="${GPU_SETUP_MODULES:-numpy transformers tokenizers accelerate trl datasets dill multiprocess heavyball pytorch_optimizer galore_torch}"
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"

# 1. torch and CUDA
if ! info=$("$PY" -c 'import torch; print(torch.cuda.is_available(), torch.__version__, torch.version.cuda)' 2>/dev/null)
then
  echo "gpu_setup.sh: $PY cannot import torch. A CUDA torch wheel is gigabytes, too large to carry:" >&2
  echo "  use the image's own python3 (it holds torch), or set PYTHON=/path/to/python" >&2
  exit 2
fi
read -r cuda tv cv <<<"$info"
echo "torch $tv (CUDA $cv): cuda available: $cuda"
[ "$cuda" = "True" ] || echo "warning: no CUDA device: gpu.py will run on the CPU (use --tiny there)"

missing_of() {  # the modules among "$@" that $PY cannot import
  "$PY" - "$@" <<'EOF'
import importlib, sys
out = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception:
        out.append(m)
print(" ".join(out))
EOF
}
dist_of() {  # pip's name of a module
  case "$1" in
    galore_torch) echo galore-torch ;;
    *) echo "$1" ;;
  esac
}

# 2. what is missing
missing=$(missing_of $MODULES)
if [ -z "$missing" ]; then
  echo "all modules present: $MODULES"
else
  echo "missing: $missing"
  if [ -z "$WHEELS" ]; then
    echo "no wheel folder given: prepare one as docs/gpu-benchmark.md says and pass it" >&2
  else
    # 3. install from the wheel folder, offline; one name at a time: a wheel absent from the folder
    # must not stop the others
    cmd=("$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade
         --target "$TARGET")
    [ "$DRY" = 1 ] || mkdir -p "$TARGET"
    nowheel=""
    for m in $missing; do
      n=$(dist_of "$m")
      if ! ls "$WHEELS" | grep -qi "^${n//-/[-_]}-.*\.whl$"; then
        echo "no wheel for $n in $WHEELS"
        nowheel="$nowheel $m"
      elif [ "$DRY" = 1 ]; then
        echo "dry run, would run: ${cmd[*]} $n"
      else
        "${cmd[@]}" "$n" || { echo "gpu_setup.sh: pip failed on $n" >&2; exit 3; }
      fi
    done
  fi
fi

# 4. check again
if [ "$DRY" = 1 ]; then  # what has no wheel stays missing
  if [ -n "$WHEELS" ]; then still=$(echo ${nowheel:-}); else still="$missing"; fi
else
  still=$(missing_of $MODULES)
fi
[ -n "$still" ] && echo "still missing: $still (gpu.py records absent peers and goes on)"
for r in $REQUIRED; do
  for m in $still; do
    if [ "$m" = "$r" ]; then echo "gpu_setup.sh: required module $r is missing" >&2; exit 1; fi
  done
done
echo "ready. Run:"
echo "  PYTHONPATH=$TARGET:src PYTHONUNBUFFERED=1 $PY benchmarks/gpu.py --out \$OUT --budget-s 420"
exit 0
