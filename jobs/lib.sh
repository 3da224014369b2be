# shellcheck shell=bash
# Shared by fedavg.sbatch and sweep.sbatch (sourced, not run): launch one
# fedmpi run, pass SLURM's warning signal on to it, and requeue the job if
# the run was stopped before it finished, so that the requeued job resumes
# the same results file (`--resume auto`).
#
# Settings (environment variables, all optional):
#   PYTHON     interpreter with fedmpi installed             (default: python)
#   LAUNCHER   mpiexec | srun                                (default: mpiexec)
#   MPIEXEC    the mpiexec to use with LAUNCHER=mpiexec      (default: mpiexec)
#   SRUN_MPI   srun's --mpi plug-in with LAUNCHER=srun       (default: pmi2)
#   NTASKS     MPI ranks                       (default: $SLURM_NTASKS, else 1)
#   REQUEUE    1 = requeue an interrupted run, 0 = just exit (default: 1)
#   REQUEUE_ON signals after which to requeue, space separated (default: USR1;
#              see _fedmpi_finish for why not TERM)

# One compute thread per rank: ranks, not threads, fill the cores.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1

PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-mpiexec}
MPIEXEC=${MPIEXEC:-mpiexec}
SRUN_MPI=${SRUN_MPI:-pmi2}
REQUEUE=${REQUEUE:-1}
REQUEUE_ON=${REQUEUE_ON:-USR1}

_fedmpi_child=
_fedmpi_trapped=0
_fedmpi_signal=

# Signal handler of the batch shell. bash runs a trap only between commands,
# which is why the launcher runs in the background and the shell sits in
# `wait` (which a trapped signal interrupts). mpiexec (hydra) and srun both
# pass SIGUSR1 and SIGTERM on to every rank; fedmpi then finishes writing the
# round in progress, closes its file and exits with 128+signal.
_fedmpi_forward() {
    _fedmpi_trapped=1
    _fedmpi_signal=$1
    echo "fedmpi job: got SIG$1 at $(date '+%F %T'), passing it on to the run" >&2
    if [ -n "$_fedmpi_child" ]; then
        kill -s "$1" "$_fedmpi_child" 2>/dev/null || true
    fi
}

# fedmpi_run FLAGS...: run `python -m fedmpi FLAGS...` on NTASKS ranks and
# exit the batch script with the right status: the run's own, or 0 after a
# successful requeue request for an interrupted run.
fedmpi_run() {
    local ntasks=${NTASKS:-${SLURM_NTASKS:-1}}
    local -a cmd
    case $LAUNCHER in
        mpiexec) cmd=("$MPIEXEC" -n "$ntasks" "$PYTHON" -m fedmpi "$@") ;;
        srun) cmd=(srun --mpi="$SRUN_MPI" -n "$ntasks" "$PYTHON" -m fedmpi "$@") ;;
        *) echo "fedmpi job: LAUNCHER must be mpiexec or srun, not '$LAUNCHER'" >&2; exit 2 ;;
    esac
    trap '_fedmpi_forward USR1' USR1
    trap '_fedmpi_forward TERM' TERM
    trap '_fedmpi_forward INT' INT
    echo "fedmpi job ${SLURM_JOB_ID:-(no SLURM job)} (restart ${SLURM_RESTART_COUNT:-0}) on" \
         "$(hostname -s) at $(date '+%F %T'): ${cmd[*]}" >&2
    "${cmd[@]}" &
    _fedmpi_child=$!
    # a signal that came while the launcher was being started
    if [ -n "$_fedmpi_signal" ]; then kill -s "$_fedmpi_signal" "$_fedmpi_child" 2>/dev/null; fi
    local status
    while :; do
        _fedmpi_trapped=0
        wait "$_fedmpi_child"
        status=$?
        # A trapped signal ends `wait` early (status 128+signal) while the
        # run is still going: wait again until the run itself has ended.
        # (`wait` on a child that has already ended returns its status.)
        [ "$_fedmpi_trapped" = 1 ] || break
    done
    trap - USR1 TERM INT
    _fedmpi_finish "$status"
}

# _fedmpi_finish STATUS: exit with STATUS, or requeue an interrupted run.
_fedmpi_finish() {
    local status=$1 sig=$_fedmpi_signal
    if [ "$status" = 0 ]; then
        exit 0
    fi
    # fedmpi stopped by a signal exits 128+signal with its last checkpoint
    # complete; a run that failed otherwise after our trap fired (killed
    # while stopping, say) can be resumed too: its file holds every round up
    # to its last complete checkpoint.
    if [ -z "$sig" ]; then
        case $status in
            130) sig=INT ;;
            138) sig=USR1 ;;
            143) sig=TERM ;;
            *) exit "$status" ;;  # a failure, not an interruption: don't retry it
        esac
    fi
    echo "fedmpi job: the run stopped (status $status) after SIG$sig; finished rounds and" \
         "the last checkpoint are in its results file" >&2
    # Requeue only for the signals in REQUEUE_ON: SIGUSR1 is the warning before
    # the time limit (--signal=B:USR1@60) or a deliberate
    # `scancel --signal=USR1 --batch JOBID`. SIGTERM is also what a plain
    # `scancel JOBID` sends, and SLURM accepts a requeue request from a job it
    # is cancelling, so requeueing on SIGTERM would make the job impossible
    # to cancel; add TERM to REQUEUE_ON only if you want exactly that.
    case " $REQUEUE_ON " in
        *" $sig "*) ;;
        *) exit "$status" ;;
    esac
    if [ "$REQUEUE" != 1 ] || [ -z "${SLURM_JOB_ID:-}" ]; then
        exit "$status"
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        echo "fedmpi job: requeued job $SLURM_JOB_ID; it continues from the last checkpoint" \
             "when it starts again (SLURM holds it back for ~2 minutes after a requeue)" >&2
        exit 0
    fi
    echo "fedmpi job: 'scontrol requeue $SLURM_JOB_ID' failed; submit the same command again" \
         "to continue from the last checkpoint" >&2
    exit "$status"
}
