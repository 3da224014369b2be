"""A throw-away single-node SLURM cluster for tests (Debian's slurm-wlm, 22.05).

SlurmCluster(directory).start() writes a slurm.conf into `directory` (host
from ``hostname -s``, free ports, every path inside `directory`, 8 CPUs
declared on however many cores the machine has), starts ``slurmctld`` and
``slurmd`` as root without systemd and waits until the node is idle. All
SLURM commands of the tests go through `run`/`sbatch`, which pass
SLURM_CONF explicitly. `stop` cancels every job, stops both daemons by the
pids in their pid files and kills whatever is left of the jobs: every
process started here carries a marker variable in its environment, so
leftovers are found in /proc without guessing by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

MARKER_VAR = "FEDMPI_TEST_SLURM_CLUSTER"
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}
# Searched as well as PATH: the daemons live in /usr/sbin, often not on a user's PATH.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")

CONF = """\
# Written by tests/slurm_cluster.py: a single-node cluster for the tests only.
ClusterName=fedmpitest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ReturnToService=2
# keep finished jobs visible to scontrol for the whole test session
MinJobAge=3600
KillWait=10
# the node declares 8 CPUs, whatever the machine has: SlurmdParameters=config_overrides
# below lets slurmd accept that on a 2-core machine instead of draining the node
SlurmdParameters=config_overrides
NodeName={host} CPUs=8 Sockets=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(_SBIN))


def unavailable_reason() -> str | None:
    """Why a test cluster can't be started here, or None if it can."""
    missing = [p for p in PROGRAMS if which(p) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found): "
                "apt-get install slurm-wlm to enable the SLURM tests")
    if os.geteuid() != 0:
        return ("the test SLURM cluster runs slurmctld/slurmd as root (SlurmUser=root): "
                "run the tests as root to enable the SLURM tests")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def marked_processes(marker: str) -> dict[int, str]:
    """{pid: command line} of live processes whose environment carries `marker`."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if _alive(pid):
            found[pid] = cmdline
    return found


def parse_job_records(text: str) -> list[dict[str, str]]:
    """`scontrol -o show job` output -> one {key: value} per line (array tasks: one each).

    Values may contain spaces (Command=script arg1 arg2): a word without
    '=' continues the previous value.
    """
    records = []
    for line in text.splitlines():
        record: dict[str, str] = {}
        key = None
        for word in line.split():
            k, eq, v = word.partition("=")
            if eq and k and (key is None or not k.startswith("-")):
                key = k
                record[key] = v
            elif key is not None:
                record[key] += " " + word
        if record:
            records.append(record)
    return records


class SlurmCluster:
    def __init__(self, directory):
        self.dir = os.path.abspath(str(directory))
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.marker = uuid.uuid4().hex
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        self.started = False

    # -- environment and commands ------------------------------------------------

    def env(self, extra: dict | None = None) -> dict:
        """os.environ + SLURM_CONF of this cluster + the leftover marker (+ extra)."""
        env = dict(os.environ)
        env.update(extra or {})
        env["SLURM_CONF"] = self.conf
        env[MARKER_VAR] = self.marker
        return env

    def run(self, *args, check: bool = True, timeout: float = 30,
            env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        """A SLURM command (first word looked up in PATH and /usr/sbin) on this cluster."""
        program = which(args[0]) or args[0]
        res = subprocess.run([program, *map(str, args[1:])], capture_output=True, text=True,
                             timeout=timeout, env=self.env(env), cwd=cwd)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {res.returncode}:\n"
                               f"{res.stdout}{res.stderr}")
        return res

    def sbatch(self, *args, env: dict | None = None, cwd=None) -> str:
        """Submit; returns the job id (of the array job for --array)."""
        res = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        return res.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """scontrol's records of a job (an array job: one per task, or per pending range)."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return parse_job_records(res.stdout) if res.returncode == 0 else []

    def wait_until(self, job_id: str, condition, timeout: float, what: str,
                   interval: float = 0.5) -> list[dict[str, str]]:
        """Poll scontrol until condition(records) is true; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and condition(records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: {what} did not happen within {timeout} s; "
                                     f"last records: {records}\n{self.log_tails()}")
            time.sleep(interval)

    def wait_finished(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        """Wait until the job (every array task) is in a final state; its records."""
        return self.wait_until(
            job_id, lambda recs: all(r.get("JobState") in FINAL_STATES for r in recs),
            timeout, "finishing")

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            try:
                with open(os.path.join(self.dir, name)) as fh:
                    tail = fh.readlines()[-lines:]
            except OSError:
                tail = ["(no log)\n"]
            out.append(f"--- {name}\n{''.join(tail)}")
        return "".join(out)

    # -- lifetime ------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        with open(self.conf, "w") as fh:
            fh.write(CONF.format(host=self.host, dir=self.dir, ctld_port=_free_port(),
                                 slurmd_port=_free_port()))
        self.started = True  # from here on, stop() has something to clean up
        # -c: clean start, no saved state. Both daemonize; their pids go to pid files.
        self.run("slurmctld", "-c", "-f", self.conf)
        self.run("slurmd", "-f", self.conf)
        deadline = time.monotonic() + timeout
        while True:
            res = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
            state = res.stdout.strip()
            if res.returncode == 0 and state == "idle":
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the test SLURM node is not idle after {timeout} s "
                                   f"(sinfo: {state!r} {res.stderr.strip()})\n{self.log_tails()}")
            time.sleep(0.5)

    def _daemon_pid(self, name: str) -> int | None:
        try:
            with open(os.path.join(self.dir, f"{name}.pid")) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 30) -> dict[int, str]:
        """Cancel all jobs, stop the daemons, kill leftovers; returns the leftovers
        that had to be killed ({pid: command line}; empty if all went away by themselves)."""
        if not self.started:
            return {}
        self.started = False
        deadline = time.monotonic() + timeout
        # Cancel every job and let slurmd's steps clean up while the daemons still run.
        self.run("scancel", "--user", str(os.geteuid()), check=False)
        while time.monotonic() < deadline:
            res = self.run("squeue", "-h", "-o", "%i", check=False)
            if res.returncode != 0 or not res.stdout.strip():
                break
            time.sleep(0.5)
        pids = [p for p in (self._daemon_pid("slurmd"), self._daemon_pid("slurmctld")) if p]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Whatever still carries our marker: slurmstepd, job scripts, ranks.
        leftovers = {}
        end = time.monotonic() + 5
        while time.monotonic() < end:
            leftovers = marked_processes(self.marker)
            if not leftovers:
                break
            time.sleep(0.2)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers
