#!/usr/bin/env bash
# The Python packages the benchmark needs beyond what the lent GPU machine has (its image: Python 3.12, torch,
# numpy, scipy, scikit-image, pandas, ...; /work/.library/device/KINDS.md), as one compressed folder that a
# `device` call carries: .whl/site312.tar.xz (about 40 MB, most of it SimpleITK) and .whl/env.sh. A call
# carries at most 64 MiB with the working tree, so only what the bench imports or runs travels: not
# imagecodecs (79 MB unpacked; tifffile's optional codecs) nor pydantic (blosc2's tables only), although
# nnunetv2 and blosc2 name them. Run here (pip reaches PyPI):
#
#   bench/device_bundle.sh
#
# and on the device machine, with carry [".whl"]:
#
#   source .whl/env.sh && python3 bench/probe.py --out $OUT ...
#
# Versions are this project's pins (requirements.txt) and what they pulled into .venv; the closure of
# nnunetv2's and SimpleITK's requirements less what the device image holds.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/.whl"  # ignored by git (.gitignore)
python="${CBCTSEG_PYTHON:-$repo/.venv/bin/python}"
# shellcheck source=scripts/venv_support.sh
source "$repo/scripts/venv_support.sh"
# wheels for CPython 3.12 on x86-64 Linux
binary=(SimpleITK==2.5.7 connected-components-3d==4.1.1 blosc2==4.14.1 numexpr==2.14.2
        ndindex==1.10.1 nibabel==5.4.2 importlib-resources==7.1.0 nnunetv2==2.8.1 batchgenerators==0.25.5
        batchgeneratorsv2==0.3.6 dynamic-network-architectures==0.4.4 yacs==0.1.8 graphviz==0.21 future==1.0.0
        argparse==1.4.0 linecache2==1.0.0 traceback2==1.4.0 unittest2==1.1.0)
# published as source only (pure Python): built into wheels here
source_only=(acvl-utils==0.2.6)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$tmp/wheels" "${binary[@]}" 2> >(pip_log)
"$python" -m pip wheel -q --no-deps -w "$tmp/wheels" "${source_only[@]}" 2> >(pip_log)
"$python" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --target "$tmp/site" "$tmp"/wheels/*.whl 2> >(pip_log)
mkdir -p "$out"
XZ_OPT="-6 -T0" tar -C "$tmp/site" -cJf "$out/site312.tar.xz" .
cat > "$out/env.sh" <<'EOF'
# source .whl/env.sh on the device machine: the carried packages, the repository on the path, nnU-Net's folders
rm -rf /tmp/site && mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site312.tar.xz
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export nnUNet_raw=/tmp/nnunet_raw nnUNet_preprocessed=/tmp/nnunet_preprocessed nnUNet_results=/tmp/nnunet_results
EOF
echo "device bundle: $out/site312.tar.xz ($(du -h "$out/site312.tar.xz" | cut -f1)), $out/env.sh" >&2
