# shellcheck shell=bash
# shellcheck disable=SC2034  # PY, SRUN_CONTAINER, WRAP are set here for the scripts that source this file
# Helpers shared by train.sbatch, convert.sbatch and eval.sbatch (sourced by them, not run on its own).
#
# Sets up, from the user's environment variables (see slurm/README.md):
#   PY                  the Python that has opsd_megatron (VENV is activated first when set; else OPSD_PYTHON)
#   SRUN_CONTAINER[@]   extra srun arguments for pyxis/enroot (OPSD_CONTAINER_IMAGE)
#   WRAP[@]             command prefix for Apptainer (OPSD_APPTAINER_IMAGE)
# and provides:
#   opsd_log / opsd_die       timestamped lines in the job log; die = one clear error line, exit 2
#   opsd_procs_per_node       PROCS_PER_NODE, else GPUs on the node, else 1
#   opsd_node_addr NODE       an address for NODE that other nodes can reach (name if it resolves, else NodeAddr)
#   opsd_run_step CMD...      run `srun ... CMD` in the background, forward USR1/TERM, requeue after USR1

opsd_log() { echo "[${OPSD_TAG:-opsd} $(date -u +%H:%M:%S)] $*"; }
opsd_die() {
    echo "[${OPSD_TAG:-opsd}] error: $*" >&2
    exit 2
}

# ---------------------------------------------------------------- python, container, threads
opsd_setup_python() {
    if [[ -n "${VENV:-}" ]]; then
        [[ -f "$VENV/bin/activate" ]] || opsd_die "VENV=$VENV is not a virtual environment (no $VENV/bin/activate)."
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    PY="${OPSD_PYTHON:-python}"
    SRUN_CONTAINER=()
    WRAP=()
    if [[ -n "${OPSD_CONTAINER_IMAGE:-}" && -n "${OPSD_APPTAINER_IMAGE:-}" ]]; then
        opsd_die "set only one of OPSD_CONTAINER_IMAGE (pyxis/enroot) and OPSD_APPTAINER_IMAGE (Apptainer)."
    fi
    local mounts="${OPSD_CONTAINER_MOUNTS:-$PWD:$PWD}"
    if [[ -n "${OPSD_CONTAINER_IMAGE:-}" ]]; then
        SRUN_CONTAINER=(--container-image="$OPSD_CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="$PWD")
    elif [[ -n "${OPSD_APPTAINER_IMAGE:-}" ]]; then
        WRAP=("${OPSD_APPTAINER:-apptainer}" exec --bind "$mounts" --pwd "$PWD")
        if command -v nvidia-smi >/dev/null 2>&1; then WRAP+=(--nv); fi
        WRAP+=("$OPSD_APPTAINER_IMAGE")
    fi
}

opsd_procs_per_node() {
    local n="${PROCS_PER_NODE:-}"
    if [[ -z "$n" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then n="$SLURM_GPUS_ON_NODE"; fi
    if [[ -z "$n" ]] && command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    [[ -n "$n" && "$n" != 0 ]] || n=1
    [[ "$n" =~ ^[0-9]+$ ]] || opsd_die "PROCS_PER_NODE must be a positive integer, got '$n'."
    echo "$n"
}

# Threads per process and the NCCL/CUDA settings Megatron expects; every value can be overridden by the user.
opsd_thread_env() {
    local procs="$1" cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
    local threads=$((cpus / procs))
    ((threads >= 1)) || threads=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
    export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
    export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export PYTHONUNBUFFERED=1
}

# ---------------------------------------------------------------- rendezvous address
opsd_node_addr() {
    local node="$1" addr
    if getent hosts "$node" >/dev/null 2>&1; then
        echo "$node"
        return
    fi
    # Emulated or oddly named nodes: the name does not resolve, SLURM's NodeAddr does.
    for _ in 1 2 3 4 5; do # slurmctld may be slow to answer on a busy controller
        addr="$(scontrol show node -o "$node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
        [[ -n "$addr" ]] && break
        sleep 2
    done
    [[ -n "$addr" ]] || opsd_die "cannot resolve the first node '$node' (not in DNS, no NodeAddr in scontrol); set OPSD_MASTER_ADDR."
    echo "$addr"
}

# ---------------------------------------------------------------- the step, signals and requeue
# USR1 (from `#SBATCH --signal=B:USR1@N`, the time-limit warning) reaches only this batch shell: forward it to
# every process of the step so the program checkpoints within its grace period, wait for the step, then
# `scontrol requeue` this job. SIGTERM (preemption, `scontrol requeue`, scancel) reaches the step directly;
# the shell only waits for the step so the program can finish its checkpoint, and SLURM requeues by itself.
OPSD_REQUEUE=0
_opsd_on_usr1() {
    opsd_log "got SIGUSR1 (time limit near): forwarding to the step, then requeueing job $SLURM_JOB_ID"
    OPSD_REQUEUE=1
    scancel --signal=USR1 "$SLURM_JOB_ID" || kill -USR1 "$OPSD_STEP_PID" 2>/dev/null
}
_opsd_on_term() {
    opsd_log "got SIGTERM: waiting for the step to write its checkpoint and exit"
}

opsd_run_step() {
    trap _opsd_on_usr1 USR1
    trap _opsd_on_term TERM
    srun "$@" &
    OPSD_STEP_PID=$!
    while kill -0 "$OPSD_STEP_PID" 2>/dev/null; do wait "$OPSD_STEP_PID"; done
    wait "$OPSD_STEP_PID"
    OPSD_STEP_RC=$?
    trap - USR1 TERM
    opsd_log "step finished with exit code $OPSD_STEP_RC"
    if ((OPSD_REQUEUE)); then
        opsd_log "requeueing job $SLURM_JOB_ID (restart count ${SLURM_RESTART_COUNT:-0})"
        scontrol requeue "$SLURM_JOB_ID" || opsd_die "scontrol requeue $SLURM_JOB_ID failed (is the job --requeue?)."
        exit 0
    fi
    return "$OPSD_STEP_RC"
}
