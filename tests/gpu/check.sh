#!/usr/bin/env bash
# kdgeo on a CUDA GPU: mixed precision with every loss kind, probe and eval, checkpoint + --resume,
# torchrun, throughput. At most ~5 minutes on one GPU. Not part of `python -m pytest`: this folder
# holds no Python file, so pytest collects nothing here (tests/test_gpu_check.py keeps it so and
# checks the script's refusals). See tests/gpu/README.md.
#
#   tests/gpu/check.sh                               # on a machine with a GPU
#   KDGEO_GPU_CHECK_DEVICE=cpu tests/gpu/check.sh    # DRY RUN of the script's plumbing on CPU
#
# Exit codes: 0 every check passed; 1 a check failed (the table says which; logs are kept);
# 2 bad usage; 3 no CUDA device (nothing was checked: a skip is not a pass).
#
# Environment: KDGEO_GPU_CHECK_DEVICE = cuda (default) | cpu (dry run: tiny sizes, fp16 and nccl
# skipped, figures meaningless); KDGEO_GPU_CHECK_DIR = work directory (default: a new temp dir,
# removed on success); PYTHON = interpreter with kdgeo installed (default: python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python}"
DEVICE="${KDGEO_GPU_CHECK_DEVICE:-cuda}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

case "$DEVICE" in
  cuda)
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
      echo "tests/gpu/check.sh: no CUDA device (torch.cuda.is_available() is false): nothing was checked." >&2
      echo "Run it on a machine with a GPU and a CUDA build of torch; KDGEO_GPU_CHECK_DEVICE=cpu is only a dry run." >&2
      exit 3
    fi
    # Demo-sized: the demo's teacher fine-tune (2 epochs over 2400 glosses), 40 steps of 32 per run.
    STEPS=40; BATCH=32; SIZES=(); FP16=1; STEP_LIMIT=150
    BF16=bf16; BF16_NAME=bfloat16  # train.precision, and how summary.json names it
    ;;
  cpu)
    echo "DRY RUN on CPU (KDGEO_GPU_CHECK_DEVICE=cpu): checks the script's plumbing only; fp16 and nccl are skipped," \
         "the bf16 runs run in fp32 (bf16 autocast on CPU is slower than the whole budget), sizes are tiny" \
         "and the figures are not GPU figures." >&2
    STEPS=4; BATCH=8; FP16=0; STEP_LIMIT=300
    BF16=fp32; BF16_NAME=fp32
    SIZES=(--set data.max_train_samples=64 --set data.max_eval_samples=32 --set teacher.finetune.epochs=1
           --set monitor.samples=16 --set monitor.every=2)
    ;;
  *)
    echo "KDGEO_GPU_CHECK_DEVICE must be cuda or cpu, not '$DEVICE'." >&2
    exit 2
    ;;
esac

WORK="${KDGEO_GPU_CHECK_DIR:-$(mktemp -d -t kdgeo-gpu-check.XXXXXX)}"
mkdir -p "$WORK/logs" "$WORK/figures"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
FAILED=0
START=$SECONDS
# Every run: the offline demo spec (examples.toml's top level: MiniLM-L6 -> 2 copied layers on
# WordNet supersenses), sized here; the fine-tuned teacher is cached once in $WORK/cache.
COMMON=(--set "train.device=\"$DEVICE\"" --set "train.max_steps=$STEPS" --set "train.batch_size=$BATCH"
        --set "output.dir=\"$WORK/runs\"" --set "output.teacher_cache=\"$WORK/cache\"" --set train.log_every=1
        "${SIZES[@]}")
ALL_A='losses=[{kind="ce"},{kind="kd"},{kind="procrustes",form="squared"},{kind="gram"},{kind="cka"},'
ALL_A+='{kind="projection"}]'
ALL_B='losses=[{kind="ce"},{kind="procrustes",form="angular"},{kind="mse"},{kind="cosine"}]'

