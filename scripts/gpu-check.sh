#!/usr/bin/env bash
# The GPU check: CUDA and WebGPU (Vulkan) conformance, the real model on CUDA and wgpu, decode
# throughput beside its memory-bandwidth bound, and Speculative Rejection against Best-of-N.
#
# Runs on the GPU machine (CUDA 13 driver and toolkit, no Rust, no network) from the
# repository root, with what `cargo xtask gpu-check` staged (carried): target/gpu-check/ and,
# in a first call, target/gpu-model-a/. See scripts/README.md for the two device calls.
# Results go to $OUT (the device tool's output folder, which returns at most 8 files) or
# target/gpu-check-out (outside what is carried): summary.txt, bench.jsonl (one JSON object per measurement),
# paper-report.md, and logs.tar.gz (every step's output). Exits non-zero if a step failed.
#
#   bash scripts/gpu-check.sh --receive   call 1: keep the model's first part for call 2
#   bash scripts/gpu-check.sh             call 2: everything (about 8 minutes: GPU_CHECK_DEADLINE)
#   bash scripts/gpu-check.sh --dry-run   here, without a GPU: the CUDA steps are skipped, the
#                                         rest runs on the CPU and lavapipe at tiny sizes
# Options: --llama3-8b (also the Llama-3-8B-shaped random model: about 2 more minutes),
#          --unit-tests (also specrej-candle's CPU unit tests, built with CUDA).
# Environment: GPU_CHECK_DEADLINE (seconds from the start, default 480; the last step, bench
# paper, gets what is left), PAPER_LIMIT, PAPER_BON, PAPER_ALPHAS, PAPER_KV_BUDGET,
# PAPER_MAX_NEW, PAPER_RECORD_ROWS (bench paper's flags; defaults below).
set -uo pipefail

mode=run llama3=0 unit_tests=0
for a in "$@"; do
    case $a in
        --receive) mode=receive ;;
        --dry-run) mode=dry ;;
        --llama3-8b) llama3=1 ;;
        --unit-tests) unit_tests=1 ;;
        *) echo "unknown option $a (see the header of $0)" >&2; exit 2 ;;
    esac
done

stage=target/gpu-check
part_a_dir=target/gpu-model-a
# Where call 1 leaves the model's first part: the device keeps /tmp while it stays warm.
stash=/tmp/specrej-gpu-model
out=${OUT:-target/gpu-check-out}
work=${SPECREJ_GPU_WORK:-/tmp/specrej-gpu-check}
logs=$work/logs
# The device: 8 minutes of a 10-minute call. A dry run on a small CPU takes longer.
deadline=${GPU_CHECK_DEADLINE:-480}
[[ $mode == dry ]] && deadline=${GPU_CHECK_DEADLINE:-3600}
# Step time limits are the device's; a dry run on a small, busy CPU gets more.
scale=1
[[ $mode == dry ]] && scale=4
rm -rf "$logs" "$work"/greedy-*.json
mkdir -p "$out" "$work" "$logs"
: >"$out/summary.txt"
log() { echo "[gpu-check $(date +%T) +${SECONDS}s] $*" | tee -a "$out/summary.txt"; }
failed=0

# ---------------------------------------------------------------------------------------
# Call 1: stash the model's first part where call 2 finds it, and stop.
if [[ $mode == receive ]]; then
    [[ -f $part_a_dir/model.part-a ]] || { log "missing $part_a_dir/model.part-a: carry target/gpu-model-a"; exit 1; }
    mkdir -p "$stash" && cp "$part_a_dir/model.part-a" "$stash/" || { log "cannot copy the part to $stash"; exit 1; }
    log "kept $(stat -c %s "$stash/model.part-a") bytes in $stash/model.part-a (and $part_a_dir stays in the checkout)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$out/summary.txt"
    exit 0
fi

# step NAME SECONDS COMMAND...: runs it with a time limit (× scale, cut to what is left before
# the deadline), output to $logs/NAME.txt; a step that no longer fits is skipped.
step() {
    local name=$1 limit=$(($2 * scale))
    shift 2
    local left=$((deadline - SECONDS - 10))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        log "skip  $name: out of time (GPU_CHECK_DEADLINE=$deadline)"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.txt" 2>&1
    local rc=$?
    if [[ $rc -eq 0 ]]; then
        log "ok    $name ($((SECONDS - start)) s)"
    else
        failed=1
        log "FAIL  $name (exit $rc after $((SECONDS - start)) s of $limit): tail of $name.txt:"
        tail -n 25 "$logs/$name.txt" | tee -a "$out/summary.txt"
    fi
}
skip() { log "skip  $1: $2"; }

