"""Deterministic profiling of the weft proxy pair (issue 7), outside the benchmark proper.

`callgrind`: the weft topology of the benchmark with one proxy (client or server side) run
under `valgrind --tool=callgrind`; after a warm-up its counters are zeroed, a fixed number of
requests is sent with h2load (one connection, one request at a time unless told otherwise),
and the counters are dumped. Instruction counts do not depend on what else runs on the
machine, so before/after comparisons hold on a busy box.

`syscalls`: the same topology without valgrind; `strace -c` attached to both proxies while
h2load sends a fixed number of requests; prints system calls per request by kind. At 1,000
req/s most of a request's CPU is the kernel's, so this is what explains a CPU difference
that instruction counts do not.

`memory`: the same topology without valgrind: RSS/PSS of each proxy after start-up and a
few requests, then with N idle keep-alive connections held open through the pair.

    python3 bench/weftbench/profile.py callgrind --bin-dir DIR --role server --requests 20000
    python3 bench/weftbench/profile.py syscalls --bin-dir DIR --requests 5000
    python3 bench/weftbench/profile.py memory --bin-dir DIR --idle-connections 2000
"""

import argparse
import os
import re
import resource
import signal
import shutil
import subprocess
import sys
import time

import contenders as ct
import load
import net
import procstat
from topo import BenchError, Topology, tool


def h2load(contender, ctx, requests, connections, streams, proto):
    argv = [tool("h2load"), "-n", str(requests), "-c", str(connections), "-m", str(streams),
            "-t", "1"]
    if proto == "h1":
        argv.append("--h1")
    argv.append(contender.url(proto))
    text = load._exec(contender.client_ns, ctx.load_cpu, argv, 3600)
    done = load._H2LOAD_DONE.search(text)
    if not done or int(done.group(4)) != requests:
        raise BenchError(f"h2load did not complete every request:\n{text[-1500:]}")
    return int(done.group(4))


def callgrind_total(path):
    """Total Ir of a callgrind dump (its `summary:` or `totals:` line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"(?:summary|totals): (\d+)", line)
            if m:
                return int(m.group(1))
    raise BenchError(f"{path}: no totals line")


def callgrind_once(args, ctx, out_dir, requests):
    """One topology with the profiled proxy under callgrind: warm-up, `requests` requests,
    then SIGTERM so callgrind writes its profile at exit. Returns the profile's path."""
    out_file = os.path.join(out_dir, f"callgrind.{args.role}.{requests}.out")
    if os.path.exists(out_file):
        os.remove(out_file)
    ctx.wrap = {args.role: [tool("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out_file}"]}
    weft = ct.Weft(ctx, ct.OCTETS["weft"])
    weft.start()
    proc = weft.proxies()[args.role]
    h2load(weft, ctx, args.warmup, args.connections, args.streams, args.proto)
    t0 = time.monotonic()
    h2load(weft, ctx, requests, args.connections, args.streams, args.proto)
    took = time.monotonic() - t0
    proc.popen.send_signal(signal.SIGTERM)
    proc.popen.wait(timeout=300)
    total = callgrind_total(out_file)
    print(f"profile: {args.role} proxy, {args.warmup} + {requests} {args.proto} requests "
          f"({took:.1f}s): {total} Ir in its lifetime")
    return out_file, total


def by_function(path, inclusive):
    """{function: Ir} from callgrind_annotate (inclusive or self cost)."""
    text = subprocess.run([tool("callgrind_annotate"), f"--inclusive={'yes' if inclusive else 'no'}",
                           "--threshold=100", path],
                          capture_output=True, text=True, check=True).stdout
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?)\s*$", line)
        if not m or m.group(2).startswith(("=>", "*")) or ":" not in m.group(2):
            continue
        # "file:function [object]" -> "function"
        name = re.sub(r"\s*\[[^\]]*\]$", "", m.group(2).split(":", 1)[1])
        out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out


def per_request_table(small_path, big_path, extra, inclusive):
    a, b = by_function(small_path, inclusive), by_function(big_path, inclusive)
    rows = sorted(((b.get(k, 0) - a.get(k, 0)) / extra, k) for k in b)
    rows.reverse()
    return [(per, name) for per, name in rows if per >= 20]


def run_callgrind(args, ctx_factory, out_dir):
    """Two proxy lifetimes, `--small` and `--requests` requests after the same warm-up: the
    difference is the cost of the extra requests alone (start-up, certificates and the
    warm-up cancel out up to their own small run-to-run variation)."""
    os.makedirs(out_dir, exist_ok=True)
    os.chmod(out_dir, 0o777)
    runs = {}
    for n in (args.small, args.requests):
        ctx, topo = ctx_factory()
        try:
            runs[n] = callgrind_once(args, ctx, out_dir, n)
        finally:
            topo.close()
    extra = args.requests - args.small
    (small_path, small), (big_path, big) = runs[args.small], runs[args.requests]
    print(f"profile: {args.role} proxy: ({big} - {small}) / {extra} = {(big - small) / extra:.0f} Ir/request")
    for kind, inclusive in (("inclusive", True), ("self", False)):
        rows = per_request_table(small_path, big_path, extra, inclusive)
        with open(os.path.join(out_dir, f"per-request.{args.role}.{kind}.txt"), "w", encoding="utf-8") as f:
            for per, name in rows:
                f.write(f"{per:10.0f}  {name}\n")
        print(f"profile: {args.role} proxy, top {kind} Ir/request:")
        for per, name in rows[:args.top]:
            print(f"{per:10.0f}  {name[:150]}")