distill() {  # distill NAME [--set ...]: one run of the demo spec under $WORK/runs/NAME
  local name=$1; shift
  timeout "$STEP_LIMIT" "$PY" -m kdgeo distill "$REPO/examples.toml" -q "${COMMON[@]}" \
    --set "output.name=\"$name\"" "$@"
}

figure() { echo "$*" > "$WORK/figures/$CURRENT"; }

step() {  # step NAME FUNCTION: run it with errexit in a subshell, log it, record ok/FAIL and seconds
  local name=$1 fn=$2 t0=$SECONDS rc
  CURRENT=$name
  echo "== $name" >&2
  set +e
  ( set -e; "$fn" ) > "$WORK/logs/$name.log" 2>&1
  rc=$?
  set -e
  local detail=""
  [[ -f "$WORK/figures/$name" ]] && detail=$(cat "$WORK/figures/$name")
  if [[ $rc -eq 0 ]]; then
    printf '%s\tok\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$detail" >> "$RESULTS"
  else
    FAILED=1
    printf '%s\tFAIL (exit %s, log %s)\t%s\t%s\n' "$name" "$rc" "$WORK/logs/$name.log" "$((SECONDS - t0))" "$detail" \
      >> "$RESULTS"
    tail -n 15 "$WORK/logs/$name.log" >&2
  fi
}

skip() { printf '%s\tskipped (%s)\t0\t\n' "$1" "$2" >> "$RESULTS"; }

# check_run RUN PRECISION: summary.json says the run trained on $DEVICE in PRECISION with finite
# numbers and no non-finite step; prints "samples/s, score" for the table.
check_run() {
  "$PY" - "$1" "$2" "$DEVICE" <<'EOF'
import json, math, sys
run, precision, device = sys.argv[1], sys.argv[2], sys.argv[3]
s = json.load(open(f"{run}/summary.json"))
assert s["device"].startswith(device), f"trained on {s['device']}, not {device}"
assert s["precision"] == precision, f"precision {s['precision']}, expected {precision}"
assert s["skipped_steps_nonfinite"] == 0, "non-finite steps were skipped"
numbers = [v for v in s["scores"].values() if isinstance(v, (int, float))]
numbers += [v for p in s["geometry"] for k, v in p.items() if k not in ("student", "teacher")]
assert numbers and all(math.isfinite(v) for v in numbers), f"non-finite: {s['scores']} {s['geometry']}"
steps = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"event": "step"' in l]
assert steps and all(math.isfinite(e["loss"]) for e in steps), "a logged loss is not finite"
print(f"{s['samples_per_s']:.1f} samples/s, accuracy {s['scores']['accuracy']:.4f}, "
      f"fp16 overflow steps skipped {s['skipped_steps_fp16_overflow']}")
EOF
}

# ---- the checks ---------------------------------------------------------------------------------

demo_bf16() {  # the demo's own losses (ce, kd, procrustes) in bf16: also the throughput figure
  distill demo-bf16 --set "train.precision=\"$BF16\""
  figure "$(check_run "$WORK/runs/demo-bf16" "$BF16_NAME")"
}

losses_run() {  # losses_run NAME PRECISION SUMMARY_NAME LOSSES
  distill "$1" --set "train.precision=\"$2\"" --set "$4"
  figure "$(check_run "$WORK/runs/$1" "$3")"
}
losses_bf16_a() { losses_run bf16-a "$BF16" "$BF16_NAME" "$ALL_A"; }
losses_bf16_b() { losses_run bf16-b "$BF16" "$BF16_NAME" "$ALL_B"; }
losses_fp16_a() { losses_run fp16-a fp16 float16 "$ALL_A"; }
losses_fp16_b() { losses_run fp16-b fp16 float16 "$ALL_B"; }

probe_on_device() {  # every teacher x student layer pair of the bf16 demo run, streamed on the device
  local teacher
  teacher=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["teacher_path"])' \
    "$WORK/runs/demo-bf16/summary.json")
  timeout "$STEP_LIMIT" "$PY" -m kdgeo probe "$teacher" "$WORK/runs/demo-bf16/student" --device "$DEVICE" \
    --max-samples $((BATCH * 8)) --max-length 48 --json "$WORK/probe.json" -q
  figure "$("$PY" - "$WORK/probe.json" <<'EOF'
