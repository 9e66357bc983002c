#!/usr/bin/env bash
# One device call: GPU tests and the benchmarks, results under $OUT. Stages: tests layer
# layer32k memory wgrad hf hf-profile qlora kernels triton-bwd peers profile fsdp finetune
# fsdp-tune layer-block host saved ep fp8 (default: all but kernels, triton-bwd, peers, fsdp*,
# finetune, layer-block, host, saved, ep and fp8; peers needs liger-kernel's wheel in .whl, fsdp*
# and ep two GPUs). Run from the repository root.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
stages=${*:-tests layer layer32k memory wgrad hf hf-profile qlora profile}
if [ -d .whl ]; then  # carried wheels (bitsandbytes) for the QLoRA baseline
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for s in $stages; do
  echo "=== $s"
  case $s in
    # the full log stays in $OUT even when a caller's timeout cuts the run short
    tests) timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -q -rf -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    layer) python3 -m groupmoe bench --tokens 8192 \
             --impls loop naive groupmoe groupmoe-recompute dense --out "$OUT/layer_8192.json" \
             | grep '^|' ;;
    layer32k) python3 -m groupmoe bench --tokens 32768 --modes train --repeat 10 \
             --impls naive groupmoe groupmoe-recompute dense --out "$OUT/layer_32768.json" \
             | grep '^|' ;;
    memory) python3 -m groupmoe.bench.memory --out "$OUT/memory.json" | grep -v '^  ' ;;
    wgrad) python3 -m groupmoe.bench.wgrad_split --out "$OUT/wgrad_split.json" ;;
    # eager and every decoder layer compiled, per experts implementation
    hf) python3 -m groupmoe.bench.hf_e2e --impls grouped_mm groupmoe --out "$OUT/hf_e2e.json" \
          2>&1 | grep -v "^{" ;;
    hf-profile) python3 -m groupmoe.bench.hf_e2e --models qwen3-30b-a3b --modes compiled \
          --profile grouped_mm groupmoe 2>&1 | grep -v "^{" | cut -c1-200 ;;
    qlora) python3 -m groupmoe.bench.qlora --out "$OUT/qlora.json" 2>&1 | tail -11 ;;
    kernels) timeout 540 python3 -m groupmoe.bench.kernels --out "$OUT/kernels.json" 2>&1 \
               | tail -60 ;;
    # fwd+bwd per shape: auto (groupmoe) vs backend torch vs backend triton (fused forward and
    # backward kernels), with naive and the dense chain for the ratios
    triton-bwd) python3 -m groupmoe bench --tokens 8192 --modes train --repeat 10 \
             --impls naive groupmoe groupmoe-torch groupmoe-triton dense \
             --out "$OUT/layer_triton_bwd.json" | grep '^|' ;;
    peers) LIGER_FUSED_MOE_AUTOTUNE=${LIGER_FUSED_MOE_AUTOTUNE:-0} timeout 240 python3 -m groupmoe \
             bench --shapes qwen3-30b-a3b olmoe-1b-7b mixtral-8x7b --modes train \
             --impls groupmoe liger dense --out "$OUT/peers.json" ;;
    # FSDP2 on 1 and 2 GPUs (nvidia-h200-x2), eager and compiled, and the link's bandwidth
    fsdp) torchrun --nproc-per-node 2 -m groupmoe.bench.nccl_bw
          for c in "" --compile; do python3 -m groupmoe.bench.fsdp_bench --gpus 1 2 $c \
            --out "$OUT/fsdp${c:+_compiled}.json" | grep '^|'; done ;;
    # whole-model fine-tuning jobs, one job's arguments per line of FT_JOBS (default:
    # benchmarks/finetune_jobs.txt); a job's "--out DIR" goes under $OUT/ft; every job's
    # metrics, profile and plots are re-packed into $OUT/finetune.tgz after it (few files back)
    finetune) while read -r job; do
          [[ -z "$job" || $job == \#* ]] && continue
          echo "--- groupmoe finetune $job"
          dir=$(sed -n 's/.*--out \([^ ]*\).*/\1/p' <<< "$job"); job=${job/--out $dir/}
          timeout 420 python3 -m groupmoe finetune --out "/tmp/ft/${dir:-probe}" $job 2>&1 \
            | tr '\r' '\n' | grep -v "it/s]\|s/it]\|^{'\|Warning\|warnings.warn\|^ *$"
          tar czf "$OUT/finetune.tgz" -C /tmp/ft --exclude 'tokenizer-*' .
        done <<< "${FT_JOBS:-$(cat benchmarks/finetune_jobs.txt)}" ;;
    # FSDP2 overlap settings on 2 GPUs: GEMM SM carveout, NCCL CTAs, no reshard, batch
    fsdp-tune) f() { python3 -m groupmoe.bench.fsdp_bench "$@" | grep '^| [12] '; }
          echo "-- eager, batch 4: default / carveout 16 / + NCCL_MAX_CTAS=16 / + keep-unsharded"
          f --gpus 1 2; f --gpus 2 --sm-carveout 16
          NCCL_MAX_CTAS=16 f --gpus 2 --sm-carveout 16
          NCCL_MAX_CTAS=16 f --gpus 2 --sm-carveout 16 --keep-unsharded
          echo "-- eager, batch 8"; f --gpus 1 --batch 8
          NCCL_MAX_CTAS=16 f --gpus 2 --batch 8 --sm-carveout 16 --keep-unsharded
          echo "-- compiled, batch 4 / 8"; f --gpus 1 --compile; f --gpus 1 --compile --batch 8
          NCCL_MAX_CTAS=16 f --gpus 2 --compile --sm-carveout 16 --keep-unsharded
          NCCL_MAX_CTAS=16 f --gpus 2 --compile --batch 8 --sm-carveout 16 --keep-unsharded ;;
    # the whole layer (MoEBlock with its router) against SonicMoE's, forward and train; the
    # SonicMoE kit (../shared/peers/sonicmoe.sh) carried as .peer-sonicmoe
    layer-block) if [ -d .peer-sonicmoe ]; then
            PEER=$(mktemp -d) && tar -C "$PEER" -xJf .peer-sonicmoe/cutlass_dsl.tar.xz \
              && python3 -m pip install -q --no-index --no-deps --target "$PEER" .peer-sonicmoe/*.whl \
              && export PYTHONPATH=$PEER/nvidia_cutlass_dsl/python_packages:$PEER:$PYTHONPATH
          fi
          python3 -m groupmoe bench --tokens 8192 --shapes qwen3-30b-a3b olmoe-1b-7b mixtral-8x7b \
            --modes forward train --impls groupmoe block sonicmoe dense --out "$OUT/layer_block.json" \
            | grep '^|' ;;
    # host time against wall time per piece of one layer call at fine-tuning token counts
    host) for t in 2048 8192; do python3 -m groupmoe.bench.host --tokens $t \
            --out "$OUT/host_$t.json"; done ;;
    # expert parallel on 2 GPUs: unpipelined and pipelined in 2 and 4 chunks
    ep) torchrun --nproc-per-node 2 -m groupmoe.bench.ep_bench --overlap-chunks 1 2 4 \
          --out "$OUT/ep.json" 2>&1 | grep -v "^W" ;;
    # precision="fp8" against bf16 groupmoe and the dense chain, then in two Qwen3 decoder
    # layers against grouped_mm (its GPU test first)
    fp8) python3 -m pytest -q -m gpu tests/test_fp8.py 2>&1 | tail -3
         python3 -m groupmoe bench --tokens 8192 --modes train forward \
           --impls groupmoe groupmoe-fp8 dense --out "$OUT/layer_fp8.json" | grep '^|'
         python3 -m groupmoe.bench.hf_e2e --models qwen3-30b-a3b \
           --impls grouped_mm groupmoe groupmoe-fp8 --out "$OUT/hf_e2e_fp8.json" 2>&1 \
           | grep -v "^{" ;;
    # what a forward keeps for backward, tensor by tensor, against what it leaves allocated
    saved) for i in experts block; do python3 -m groupmoe.bench.saved --impl $i; done ;;
    profile) python3 -m groupmoe.bench.profile --shape qwen3-30b-a3b --impls groupmoe dense \
               --rows 14 2>&1 \
               | awk '/^per step/ {print; next} !/^-----/ {print substr($0, 1, 60) substr($0, 100, 70)}' ;;
  esac
done
