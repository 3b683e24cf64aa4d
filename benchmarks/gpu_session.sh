#!/usr/bin/env bash
# One lease on a GPU machine, batched: the benchmarks that fit the GPUs present, each side by side
# with its peer, results JSON under $OUT (and benchmarks/results/ on that machine).
#
#   bash benchmarks/gpu_session.sh PHASE...
#   PHASE: io (= aio ckpt) | aio | ckpt | ckptverify | zeropp | moe | moekernels | offload | overlap |
#          largest | longseq | dsops | quant | autotune | clients | tests | tests:ds-x,ds-y
#   dsops: builds DeepSpeed 0.19.8's JIT ops (CPU Adam, quantizer) before any timed phase, so no
#          peer run spends its time limit compiling; later phases of the same lease reuse them.
#          The builds live in .torch_ext/ (ignored by git); the phase also packs them into
#          $OUT/torch_ext.tgz, which unpacked into .torch_ext/ and carried to a fresh machine
#          saves the next lease the build
#   longseq: longest sequence of a Llama-3.2-3B shape, ZeRO-3 offload, ours vs DeepSpeed ALST vs
#            plain transformers (benchmarks/seq/long_seq.py; LONGSEQ_BUDGET_S per system)
#   overlap: the offloaded step's modes vs DeepSpeed's, one GPU, scenarios offload-overlap-zero3
#            and -zero2 (OVERLAP_DEADLINE_S, default 470, bounds both; OVERLAP_LIMIT_S, default
#            110, bounds one system; OVERLAP_PEER_LIMIT_S, default 75, bounds DeepSpeed's
#            SuperOffload and ZenFlow, which stall in 0.19.8; OVERLAP_SCENARIOS and
#            OVERLAP_SYSTEMS pick subsets)
#   largest: LARGEST_RUNS ("deepspeed:cpu=28,30 ours:split=56,60": engine:config=block ladders,
#            d=4096), LARGEST_DEADLINE_S (default 540)
#
# Expects the peers' scripts in shared/peers and, with no package registry on the GPU machine,
# the wheels DeepSpeed needs in .whl/ (see shared/peers/README.md). Every phase logs to
# $OUT/session.log; a failing phase is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export OUT=${OUT:-$ROOT/out/gpu_session}
mkdir -p "$OUT"
LOG=$OUT/session.log
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_ext}
# NVLink multicast stays off on shared hosts (KINDS.md): a program using it can take GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" | tee -a "$LOG"
  export PYTHONPATH=/tmp/site