# json_doc FILE [KEY]: the first JSON object in FILE (which also holds a command's stderr)
# that has KEY, printed on one line.
json_doc() {
    python3 - "$@" <<'EOF'
import json, sys
text, key = open(sys.argv[1]).read(), (sys.argv[2] if len(sys.argv) > 2 else None)
decoder, i = json.JSONDecoder(), text.find("{")
while i >= 0:
    try:
        doc, _ = decoder.raw_decode(text, i)
        if isinstance(doc, dict) and (key is None or key in doc):
            print(json.dumps(doc))
            sys.exit(0)
    except ValueError:
        pass
    i = text.find("{", i + 1)
sys.exit(f"{sys.argv[1]}: no JSON object" + (f" with {key!r}" if key else ""))
EOF
}

# ---------------------------------------------------------------------------------------
# The staged binaries (a bundle, unpacked here).
if [[ -f $stage/bundle.tar.xz ]]; then
    rm -rf "$work/bin"
    tar -xJf "$stage/bundle.tar.xz" -C "$work" 2>/dev/null \
        || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$stage/bundle.tar.xz" "$work" \
        || { log "cannot unpack $stage/bundle.tar.xz (no xz, no python3)"; exit 1; }
    bin=$work/bin tokenizer=$work/tokenizer.gguf
else
    bin=$stage/bin tokenizer=$stage/tokenizer.gguf
fi
for f in "$bin/specrej" "$bin/gpu_bench" "$bin/specrej-candle-tests" "$bin/specrej-tests" "$tokenizer"; do
    [[ -e $f ]] || { log "missing $f: run 'cargo xtask gpu-check' and carry target/gpu-check"; exit 1; }