import json, math, sys
r = json.load(open(sys.argv[1]))
flat = []
def walk(x):
    if isinstance(x, bool): return
    if isinstance(x, (int, float)): flat.append(float(x))
    elif isinstance(x, dict): [walk(v) for v in x.values()]
    elif isinstance(x, list): [walk(v) for v in x]
walk(r)
assert flat and all(math.isfinite(v) for v in flat), "non-finite number in the probe result"
print(f"{len(flat)} numbers, all finite")
EOF
)"
}

# Checkpoint + --resume on the device, fp32 (no autocast) so the tolerance can be tight: the full
# run checkpoints at STEPS/2; then the end of the run is erased (summary.json, student/, the step
# and eval lines after the checkpoint are cut back by --resume itself) and resumed. Tolerance:
# every logged loss, the final eval scores and the final geometry within rel 1e-3 or abs 2.5e-3
# (GPU kernels with atomics are not bitwise reproducible; a resume with the wrong data position,
# RNG or schedule is off by far more; on CPU tests/test_resume.py checks bit for bit).
resume_on_device() {
  local run="$WORK/runs/resume"
  distill resume --set 'train.precision="fp32"' --set "train.checkpoint_every=$((STEPS / 2))"
  cp "$run/summary.json" "$WORK/uninterrupted-summary.json"
  cp "$run/metrics.jsonl" "$WORK/uninterrupted-metrics.jsonl"
  rm -rf "$run/summary.json" "$run/student"
  timeout "$STEP_LIMIT" "$PY" -m kdgeo distill "$run" --resume -q
  figure "$("$PY" - "$run" "$WORK" <<'EOF'
import json, math, sys
run, work = sys.argv[1], sys.argv[2]
a, b = json.load(open(f"{work}/uninterrupted-summary.json")), json.load(open(f"{run}/summary.json"))
assert b["resumed_from"], "the second run did not resume from a checkpoint"
def close(x, y, what):
    assert math.isclose(x, y, rel_tol=1e-3, abs_tol=2.5e-3), f"{what}: uninterrupted {x} vs resumed {y}"
steps = lambda path: [json.loads(l) for l in open(path) if '"event": "step"' in l]
sa, sb = steps(f"{work}/uninterrupted-metrics.jsonl"), steps(f"{run}/metrics.jsonl")
assert [e["step"] for e in sa] == [e["step"] for e in sb], "the resumed run logged other steps"
for x, y in zip(sa, sb):
    close(x["loss"], y["loss"], f"loss at step {x['step']}")
for key, value in a["scores"].items():
    if isinstance(value, (int, float)):
        close(value, b["scores"][key], f"final {key}")
for pa, pb in zip(a["geometry"], b["geometry"]):
    for key, value in pa.items():
        close(value, pb[key], f"final geometry {key} of pair {pa['student']}-{pa['teacher']}")
worst = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(sa, sb))
print(f"resumed from {b['resumed_from'].rsplit('/', 1)[-1]}; max rel loss diff {worst:.1e} over {len(sa)} steps")
EOF
)"
}

eval_on_device() {  # `kdgeo eval RUN` on the device reproduces the fp32 run's summary accuracy
  timeout "$STEP_LIMIT" "$PY" -m kdgeo eval "$WORK/runs/resume" --device "$DEVICE" --precision fp32 \
    --json "$WORK/eval.json" -q
  figure "$("$PY" - "$WORK/runs/resume/summary.json" "$WORK/eval.json" <<'EOF'
import json, math, sys
s, e = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
acc = e["scores"]["accuracy"]
assert math.isclose(acc, s["scores"]["accuracy"], abs_tol=2.5e-3), f"eval {acc} vs summary {s['scores']['accuracy']}"
print(f"accuracy {acc:.4f} (summary {s['scores']['accuracy']:.4f})")
EOF
)"
}

