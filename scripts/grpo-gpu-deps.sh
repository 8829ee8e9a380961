#!/usr/bin/env bash
# Pack what `gmner train --stage grpo` needs and the GPU test machine lacks (TRL, datasets and
# what they pull in: pyarrow, pandas, dill, multiprocess, xxhash, ...) as wheels for its
# Python, in one file small enough to travel with the working tree (64 MiB in one call).
#
#   bash scripts/grpo-gpu-deps.sh [PYTHON_VERSION]    (default 3.12, the GPU machine's)
#
# Writes .gpu-grpo/grpo-wheels-pyVER.tar.xz (git-ignored; not under .gpu/, which
# ../shared/tools/ort-gpu-parts.sh empties) and prints its size. pyarrow and pandas are
# repacked without what the stage never loads (Arrow Flight and S3, the C++ headers and Cython
# sources, the test suites, duplicate copies of two libraries); the wheels are stored
# uncompressed so that xz compresses their libraries. On the GPU machine pip installs them
# offline and keeps every package already there that meets the requirements (the fallback
# huggingface_hub 1.x and fsspec are installed only where the machine's are out of range):
#   python3 -c "import tarfile; tarfile.open('.gpu-grpo/grpo-wheels-py3.12.tar.xz').extractall('/tmp')"
#   python3 -m pip install -q --no-index --find-links /tmp/grpo-wheels trl==1.16.0 datasets==5.2.0
# scripts/gpu_check.sh does both; docs/benchmarks.md ("GRPO at real scale") has the call.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
# The versions the test suite runs the stage with (.venv), and huggingface_hub's last 1.x.
wheels=(
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
    pyarrow==26.0.1 pandas==3.1.1 python-dateutil==4.0.0 tzdata==2026.6 fsspec==2026.9.0
    accelerate==1.16.0 huggingface_hub==1.33.0
)
out=.gpu-grpo
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PIP=${PIP:-python3 -m pip}
$PIP download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work/grpo-wheels" "${wheels[@]}"

# Rewrite each wheel uncompressed (xz does better on the whole), without the files that match
# the patterns given for its package, and with RECORD listing what is left.
python3 - "$work/grpo-wheels" <<'EOF'
import fnmatch, sys, zipfile
from pathlib import Path

DROP = {
    "pyarrow": [
        "pyarrow/include/*", "pyarrow/src/*", "pyarrow/tests/*", "*.pyx", "*.pxd", "*.pxi",
        "pyarrow/libarrow_flight.so*", "pyarrow/libarrow_python_flight.so*", "pyarrow/_flight.*",
        "pyarrow/libarrow_s3.so*", "pyarrow/_s3fs.*", "pyarrow/_pyarrow_cpp_tests.*",
        # the loader asks for the .so.MAJOR names; the two others are identical copies
        "pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.*.*",
        "pyarrow/libarrow_python_parquet_encryption.so",
        "pyarrow/libarrow_python_parquet_encryption.so.*.*",
    ],
    "pandas": ["pandas/tests/*"],
}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    patterns = DROP.get(wheel.name.split("-")[0], [])
    with zipfile.ZipFile(wheel) as src:
        files = {
            i.filename: src.read(i)
            for i in src.infolist()
            if not any(fnmatch.fnmatch(i.filename, p) for p in patterns)
        }
    kept = set(files)
    for name, data in files.items():
        if name.endswith(".dist-info/RECORD"):
            rows = data.decode().splitlines()
            files[name] = "".join(r + "\n" for r in rows if r.rsplit(",", 2)[0] in kept).encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for name, data in files.items():
            dst.writestr(name, data)
    tmp.replace(wheel)
EOF

mkdir -p "$out"
pack="$out/grpo-wheels-py$pyver.tar.xz"
tar -C "$work" -cf - grpo-wheels | xz -6 -T0 > "$pack"
sha256sum "$pack" | cut -d' ' -f1 > "$pack.sha256"
mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 2**20:.1f}')" "$1"; }
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "wrote $pack: $(mib "$(stat -c %s "$pack")") MiB ($(ls "$work/grpo-wheels" | wc -l) wheels," \
    "$(du -sm "$work/grpo-wheels" | cut -f1) MiB unpacked); the working tree adds $(mib "$tree")" \
    "MiB to a call (64 MiB in all)"