done
chmod +x "$bin"/* 2>/dev/null
log "unpacked the binaries"

# The libraries. The binaries were linked against stubs with the CUDA libraries' sonames; on
# the GPU machine the toolkit's libraries (cuBLAS, cuRAND, NVRTC, the runtime) and the
# driver's libcuda.so.1 answer to them. In a dry run the stubs themselves do (never called).
libdirs=""
if [[ $mode == dry ]]; then
    stubs=target/cuda-toolkit/wheels/nvidia/cu13/lib64/stubs
    [[ -d $stubs ]] || { log "missing $stubs: cargo xtask gpu-check makes it"; exit 1; }
    mkdir -p "$work/stublib"
    for pair in libcuda.so:libcuda.so.1 libnvrtc.so:libnvrtc.so.13 libcurand.so:libcurand.so.10 \
                libcublas.so:libcublas.so.13 libcublasLt.so:libcublasLt.so.13; do
        ln -sf "$PWD/$stubs/${pair%%:*}" "$work/stublib/${pair##*:}"
    done
    libdirs=":$work/stublib:$PWD/target/cuda-toolkit/wheels/nvidia/cu13/lib"
else
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
fi
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if [[ $mode == dry ]]; then
    log "dry run: no CUDA; CUDA steps are skipped, the rest runs on the CPU and lavapipe at tiny sizes"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv 2>&1 | tee -a "$out/summary.txt"
fi
missing=$(for b in "$bin"/*; do ldd "$b" | grep "not found"; done | sort -u)
if [[ -n $missing ]]; then
    log "libraries not found (install the CUDA 13 toolkit or set LD_LIBRARY_PATH):"
    echo "$missing" | tee -a "$out/summary.txt"
    exit 1
fi

# The Vulkan loader for wgpu (carried as .deb files: the machine has the NVIDIA driver's ICD
# but may lack libvulkan.so.1).
vulkan=1
if ! ldconfig -p | grep -q 'libvulkan\.so\.1'; then
    if [[ $mode != dry ]] && ls "$stage"/gl/*.deb >/dev/null 2>&1; then
        for f in "$stage"/gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
        log "installed the carried Vulkan loader: $(ls "$stage"/gl)"
    else
        vulkan=0
        log "no Vulkan loader (libvulkan.so.1): wgpu steps skipped"
    fi
elif [[ $mode == dry ]] && ls "$stage"/gl/*.deb >/dev/null 2>&1; then
    # Here the loader is installed: only check that the carried packages unpack.
    for f in "$stage"/gl/*.deb; do dpkg -x "$f" "$work/gl-unpacked" || { log "cannot unpack $f"; failed=1; }; done
    log "the carried Vulkan packages unpack: $(ls "$stage"/gl)"
fi
adapter=()
if [[ $vulkan -eq 1 ]]; then
    adapters=$("$bin/specrej" adapters 2>&1)
    nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    if [[ $mode != dry ]] && ! grep -qi nvidia <<<"$adapters" && [[ -f $nvidia_icd ]]; then
        export VK_DRIVER_FILES=$nvidia_icd
        adapters=$("$bin/specrej" adapters 2>&1)
    fi
    echo "$adapters" | sed 's/^/  wgpu adapter: /' | tee -a "$out/summary.txt"
    if [[ $mode == dry ]]; then
        grep -qi llvmpipe <<<"$adapters" && adapter=(--adapter llvmpipe)
    elif grep -qi nvidia <<<"$adapters"; then
        adapter=(--adapter NVIDIA)
    else
        log "wgpu found no NVIDIA adapter: its steps run on what it found, and are labelled so"
    fi
    grep -qi "no adapter" <<<"$adapters" && vulkan=0
fi

# ---------------------------------------------------------------------------------------
# The real model: call 1 left part a (in the checkout, or in $stash), part b came now.
model=""
if [[ -f $stage/model.part-b && -f $stage/model.sha256 ]]; then
    part_a=""
    for c in "$part_a_dir/model.part-a" "$stash/model.part-a"; do
        [[ -f $c ]] && { part_a=$c; break; }
    done
    if [[ -z $part_a ]]; then
        log "the model's part a is not here (no call 1, or the machine was given back between the calls): real-model steps skipped"
    else
        cat "$part_a" "$stage/model.part-b" >"$work/model.gguf"
        want=$(cut -d' ' -f1 "$stage/model.sha256")
        got=$(sha256sum "$work/model.gguf" | cut -d' ' -f1)
        if [[ $got == "$want" ]]; then
            model=$work/model.gguf
            log "the default model reassembled from $part_a and $stage/model.part-b: sha256 $got"
        else
            failed=1
            log "FAIL  model: sha256 $got, expected $want (parts from different stagings?): real-model steps skipped"
        fi
    fi
else
    log "no model part staged ($stage/model.part-b): real-model steps skipped"
fi

# Sizes: the device's, or tiny ones on the CPU.
if [[ $mode == dry ]]; then
    tests_filter=(conformance::candle_cpu_passes_the_suite conformance::wgpu_is_batch_invariant_within_rounding)
    greedy_tokens=8
    cli_n=4 cli_new=8
    tp=(--rows 1,2 --steps 2 --prefill-tokens 16 --context 16 --weights q8-0 --bon 2 --bon-tokens 4)
    decode_rows=1,4 decode_prompt=32 decode_steps=2 copy_mib=64
    paper=(--limit "${PAPER_LIMIT:-1}" --bon "${PAPER_BON:-2,4}" --alphas "${PAPER_ALPHAS:-0.5}"
           --kv-budget "${PAPER_KV_BUDGET:-320tok}" --max-new-tokens "${PAPER_MAX_NEW:-24}"
           --record-rows "${PAPER_RECORD_ROWS:-4}" --min-new-tokens 8
           --calibration bench-results/calibration.json)
else
    tests_filter=(conformance::)
    greedy_tokens=32
    cli_n=32 cli_new=64
    tp=(--rows 1,64,256 --steps 16 --prefill-tokens 128,512 --context 16 --bon 64 --bon-tokens 128)
    decode_rows=1,64,256,1024 decode_prompt=512 decode_steps=16 copy_mib=2048
    paper=(--limit "${PAPER_LIMIT:-8}" --bon "${PAPER_BON:-64,128,256,512}" --alphas "${PAPER_ALPHAS:-0.5,0.7}"
           --kv-budget "${PAPER_KV_BUDGET:-1GB}" --max-new-tokens "${PAPER_MAX_NEW:-1024}"
           --record-rows "${PAPER_RECORD_ROWS:-512}")
fi

# ---------------------------------------------------------------------------------------
# 1. CUDA conformance: CUDA against the CPU (a missing device fails).
if [[ $mode == dry ]]; then
    skip conformance-cuda "no CUDA"
else
    SPECREJ_REQUIRE_GPU=cuda step conformance-cuda 120 \
        "$bin/specrej-candle-tests" tests::cuda:: --include-ignored --test-threads 1 --nocapture
fi
if [[ $unit_tests -eq 1 ]]; then
    step unit-tests 180 "$bin/specrej-candle-tests"
fi

# 2. wgpu conformance on the machine's Vulkan driver: the tests package's suite (wgpu against
#    candle-cpu on the real model: logits, greedy and sampled tokens, retain, an SR winner).
if [[ -z $model ]]; then
    skip conformance-wgpu "needs the real model"
elif [[ $vulkan -eq 0 ]]; then
    skip conformance-wgpu "no Vulkan"
else
    SPECREJ_MODEL=$model SPECREJ_REQUIRE_GPU=wgpu step conformance-wgpu 150 \
        "$bin/specrej-tests" "${tests_filter[@]}" --include-ignored --test-threads 1 --nocapture
fi

# 3. The same greedy answer from every backend: candle-cpu and candle-CUDA with f32 weights
#    (the dequantized file) and wgpu (which dequantizes in its shaders), token for token.
if [[ -n $model ]]; then
    greedy() {
        local backend=$1
        shift
        step "greedy-$backend" 90 "$bin/specrej" generate "Describe, step by step, how to bake a loaf of bread at home." \
            --model "$model" --backend "$backend" "$@" --method bon -n 1 --temperature 0 \
            --max-new-tokens "$greedy_tokens" --seed 1 --json
    }
    greedy cpu --weights f32
    if [[ $mode == dry ]]; then skip greedy-cuda "no CUDA"; else greedy cuda --weights f32; fi
    if [[ $vulkan -eq 1 ]]; then greedy wgpu "${adapter[@]}"; else skip greedy-wgpu "no Vulkan"; fi
    for b in cpu cuda wgpu; do
        [[ -f $logs/greedy-$b.txt ]] && json_doc "$logs/greedy-$b.txt" winner >"$work/greedy-$b.json"
    done
    step greedy-agree 30 python3 - "$work" <<'EOF'
import json, pathlib, sys
runs = {}
for b in ["cpu", "cuda", "wgpu"]:
    f = pathlib.Path(sys.argv[1]) / f"greedy-{b}.json"
    if f.exists() and f.stat().st_size > 0:
        runs[b] = json.loads(f.read_text())["winner"]["tokens"]
ref = runs.pop("cpu", None)
if ref is None or not runs:
    sys.exit(f"nothing to compare: {sorted(runs)} beside cpu {ref is not None}")
bad = 0
for b, tokens in runs.items():
    same = next((i for i, (x, y) in enumerate(zip(ref, tokens)) if x != y), min(len(ref), len(tokens)))
    ok = tokens == ref
    bad += not ok
    print(f"greedy {b} vs cpu: {same}/{len(ref)} tokens equal" + ("" if ok else f": cpu {ref} {b} {tokens}"))
sys.exit(bad)
EOF
    cat "$logs/greedy-agree.txt" >>"$out/summary.txt"
else
    skip greedy "needs the real model"
fi

# 4. The CLI end to end: SR and BoN on CUDA, the real model (or a random-weight one of its
#    shape without it).
cli_model=$model
if [[ -z $model ]]; then
    cli_model=$work/smollm2-135m-random.gguf
    step write-smollm2 120 "$bin/gpu_bench" write-model --shape smollm2-135m --tokenizer "$tokenizer" --out "$cli_model"
fi
cli_backend=cuda
[[ $mode == dry ]] && cli_backend=cpu
for method in sr bon; do
    step "cli-$method-$cli_backend" 90 "$bin/specrej" generate "Give three tips for staying healthy." --model "$cli_model" \
        --backend "$cli_backend" --method "$method" --n "$cli_n" --max-new-tokens "$cli_new" --seed 1 --json
done

# 5. specrej bench throughput: CUDA (native and Q8_0 weights) beside wgpu.
backends=cuda,wgpu
[[ $mode == dry ]] && backends=cpu,wgpu
[[ $vulkan -eq 0 ]] && backends=${backends%,wgpu}
step "throughput-${backends/,/-}" 150 "$bin/specrej" bench throughput --model "$cli_model" --backends "$backends" \
    "${adapter[@]}" "${tp[@]}" --json
# One line for bench.jsonl.
json_doc "$logs/throughput-${backends/,/-}.txt" decode 2>/dev/null | sed 's/^{/{"bench": "throughput", /' >"$logs/bench-throughput.txt"

# 6. Decode tokens/s at 1-1024 rows, 512 cached tokens, beside the memory-bandwidth bound
#    (bytes per step over the measured device-to-device copy bandwidth): Q8_0, the file's own
#    Q4_1 (native) and f32 weights (candle holds no f16/bf16 weights).
device=cuda
[[ $mode == dry ]] && device=cpu
if [[ -n $model ]]; then
    for w in q8_0 native f32; do
        step "bench-decode-$w" 100 "$bin/gpu_bench" decode --model "$model" --device "$device" --weights "$w" \
            --rows "$decode_rows" --prompt "$decode_prompt" --steps "$decode_steps" --copy-mib "$copy_mib"
    done
else
    step bench-bandwidth 60 "$bin/gpu_bench" bandwidth --device "$device" --copy-mib "$copy_mib"
    step bench-decode-random 120 "$bin/gpu_bench" decode --model "$cli_model" --device "$device" \
        --rows "$decode_rows" --prompt "$decode_prompt" --steps "$decode_steps" --copy-mib "$copy_mib"
fi

# 7. The Llama-3-8B-shaped random model (opt-in: writing 8.5 GB takes a while).
if [[ $llama3 -eq 1 ]]; then
    big=$work/llama3-8b-random.gguf
    step write-llama3-8b 300 "$bin/gpu_bench" write-model --shape llama3-8b --out "$big"
    if [[ -f $big ]]; then
        step bench-decode-llama3-8b 240 "$bin/gpu_bench" decode --model "$big" --device "$device" --rows 1,64,256 --steps 16
        step bench-methods-llama3-8b 240 "$bin/gpu_bench" methods --model "$big" --device "$device" --n 64 --max-new 128
    fi
    rm -f "$big"
fi

# 8. Last, with what is left of the deadline: Speculative Rejection against Best-of-N under a
#    KV budget Best-of-N cannot fit at full length (bench paper: one Best-of-N recording per
#    prompt, the ladder and SR replayed under the budget, the judge's rewards, wall priced
#    by a calibration of this GPU). Results are saved after each prompt, so a step cut by
#    the deadline still reports the prompts it finished.
if [[ -n $model ]]; then
    rm -rf "$work/paper"
    step paper 100000 "$bin/specrej" bench paper --model "$model" --backend "$device" --rewards judge \
        --policies paper,random,oracle "${paper[@]}" --bootstrap 500 --out "$work/paper"
    if [[ -f $work/paper/report.md ]]; then
        cp "$work/paper/report.md" "$out/paper-report.md"
        prompts=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["prompts"]))' "$work/paper/results.json" 2>/dev/null)
        log "bench paper: ${prompts:-?} prompts done (paper-report.md)"
    fi
else
    skip paper "needs the real model"
fi

# ---------------------------------------------------------------------------------------
grep -h '"bench"' "$logs"/bench-*.txt >"$out/bench.jsonl" 2>/dev/null
grep -h "^test \|test result" "$logs"/conformance-*.txt 2>/dev/null | tee -a "$out/summary.txt"
[[ -d $work/paper ]] && cp -r "$work/paper" "$logs/paper" && rm -rf "$logs/paper/recordings"
tar -czf "$out/logs.tar.gz" -C "$work" logs
rm -f "$work/model.gguf" "$work/smollm2-135m-random.gguf"
[[ $failed -eq 0 ]] && log "all steps passed" || log "some steps FAILED"
exit $failed
