#!/usr/bin/env bash
# The GPU checks of the open issues in one prepared call on the lent GPU machine
# (../shared/docs/gpu-checks.md). Figures and logs go to $OUT (the device tool brings them back).
#
# On the CPU machine first (about 2 minutes): bash ../shared/tools/ort-gpu-parts.sh, then send
# the parts with back-to-back `run` calls (command: mkdir -p /tmp/ortgpu && mv .gpu/<part>
# /tmp/ortgpu/, carry: [".gpu/<part>"]), then, in the next call, with a timeout that leaves
# room for a second try:
#   bash scripts/gpu_check.sh [onnx|grpo]
# PROVIDER=cpu bash scripts/gpu_check.sh runs the same steps on the CPU (to check the script).
# `onnx` (the default) runs items 1-5; `grpo` runs item 6, a call of its own (its 3B model
# takes about 200 s to build, and the whole of it does not fit one 600 s call beside items
# 1-5): carry .gpu-grpo/grpo-wheels-py3.12.tar.xz (bash scripts/grpo-gpu-deps.sh, about
# 30 MiB), no onnxruntime-gpu parts needed.
#
# 1. onnxruntime-gpu unpacked from the parts, the project installed without its dependencies;
# 2. a tiny Qwen2.5-VL exported in fp32 and fp16;
# 3. both bundles' parity on the CUDA provider against PyTorch (the export's own check);
# 4. the suite's GPU tests (CUDA tokens equal the CPU's) and gmner extract on the CUDA provider
#    (placement of every graph's nodes);
# 5. bench-small in fp16: gmner_rt on the CUDA provider against HF transformers on the same GPU;
# 6. (`grpo`, issue #26) GRPO steps of the random Qwen2.5-VL-3B: TRL and datasets installed offline from
#    the carried wheels, then python -m gmner.bench.train_at_scale --stage grpo (peak memory,
#    tokens/s); skipped, saying why, when TRL cannot be had. PROVIDER=cpu runs it on the tiny
#    model with small settings instead.
# The device tool brings back at most 8 files: $OUT gets the reports (machine.txt, the parity,
# bench and real_scale_grpo JSON) and one gpu-check.tar.gz with every log.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-out/gpu}
PROVIDER=${PROVIDER:-cuda}
ITEMS=${1:-onnx}
case "$ITEMS" in onnx|grpo) ;; *) echo "gpu_check.sh: expected onnx or grpo, got $ITEMS" >&2; exit 2 ;; esac
WORK=${WORK:-/tmp/gmner-gpu}
OUT=$WORK/out
mkdir -p "$FINAL" "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
finish() {
    cp "$OUT"/machine.txt "$OUT"/parity-*.json "$OUT"/bench-*.json "$OUT"/real_scale_grpo.json \
        "$FINAL"/ 2>/dev/null
    tar czf "$FINAL/gpu-check.tar.gz" -C "$WORK" out
}
trap finish EXIT

if [ -d /tmp/ortgpu ]; then
    log "unpacking onnxruntime-gpu"
    cat /tmp/ortgpu/*.part-* > /tmp/ort.tar.xz && mkdir -p /tmp/site &&
        python3 -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/site')"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# CUDA and cuDNN from the machine's nvidia pip packages, for every process below.
NV=$(python3 -c "import glob, os, site; print(':'.join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], 'nvidia', '*', 'lib')))))")
export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . -e ./bench >"$OUT/pip.log" 2>&1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python3 -c "import onnxruntime as o, torch, transformers; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available()); print('transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

grpo_deps() {
    # TRL and datasets from the carried wheels (scripts/grpo-gpu-deps.sh), offline; pip keeps
    # what the machine has where it meets the requirements.
    python3 -c "import trl, datasets" 2>/dev/null && return 0
    local pack
    pack=.gpu-grpo/grpo-wheels-py$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])').tar.xz
    if [ ! -f "$pack" ]; then
        echo "no $pack carried (bash scripts/grpo-gpu-deps.sh, then carry it)"
        return 1
    fi
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp')" "$pack" &&
        python3 -m pip install -q --no-index --find-links /tmp/grpo-wheels \
            trl==1.16.0 datasets==5.2.0 &&
        python3 -c "import trl, datasets, pyarrow, pandas; from trl import GRPOTrainer
print('trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
}

grpo_item() {
    log "GRPO steps at real scale (issue #26)"
    if ! grpo_deps >"$OUT/grpo-deps.log" 2>&1; then
        log "skipped: TRL / datasets could not be installed, see grpo-deps.log: $(tail -1 "$OUT/grpo-deps.log")"
        return
    fi
    local flags=(--work "$WORK/rs-grpo" --steps "${GRPO_STEPS:-3}")
    [ "$PROVIDER" = cpu ] && flags+=(--device cpu --preset tiny --max-side 224 --group-size 2
        --prompts 1 --max-new-tokens 8 --num-workers 0)
    # its own limit, so that the copies below still happen inside the call's 600 s; the
    # summary is rewritten after every step, so a cut run keeps the steps it made
    timeout "${GRPO_TIMEOUT:-480}" python3 -m gmner.bench.train_at_scale --stage grpo \
        "${flags[@]}" >"$OUT/grpo.log" 2>&1
    echo "rc=$?" >>"$OUT/grpo.log"
    cp "$WORK/rs-grpo/real_scale_grpo.json" "$WORK/rs-grpo/grpo-run/metrics.jsonl" "$OUT"/ 2>/dev/null
    tail -c 2000 "$OUT/grpo.log"
}

if [ "$ITEMS" = grpo ]; then
    grpo_item
    log "done"
    exit 0
fi

log "tiny model and its fp32 / fp16 bundles"
[ -f "$WORK/tiny/config.json" ] || gmner tiny-model --out "$WORK/tiny" >"$OUT/export.log" 2>&1
for dtype in fp32 fp16; do
    [ -f "$WORK/b-$dtype/manifest.json" ] ||
        gmner export --model "$WORK/tiny" --out "$WORK/b-$dtype" --dtype $dtype >>"$OUT/export.log" 2>&1
done

for dtype in fp32 fp16; do
    log "parity on $PROVIDER, $dtype"
    python3 -m gmner.export.provider_parity --model "$WORK/tiny" --bundle "$WORK/b-$dtype" \
        --provider "$PROVIDER" --json "$OUT/parity-$PROVIDER-$dtype.json" >"$OUT/parity-$dtype.log" 2>&1
    echo "rc=$?" >>"$OUT/parity-$dtype.log"
done

log "the test suite's GPU tests (-m gpu)"
python3 -m pytest -q -m gpu tests/gmner_rt/test_providers.py -p no:cacheprovider >"$OUT/pytest-gpu.log" 2>&1
echo "rc=$?" >>"$OUT/pytest-gpu.log"

log "gmner extract on $PROVIDER"
gmner -v extract --provider "$PROVIDER" --image examples/demo/3000020.png \
    --text "Zentro meets Alice" --json >"$OUT/extract.json" 2>"$OUT/extract.log"
echo "rc=$?" >>"$OUT/extract.log"

log "bench-small fp16 on $PROVIDER against HF"
gmner bench --preset bench-small --dtype fp16 --provider "$PROVIDER" --systems gmner_rt,hf \
    --rounds 1 --repeats 3 --cache "$WORK/bench" --json "$OUT/bench-$PROVIDER-fp16.json" \
    >"$OUT/bench.txt" 2>"$OUT/bench.log"
echo "rc=$?" >>"$OUT/bench.log"
log "done"