torchrun_one() {  # torchrun with one process: kdgeo treats WORLD_SIZE=1 as a plain run (no process group)
  timeout "$STEP_LIMIT" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m kdgeo distill "$REPO/examples.toml" -q "${COMMON[@]}" --set 'output.name="torchrun-1"' \
    --set "train.precision=\"$BF16\""
  figure "$(check_run "$WORK/runs/torchrun-1" "$BF16_NAME")"
}

nccl_smoke() {  # the nccl backend itself, in one process: all_reduce and the autograd all_gather kdgeo uses
  cat > "$WORK/nccl_smoke.py" <<'EOF'
import os, torch, torch.distributed as dist
from torch.distributed.nn.functional import all_gather
rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
x = torch.full((4,), float(rank + 1), device="cuda", requires_grad=True)
y = x.detach().clone(); dist.all_reduce(y)
parts = all_gather(x); sum(p.sum() for p in parts).backward()
world = dist.get_world_size()
assert torch.allclose(y, torch.full_like(y, world * (world + 1) / 2)) and x.grad is not None
if rank == 0: print(f"nccl {torch.cuda.nccl.version()} world {world}: all_reduce and all_gather ok")
dist.destroy_process_group()
EOF
  timeout 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 "$WORK/nccl_smoke.py" \
    | tee "$WORK/logs/nccl.out"
  figure "$(tail -n 1 "$WORK/logs/nccl.out")"
}

torchrun_two() {  # a real nccl DDP run, only where two GPUs are visible
  timeout "$STEP_LIMIT" "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m kdgeo distill "$REPO/examples.toml" -q "${COMMON[@]}" --set 'output.name="torchrun-2"' \
    --set "train.precision=\"$BF16\""
  "$PY" -c 'import json,sys; n = json.load(open(sys.argv[1])).get("processes"); assert n == 2, n' \
    "$WORK/runs/torchrun-2/summary.json"
  figure "2 processes: $(check_run "$WORK/runs/torchrun-2" "$BF16_NAME")"
}

# ---- run ----------------------------------------------------------------------------------------

"$PY" -c 'import torch, transformers, kdgeo
print(f"kdgeo {kdgeo.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' >&2
if [[ $DEVICE == cuda ]]; then
  "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")' >&2
fi
step demo-bf16 demo_bf16
step losses-bf16-a losses_bf16_a
step losses-bf16-b losses_bf16_b
if [[ $FP16 == 1 ]]; then
  step losses-fp16-a losses_fp16_a
  step losses-fp16-b losses_fp16_b
else
  skip losses-fp16-a "dry run"; skip losses-fp16-b "dry run"
fi
step probe probe_on_device
step resume resume_on_device
step eval eval_on_device
step torchrun-1 torchrun_one
if [[ $DEVICE == cuda ]]; then
  step nccl nccl_smoke
  if [[ $("$PY" -c 'import torch; print(torch.cuda.device_count())') -ge 2 ]]; then
    step torchrun-2 torchrun_two
  else
    skip torchrun-2 "one GPU"
  fi
else
  skip nccl "dry run"; skip torchrun-2 "dry run"
fi

echo
MODE=$DEVICE; [[ $DEVICE == cpu ]] && MODE="cpu (DRY RUN: plumbing only)"
echo "kdgeo GPU check on $MODE, ${STEPS} steps of ${BATCH} per run, $((SECONDS - START)) s in all"
"$PY" - "$RESULTS" <<'EOF'
import sys
rows = [["check", "result", "s", "figures"]]
rows += [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
widths = [max(len(r[i]) for r in rows) for i in range(3)]
for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
EOF
if [[ $FAILED == 1 ]]; then
  echo "Some checks FAILED; logs are in $WORK/logs." >&2
  exit 1
fi
if [[ -z "${KDGEO_GPU_CHECK_DIR:-}" ]]; then
  rm -rf "$WORK"
fi
