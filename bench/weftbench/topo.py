"""The benchmark's machine: a "node" network namespace with a bridge, pods as network
namespaces hanging off it by veth pairs, the processes started in them, and cleanup of all of
it. Addresses come from 198.18.0.0/15 (RFC 2544, reserved for benchmarking) only."""

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time

NODE_IP = "198.18.0.1"
POD_PREFIX_LEN = 24
BRIDGE = "br0"
# Namespaces are named <prefix><driver pid>-<what>; a leftover whose pid is gone is stale.
NETNS_PREFIX = "wbench-"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def run(cmd, check=True, timeout=120, **kwargs):
    """Runs `cmd` (a list) to completion; fails with its output unless it exits 0."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout.strip()} {proc.stderr.strip()}"
        )
    return proc


def in_netns(netns, fn):
    """Calls `fn()` on a fresh thread that joined /run/netns/<netns>; only that thread moves,
    and it ends with `fn`, so no other code runs in the wrong namespace. Sockets made inside
    stay in the namespace and can be used from any thread afterwards."""
    outcome = {}

    def body():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class Proc:
    """A process started in a namespace, its log file, and a way to stop it."""

    def __init__(self, label, popen, log_path):
        self.label = label
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(self, grace=3.0):
        if not self.alive():
            return
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
        except ProcessLookupError:
            pass


class Topology:
    """Owns every namespace and process of one benchmark run (deleted in `close`)."""

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.log_dir = os.path.join(work_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        # The proxy runs as an unprivileged user and reads its token and anchors from here.
        os.chmod(work_dir, 0o755)
        self.prefix = f"{NETNS_PREFIX}{os.getpid()}-"
        self.node = self.prefix + "node"
        self.namespaces = []
        self.procs = []
        remove_stale_namespaces()
        self._add_netns(self.node)
        run(["ip", "-n", self.node, "link", "set", "lo", "up"])
        run(["ip", "-n", self.node, "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "-n", self.node, "addr", "add", f"{NODE_IP}/{POD_PREFIX_LEN}", "dev", BRIDGE])
        run(["ip", "-n", self.node, "link", "set", BRIDGE, "up"])

    def _add_netns(self, name):
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)

    def add_pod(self, name, octet):
        """Namespace <prefix><name> with eth0 = 198.18.0.<octet>/24, default route via the
        node. Returns (netns name, ip)."""
        netns = self.prefix + name
        ip = f"198.18.0.{octet}"
        host_veth = f"wv{octet}"
        self._add_netns(netns)
        run(["ip", "-n", self.node, "link", "add", host_veth, "type", "veth", "peer", "name",
             "eth0", "netns", netns])
        run(["ip", "-n", self.node, "link", "set", host_veth, "master", BRIDGE])
        run(["ip", "-n", self.node, "link", "set", host_veth, "up"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{ip}/{POD_PREFIX_LEN}", "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        run(["ip", "-n", netns, "route", "add", "default", "via", NODE_IP])
        return netns, ip

    def spawn(self, netns, label, argv, env=None, cpu=None, uid=None):
        """Starts argv in `netns` (pinned to `cpu` when given, as `uid`/`uid` without
        supplementary groups when given). Every wrapper execs, so the pid is the program's."""
        cmd = ["ip", "netns", "exec", netns]
        if cpu is not None:
            cmd += ["taskset", "-c", str(cpu)]
        if uid is not None:
            cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        cmd += [str(a) for a in argv]
        log_path = os.path.join(self.log_dir, f"{label}.log")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, env=full_env)
        finally:
            log.close()
        proc = Proc(label, popen, log_path)
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as e:  # cleanup goes on
                print(f"bench: stopping {proc.label}: {e}")
        self.procs = []
        for netns in reversed(self.namespaces):
            delete_netns(netns)
        self.namespaces = []


def delete_netns(netns):
    """Kills whatever still runs in `netns` and deletes it; best effort."""
    pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass
    if pids:
        time.sleep(0.2)
    run(["ip", "netns", "delete", netns], check=False)


def remove_stale_namespaces():
    """Namespaces of an earlier driver that died without cleaning up."""
    listing = run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NETNS_PREFIX):
            continue
        pid = name[len(NETNS_PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            delete_netns(name)


def wait_until(what, timeout, probe, interval=0.1, failed=None):
    """Polls `probe()` until it is true; `failed()` (optional) returns a reason to stop early."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if failed is not None:
            reason = failed()
            if reason:
                raise BenchError(f"waiting for {what}: {reason}")
        try:
            if probe():
                return
        except OSError as e:
            last_error = e
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def tool(name):
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        raise BenchError(f"{name} is not installed (bench/run installs it)")
    return path
