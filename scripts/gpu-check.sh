#!/usr/bin/env bash
# The GPU check: CUDA conformance tests, the CLI on CUDA, and a short benchmark.
#
# Runs on the GPU machine (CUDA 13 driver and toolkit, no Rust, no network) from the
# repository root, with target/gpu-check/ as staged by `cargo xtask gpu-check` (carried).
# See scripts/README.md. Results go to $OUT (the device tool's output folder, which
# returns at most 8 files) or target/gpu-check/out: summary.txt, bench.jsonl (one JSON
# object per measurement) and logs.tar.gz (every step's output). Exits non-zero if any
# step failed.
#
#   bash scripts/gpu-check.sh           everything (~3-5 minutes on an H100/H200)
#   bash scripts/gpu-check.sh --quick   without the Llama-3-8B-shaped model
set -uo pipefail

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

stage=target/gpu-check
out=${OUT:-$stage/out}
work=${SPECREJ_GPU_WORK:-/tmp/specrej-gpu-check}
logs=$work/logs
mkdir -p "$out" "$work" "$logs"
log() { echo "[gpu-check $(date +%T)] $*" | tee -a "$out/summary.txt"; }
failed=0

# The staged binaries, unpacked if they came compressed.
if [[ -f $stage/bundle.tar.gz ]]; then
    tar -xzf "$stage/bundle.tar.gz" -C "$work" || { log "cannot unpack $stage/bundle.tar.gz"; exit 1; }
    bin=$work/bin tokenizer=$work/tokenizer.gguf
elif [[ -f $stage/bundle.tar.xz ]]; then
    tar -xJf "$stage/bundle.tar.xz" -C "$work" 2>/dev/null \
        || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$stage/bundle.tar.xz" "$work" \
        || { log "cannot unpack $stage/bundle.tar.xz (no xz, no python3)"; exit 1; }
    bin=$work/bin tokenizer=$work/tokenizer.gguf
else
    bin=$stage/bin tokenizer=$stage/tokenizer.gguf
fi
for f in "$bin/specrej" "$bin/gpu_bench" "$bin/specrej-candle-tests" "$tokenizer"; do
    [[ -e $f ]] || { log "missing $f: run 'cargo xtask gpu-check' and carry target/gpu-check"; exit 1; }
done
chmod +x "$bin"/* 2>/dev/null

# The toolkit's libraries (cuBLAS, cuRAND, NVRTC, the runtime): the binaries were linked
# against stubs with these sonames; the driver's libcuda.so.1 is on the default path.
libdirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
         /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
         /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib /usr/local/lib/python3*/site-packages/nvidia/cu13/lib; do
    [[ -d $d ]] && ls "$d"/libcublas.so.13* >/dev/null 2>&1 && libdirs="$libdirs:$d"
done
for d in /usr/local/lib/python3*/dist-packages/nvidia/*/lib /usr/local/lib/python3*/site-packages/nvidia/*/lib; do
    [[ -d $d ]] && libdirs="$libdirs:$d"
done
# The driver's libcuda.so.1 (containers often mount it under /usr/local/nvidia).
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib64; do
    [[ -e $d/libcuda.so.1 ]] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv 2>&1 | tee -a "$out/summary.txt"
missing=$(ldd "$bin/specrej" | grep "not found")
if [[ -n $missing ]]; then
    log "libraries not found (install the CUDA 13 toolkit or set LD_LIBRARY_PATH):"
    echo "$missing" | tee -a "$out/summary.txt"
    exit 1
fi

# step NAME SECONDS COMMAND...: runs it with a time limit, output to $logs/NAME.txt.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.txt" 2>&1
    local rc=$?
    if [[ $rc -eq 0 ]]; then
        log "ok    $name ($((SECONDS - start)) s)"
    else
        failed=1
        log "FAIL  $name (exit $rc after $((SECONDS - start)) s): tail of $name.txt:"
        tail -n 25 "$logs/$name.txt" | tee -a "$out/summary.txt"
    fi
}

# 1. Conformance: CUDA against the CPU (a missing device fails), then every unit test.
export SPECREJ_REQUIRE_GPU=1
step conformance 300 "$bin/specrej-candle-tests" tests::cuda:: --include-ignored --test-threads 1 --nocapture
step unit-tests 300 "$bin/specrej-candle-tests"

# 2. Models of real shapes with random weights (Q8_0), written here.
small=$work/smollm2-135m-random.gguf big=$work/llama3-8b-random.gguf
step write-smollm2 120 "$bin/gpu_bench" write-model --shape smollm2-135m --tokenizer "$tokenizer" --out "$small"
[[ $quick -eq 0 ]] && step write-llama3-8b 300 "$bin/gpu_bench" write-model --shape llama3-8b --out "$big"

# 3. The CLI end to end on CUDA (random weights: the text is noise, the path is real).
for method in sr bon; do
    step "cli-$method" 180 "$bin/specrej" generate "Give three tips for staying healthy." --model "$small" \
        --backend cuda --method "$method" --n 32 --max-new-tokens 64 --seed 1 --json
done

# 4. Benchmark: decode throughput at 1/64/256 rows, greedy (argmax on the GPU) and sampled
#    (logits read back, host sampling); SR against BoN on one prompt.
step bench-decode-smollm2 300 "$bin/gpu_bench" decode --model "$small" --rows 1,64,256 --steps 32
step bench-decode-smollm2-sampled 300 "$bin/gpu_bench" decode --model "$small" --rows 256 --steps 32 --temperature 1
step bench-methods-smollm2 300 "$bin/gpu_bench" methods --model "$small" --n 64 --max-new 128
if [[ $quick -eq 0 && -f $big ]]; then
    step bench-decode-llama3-8b 400 "$bin/gpu_bench" decode --model "$big" --rows 1,64,256 --steps 16
    step bench-decode-llama3-8b-sampled 300 "$bin/gpu_bench" decode --model "$big" --rows 256 --steps 16 --temperature 1
    step bench-methods-llama3-8b 400 "$bin/gpu_bench" methods --model "$big" --n 64 --max-new 128
fi
grep -h '"bench"' "$logs"/bench-*.txt >"$out/bench.jsonl" 2>/dev/null
cat "$out/bench.jsonl"
grep -h "cuda_logits_match_cpu\|^test \|test result" "$logs/conformance.txt" | tee -a "$out/summary.txt"
tar -czf "$out/logs.tar.gz" -C "$work" logs
rm -f "$small" "$big"
[[ $failed -eq 0 ]] && log "all steps passed" || log "some steps FAILED"
exit $failed
