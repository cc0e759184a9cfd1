#!/usr/bin/env bash
# Fetch the peer kernels' source for the benchmarks (on a machine with network; the GPU machines have
# none: carry .peers/ to them) and patch causal-conv1d's setup.py so that CAUSAL_CONV1D_ONLY_ARCHS=90
# builds one architecture (its own default builds nine: 20+ minutes).
#   benchmarks/fetch_peers.sh            download causal-conv1d 1.7.0 into .peers/ and patch it
#   benchmarks/fetch_peers.sh --patch    only (re)apply the patch to .peers/causal_conv1d-1.7.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=.peers/causal_conv1d-1.7.0
if [ "${1:-}" != "--patch" ]; then
  mkdir -p .peers
  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $PY -m pip download --no-build-isolation --no-deps --no-binary :all: \
    causal-conv1d==1.7.0 -d .peers/
  tar xzf .peers/causal_conv1d-1.7.0.tar.gz -C .peers && rm .peers/causal_conv1d-1.7.0.tar.gz
fi
$PY - "$DIR/setup.py" <<'PYEOF'
import sys
p = sys.argv[1]
s = open(p).read()
if "CAUSAL_CONV1D_ONLY_ARCHS" in s:
    print("already patched:", p)
    sys.exit(0)
marker = "    # HACK: The compiler flag"
patch = '''    # aim-kernels benchmark patch: build only the archs named in CAUSAL_CONV1D_ONLY_ARCHS (e.g. "90").
    if os.getenv("CAUSAL_CONV1D_ONLY_ARCHS"):
        cc_flag = []
        for a in os.getenv("CAUSAL_CONV1D_ONLY_ARCHS").split(";"):
            cc_flag += ["-gencode", f"arch=compute_{a},code=sm_{a}"]

'''
assert marker in s, "causal-conv1d setup.py changed: patch by hand"
open(p, "w").write(s.replace(marker, patch + marker, 1))
print("patched:", p)
PYEOF