def rss_by_mapping(pid):
    """{mapping: (Rss KiB, Pss KiB)} from /proc/<pid>/smaps: the binary, libraries, heap,
    anonymous memory."""
    out = {}
    name = None
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                path = fields[5] if len(fields) > 5 else "[anon]"
                name = os.path.basename(path) if path.startswith("/") else path
                name = f"{name} {fields[1]}"
            elif fields and fields[0] in ("Rss:", "Pss:"):
                rss, pss = out.get(name, (0, 0))
                if fields[0] == "Rss:":
                    rss += int(fields[1])
                else:
                    pss += int(fields[1])
                out[name] = (rss, pss)
    return out


def run_syscalls(args, ctx, out_dir):
    weft = ct.Weft(ctx, ct.OCTETS["weft"])
    weft.start()
    h2load(weft, ctx, args.warmup, args.connections, args.streams, args.proto)
    os.makedirs(out_dir, exist_ok=True)
    tracers = {}
    for role, proc in weft.proxies().items():
        out = os.path.join(out_dir, f"strace.{role}.txt")
        tracers[role] = (out, subprocess.Popen(
            [tool("strace"), "-c", "-f", "-o", out, "-p", str(proc.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1)  # strace attaches asynchronously
    h2load(weft, ctx, args.requests, args.connections, args.streams, args.proto)
    for _, tracer in tracers.values():
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    for role, (out, _) in tracers.items():
        calls = {}
        with open(out, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                # % time, seconds, usecs/call, calls, [errors,] syscall
                if len(fields) >= 5 and fields[3].isdigit() and not fields[-1].startswith("total"):
                    calls[fields[-1]] = int(fields[3])
        total = sum(calls.values())
        print(f"profile: {role} proxy, {args.proto}, {args.requests} requests: "
              f"{total / args.requests:.2f} system calls/request")
        for name, n in sorted(calls.items(), key=lambda kv: -kv[1]):
            print(f"    {n / args.requests:7.2f}  {name}")


def run_memory(args, ctx):
    weft = ct.Weft(ctx, ct.OCTETS["weft"])
    weft.start()
    pids = {role: procstat.process_tree(p.pid) for role, p in weft.proxies().items()}
    h2load(weft, ctx, 100, 4, 1, "h1")
    time.sleep(2)
    idle = {role: procstat.memory_kib(p) for role, p in pids.items()}
    for role, m in idle.items():
        print(f"profile: idle {role} proxy: RSS {m['rss'] / 1024:.2f} MiB, PSS {m['pss'] / 1024:.2f} MiB")
        maps = rss_by_mapping(weft.proxies()[role].pid)
        for mapping, (rss, pss) in sorted(maps.items(), key=lambda kv: -kv[1][0])[:8]:
            print(f"    {rss:7d} KiB RSS {pss:7d} KiB PSS  {mapping}")
    if args.idle_connections:
        host, port = weft.target("h1")
        sockets, _ = net.open_idle_connections(weft.client_ns, host, port, args.idle_connections)
        try:
            time.sleep(2)
            held = {role: procstat.memory_kib(p) for role, p in pids.items()}
            fds = {role: procstat.open_descriptors(p) for role, p in pids.items()}
        finally:
            net.close_all(sockets)
        for role in pids:
            per = {k: (held[role][k] - idle[role][k]) * 1024.0 / args.idle_connections for k in ("rss", "pss")}
            print(f"profile: {args.idle_connections} idle connections, {role} proxy: RSS "
                  f"{held[role]['rss'] / 1024:.2f} MiB ({per['rss'] / 1024:.2f} KiB/conn), PSS "
                  f"{held[role]['pss'] / 1024:.2f} MiB ({per['pss'] / 1024:.2f} KiB/conn), {fds[role]} fds")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["callgrind", "syscalls", "memory"])
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--role", choices=["client", "server"], default="server")
    p.add_argument("--proto", choices=["h1", "h2"], default="h1")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--small", type=int, default=2000,
                   help="requests of the baseline lifetime subtracted from --requests'")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--idle-connections", type=int, default=0)
    p.add_argument("--out", default="/tmp/wprof")
    p.add_argument("--proxy-cpu", type=int, default=1)
    p.add_argument("--load-cpu", type=int, default=0)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("needs root")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    topos = []

    def ctx_factory():
        work_dir = f"/tmp/wprof-work-{os.getpid()}-{len(topos)}"
        os.makedirs(work_dir, exist_ok=True)
        topo = Topology(work_dir)
        topos.append(topo)
        ctx = ct.Context(topo, args.bin_dir, args.proxy_cpu, args.load_cpu, work_dir,
                         args.idle_connections + 100)
        return ctx, topo

    try:
        if args.mode == "callgrind":
            run_callgrind(args, ctx_factory, args.out)
        elif args.mode == "syscalls":
            run_syscalls(args, ctx_factory()[0], args.out)
        else:
            run_memory(args, ctx_factory()[0])
    finally:
        for topo in topos:
            topo.close()
            shutil.rmtree(topo.work_dir, ignore_errors=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BenchError as e:
        print(f"profile: {e}", file=sys.stderr)
        sys.exit(1)