fi
# Every package's src/ but ds-deepspeed's: that one is a package named `deepspeed` too, and next to
# the real DeepSpeed installed above its import guard refuses to load (and would hide the peer).
# The harnesses that want it (the clients' ours-* trials, ds-deepspeed's tests) put it first.
ALIAS_SRC=$ROOT/packages/ds-deepspeed/src
export PYTHONPATH=$(ls -d "$ROOT"/packages/*/src | grep -vxF "$ALIAS_SRC" | tr '\n' ':')${PYTHONPATH:-}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
GPUNAME=$(python3 -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
SCRATCH=${SCRATCH:-/root/ds_bench_scratch}
mkdir -p "$SCRATCH"
{ echo "== $(date -u) $NGPU x $GPUNAME"; nvidia-smi --query-gpu=name,memory.total --format=csv;
  df -h "$SCRATCH" /tmp; nproc; free -g; } >>"$LOG" 2>&1

phase() {  # phase NAME CMD...: run, log, report the exit code, never abort the session
  local name=$1 t0=$SECONDS rc
  shift
  echo "== phase $name: $*" >>"$LOG"
  "$@" >>"$LOG" 2>&1
  rc=$?
  echo "== phase $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

TR=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU")
for p in "$@"; do
  case $p in
    io | aio)
      phase aio python3 benchmarks/offload/aio_bench.py --dir "$SCRATCH" --size-mb 2048 \
        --device-name "$GPUNAME-host"
      ;;&
    io | ckpt)
      phase ckpt "${TR[@]}" benchmarks/ckpt/ckpt_bench.py gpu --stage 1 --reps "${CKPT_REPS:-2}" \
        --dir "$SCRATCH/ckpt" --out-dir "$OUT"
      ;;
    aio) ;;
    ckptverify)  # verified-load cost against 0.1.2 (no checksums) and 0.1.3, sources in .bench_prev
      phase ckptverify python3 benchmarks/ckpt/ckpt_bench.py cpu-load --gb 1.5 --reps 4 \
        --dir "$SCRATCH/ckv" --baseline-src .bench_prev/packages/ds-ckpt/src \
        --also-src .bench_prev/v013/packages/ds-ckpt/src --also-rev 64c37aa \
        --cache-probe-flip --threads-variants 8 --suffix=-threads2
      ;;
    zeropp)  # ZeRO-3 against ZeRO++ end to end, ours and DeepSpeed's, on the GPUs present
      phase zeropp "${TR[@]}" benchmarks/zero/zeropp_multi_gpu.py --out "$OUT" ;;
    moe)  # 5 turns per system: the fused kernels' A/B differences are a few percent
      phase moe "${TR[@]}" benchmarks/moe/moe_bench.py --repeats 5 --out "$OUT"
      phase moe-upstream-grad "${TR[@]}" benchmarks/moe/moe_bench.py --repeats 5 --out "$OUT" \
        --loss upstream-grad --no-check
      ;;
    moekernels)  # ds-moe's fused kernels alone against the unfused passes
      phase bias-act python3 benchmarks/moe/bias_act_bench.py --out "$OUT" \
        --tiles "${BIAS_ACT_TILES:-16x128x2,16x128x1,8x128x1,16x128x4,32x128x2,16x64x1,16x256x4}"
      phase gate-logits python3 benchmarks/moe/gate_logits_bench.py --out "$OUT" --sweep
      ;;
    offload)
      phase offload python3 benchmarks/offload/zero2_offload_gpu.py --gpus "$NGPU" --steps 8 \
        --peers-dir shared/peers --device-name "${NGPU}x$GPUNAME"
      ;;
    overlap)
      # shellcheck disable=SC2086  # scenario and system lists are separate words
      phase overlap python3 benchmarks/offload/offload_overlap_gpu.py \
        --scenarios ${OVERLAP_SCENARIOS:-zero3 zero2} ${OVERLAP_SYSTEMS:+--systems $OVERLAP_SYSTEMS} \
        --peers-dir shared/peers --device-name "1x$GPUNAME" \
        --deadline-s "${OVERLAP_DEADLINE_S:-470}" --limit-s "${OVERLAP_LIMIT_S:-110}" \
        --peer-mode-limit-s "${OVERLAP_PEER_LIMIT_S:-75}"
      ;;
    largest)  # LARGEST_RUNS: space-separated ENGINE:CONFIG=L1,L2 (see largest_model.py)
      runs=()
      for r in ${LARGEST_RUNS:-deepspeed:cpu=28,30,32 ours:cpu=36,38 ours:split=48,52}; do
        runs+=(--run "$r")
      done
      phase largest python3 benchmarks/offload/largest_model.py --peers-dir shared/peers \
        "${runs[@]}" --nvme-path "$SCRATCH/nvme" --deadline-s "${LARGEST_DEADLINE_S:-540}" \
        --device-name "1x$GPUNAME"
      ;;
    longseq)  # LONGSEQ_BUDGET_S: seconds per system's search, build included (default 170);
              # LONGSEQ_TOTAL_S: the whole phase (default 540, so that the wheel install and
              # start-up fit in a 10-minute command too); LONGSEQ_START (16384);
              # LONGSEQ_STEP (tokens per ladder length, default 0: doubling); LONGSEQ_GRANULARITY
              # (bisection step, default 4096);
              # LONGSEQ_SYSTEMS (default "deepspeed-alst ours hf-plain"); LONGSEQ_MERGE=FILE
              # puts the runs into that results file, keeping its other systems' runs (one
              # command per system, each started near its projected bound)
      # shellcheck disable=SC2086  # the systems are separate words
      phase longseq python3 benchmarks/seq/long_seq.py --nproc "$NGPU" ${LONGSEQ_MERGE:+--merge --out "$LONGSEQ_MERGE"} \
        --systems ${LONGSEQ_SYSTEMS:-deepspeed-alst ours hf-plain} --start "${LONGSEQ_START:-16384}" \
        --ladder-step "${LONGSEQ_STEP:-0}" --granularity "${LONGSEQ_GRANULARITY:-4096}" \
        --budget-s "${LONGSEQ_BUDGET_S:-170}" --total-s "${LONGSEQ_TOTAL_S:-540}" \
        --device-name "${NGPU}x$GPUNAME"
      ;;
    dsops)
      phase dsops env MAX_JOBS="$(nproc)" python3 -c "
from deepspeed.ops.op_builder import CPUAdamBuilder, QuantizerBuilder
for b in (CPUAdamBuilder(), QuantizerBuilder()):
    b.load(); print('built', b.name)"
      tar -czf "$OUT/torch_ext.tgz" -C "$TORCH_EXTENSIONS_DIR" . >>"$LOG" 2>&1
      ;;
    quant)
      phase quant python3 benchmarks/zero/quant_bench.py ${QUANT_ARGS:-} ;;
    autotune)  # AUTOTUNE_ARGS (default: the small preset: 1.34B, stages 0 and 3, micro-batches
               # 2 and 4; "--models 1.3b --stages 0,1,2,3 --offload none --micro-batches 1,2,4,8"
               # is the 16-configuration space, about 10 minutes; the 6B space runs as several
               # commands of one lease with --sessions, --resume and --merge, see
               # autotune_bench.py's docstring)
      # shellcheck disable=SC2086  # the arguments are separate words
      phase autotune python3 benchmarks/profile/autotune_bench.py \
        ${AUTOTUNE_ARGS:---models 1.3b --stages 0,3 --offload none --micro-batches 2,4} \
        --global-batch 16 --peers-dir shared/peers
      ;;
    clients)
      phase clients python3 benchmarks/clients/hf_clients_gpu.py ;;
    tests | tests:*)  # tests:ds-ckpt,ds-moe runs those packages only
      export DS_TEST_GPU=1
      sel=${p#tests}; sel=${sel#:}
      for pkg in packages/*/; do
        [ -n "$sel" ] && [[ ",$sel," != *",$(basename "$pkg"),"* ]] && continue
        # each package's own src/ first: ds-deepspeed's tests import the alias, left off the
        # session's path, with the real DeepSpeed behind it on purpose (the guard is told so)
        PYTHONPATH=$ROOT/${pkg}src:$PYTHONPATH DS_DEEPSPEED_ALLOW_SHADOW=1 phase \
          "gpu-tests-$(basename "$pkg")" timeout 240 python3 -m pytest -q -m gpu \
          -p no:cacheprovider "$pkg/tests"
      done
      ;;
    *) echo "unknown phase $p (io | aio | ckpt | ckptverify | zeropp | moe | offload | overlap | largest | longseq | dsops | quant | autotune | clients | tests[:pkgs])" | tee -a "$LOG"; exit 2 ;;
  esac
done
rm -rf "$SCRATCH"
