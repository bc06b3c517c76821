"""weft's benchmark driver: builds the topology for every contender, runs the scenarios with
repetitions (contender order rotated per repetition), measures the proxies from /proc, and
writes results.json, results.md and latency.png under bench/results/<timestamp>/. Run it
through bench/run, which installs the tools and builds the release binaries first."""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback

import contenders as ct
import load
import net
import procstat
import report
from topo import BenchError, Topology

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, kind, protocol, rate (req/s; None: as fast as possible), keep-alive
SCENARIOS = {
    "h1_1000": ("fixed", "h1", 1000, True),
    "h1_5000": ("fixed", "h1", 5000, True),
    "h2_1000": ("fixed", "h2", 1000, True),
    "h2_5000": ("fixed", "h2", 5000, True),
    "grpc_1000": ("fixed", "grpc", 1000, True),
    "h1_newconn_500": ("fixed", "h1", 500, False),
    "h1_max": ("max", "h1", None, True),
    "h2_max": ("max", "h2", None, True),
}

MODES = {
    # About 3 minutes with four contenders, setup included.
    "quick": {
        "reps": 1, "warmup": 2, "fixed_seconds": 10, "max_seconds": 5,
        "scenarios": ["h1_1000", "h2_1000", "h1_max"], "idle_connections": 0,
    },
    # What issue 7 asks for: >= 20 s after a warm-up, 3 repetitions, every scenario.
    "full": {
        "reps": 3, "warmup": 5, "fixed_seconds": 20, "max_seconds": 15,
        "scenarios": list(SCENARIOS), "idle_connections": 10000,
    },
}

# Keep-alive connections of the constant-rate HTTP/1.1 runs (HTTP/2 uses an eighth of them,
# 8 streams each); enough that requests never queue behind a busy connection at 5,000 req/s.
FIXED_CONNECTIONS = 32
MAX_CONNECTIONS = 32
# How long the proxies sit untouched before the idle memory reading.
IDLE_SETTLE_SECONDS = 2


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Side-by-side benchmark of weft, an HAProxy pair, an nginx pair and no proxy.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="HTTP/1.1 and HTTP/2 at 1,000 req/s, max HTTP/1.1 throughput, memory; 1 rep "
                           "(the default; about 3 minutes)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="every scenario, 20 s each after a 5 s warm-up, 3 reps, 10,000 idle "
                           "connections (about 40 minutes)")
    p.set_defaults(mode="quick")
    p.add_argument("--reps", type=int, help="repetitions (default: 1 quick, 3 full)")
    p.add_argument("--seconds", type=int, help="measured seconds per constant-rate run")
    p.add_argument("--max-seconds", type=int, help="measured seconds per max-throughput run")
    p.add_argument("--warmup", type=int, help="warm-up seconds before each run")
    p.add_argument("--scenarios", help="comma-separated subset of: " + ", ".join(SCENARIOS))
    p.add_argument("--idle-connections", type=int,
                   help="idle connections for the memory-per-connection run (0: skip)")
    p.add_argument("--contenders", default="direct,weft,haproxy,nginx",
                   help="comma-separated subset of " + ",".join(ct.ALL) + " (direct is always run; "
                        "weft-authz is weft with an ALLOW AuthorizationPolicy on the server pod)")
    p.add_argument("--proxy-cpu", type=int, default=1, help="CPU every proxy is pinned to")
    p.add_argument("--load-cpu", type=int, default=0, help="CPU of the load generator and the apps")
    p.add_argument("--bin-dir", help="weft release binaries (bench/run passes it)")
    p.add_argument("--rerender", metavar="RESULTS_DIR",
                   help="only rewrite results.md and latency.png from RESULTS_DIR/results.json")
    p.add_argument("--oha", default="", help="oha binary (fallback to weft-httpapp http-load when absent)")
    p.add_argument("--out", help="results directory (default bench/results/<timestamp>)")
    args = p.parse_args(argv)
    if not args.bin_dir and not args.rerender:
        p.error("--bin-dir is required")
    settings = dict(MODES[args.mode])
    for key in ("reps", "warmup", "idle_connections"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.seconds is not None:
        settings["fixed_seconds"] = args.seconds
    if args.max_seconds is not None:
        settings["max_seconds"] = args.max_seconds
    if args.scenarios:
        wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SCENARIOS]
        if unknown:
            p.error(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")
        settings["scenarios"] = wanted
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in ct.ALL]
    if unknown:
        p.error(f"unknown contenders {unknown}")
    # Added latency is measured against the floor, so it always runs.
    settings["contenders"] = ["direct"] + [c for c in ct.ALL if c in names and c != "direct"]
    if settings["reps"] < 1:
        p.error("--reps must be at least 1")
    return args, settings


def proxy_pids(contender):
    return {role: procstat.process_tree(proc.pid) for role, proc in contender.proxies().items()}


def measure(contender, fn):
    """Runs `fn()` (a load run) and adds the proxies' CPU per request and memory after it."""
    pids = proxy_pids(contender)
    load_before = procstat.load_average()
    cpu_before = {role: procstat.cpu_snapshot(p) for role, p in pids.items()}
    result = fn()
    cpu_after = {role: procstat.cpu_snapshot(p) for role, p in pids.items()}
    requests = max(result["requests"], 1)
    result["cpu_seconds"] = {
        role: procstat.cpu_delta_seconds(cpu_before[role], cpu_after[role]) for role in pids}
    result["cpu_us_per_req"] = {role: secs * 1e6 / requests for role, secs in result["cpu_seconds"].items()}
    if pids:
        result["cpu_us_per_req"]["pair"] = sum(result["cpu_us_per_req"].values())
    result["memory_kib"] = {role: procstat.memory_kib(p) for role, p in pids.items()}
    result["loadavg_before"] = load_before
    for role, proc in contender.proxies().items():
        if not proc.alive():
            raise BenchError(f"{contender.name} {role} proxy died during the run:\n{proc.log_tail()}")
    return result


def run_scenario(name, settings, contender, generator, ctx):
    kind, proto, rate, keep_alive = SCENARIOS[name]
    url = contender.url(proto)
    ns, cpu = contender.client_ns, ctx.load_cpu
    if kind == "fixed":
        connections = FIXED_CONNECTIONS
        if settings["warmup"] > 0:
            generator.fixed_rate(ns, cpu, url, proto, rate, settings["warmup"], connections, keep_alive)
        return measure(contender, lambda: generator.fixed_rate(
            ns, cpu, url, proto, rate, settings["fixed_seconds"], connections, keep_alive))
    warm = max(1, min(settings["warmup"], 3))
    if proto == "h1":
        load.wrk_max(ns, cpu, url, warm, MAX_CONNECTIONS)
        return measure(contender, lambda: load.wrk_max(ns, cpu, url, settings["max_seconds"], MAX_CONNECTIONS))
    load.h2load_max(ns, cpu, url, warm, 4, 16)
    return measure(contender, lambda: load.h2load_max(ns, cpu, url, settings["max_seconds"], 4, 16))


def bring_up(ctx, names):
    active = []
    for name in names:
        t0 = time.monotonic()
        contender = ct.ALL[name](ctx, ct.OCTETS[name])
        contender.start()
        active.append(contender)
        print(f"bench: {name} up in {time.monotonic() - t0:.1f}s")
    return active


def idle_connections_run(contender, count):
    """Memory per idle client connection: each proxy's RSS with `count` idle keep-alive
    connections open through the pair, minus its RSS just before."""
    pids = proxy_pids(contender)
    before = {role: procstat.memory_kib(p) for role, p in pids.items()}
    host, port = contender.target("h1")
    sockets, took = net.open_idle_connections(contender.client_ns, host, port, count)
    try:
        time.sleep(IDLE_SETTLE_SECONDS)
        with_conns = {role: procstat.memory_kib(p) for role, p in pids.items()}
        # Evidence that the proxies really hold the connections (not some queue before them).
        descriptors = {role: procstat.open_descriptors(p) for role, p in pids.items()}
    finally:
        net.close_all(sockets)
    return {
        "connections": count,
        "open_seconds": took,
        "memory_kib_before": before,
        "memory_kib_with": with_conns,
        "open_descriptors_with": descriptors,
        "bytes_per_connection": {
            role: {k: (with_conns[role][k] - before[role][k]) * 1024.0 / count for k in ("rss", "pss")}
            for role in pids},
    }


def versions(bin_dir, generator):
    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    git = subprocess.run(["git", "-C", BENCH_DIR, "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    proxy = os.path.join(bin_dir, "weft-proxy")
    built = (datetime.datetime.fromtimestamp(os.path.getmtime(proxy)).strftime("%Y-%m-%d %H:%M")
             if os.path.exists(proxy) else "unknown")
    return {
        "weft": f"{git.stdout.strip() or 'unknown'} (weft-proxy built {built} in {bin_dir})",
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "--version"]),
        "h2load": first_line(["h2load", "--version"]),
        "load_generator": generator.name,
        "bin_dir": bin_dir,
    }


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release()}


def write_reports(results, out_dir, latest):
    """results.json (with the summary), results.md, latency.png; and, for a run in the default
    place, the copies kept in git: results/latest.md and latest.png."""
    results["summary"] = report.summarize(results)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    markdown = report.markdown(results)
    plot = report.plot(results, out_dir)
    latest_md = markdown
    if plot:
        markdown += f"\n![latency percentiles]({os.path.basename(plot)})\n"
        latest_md += "\n![latency percentiles](latest.png)\n"
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    if latest:
        latest_dir = os.path.join(BENCH_DIR, "results")
        with open(os.path.join(latest_dir, "latest.md"), "w", encoding="utf-8") as f:
            f.write(latest_md)
        if plot:
            shutil.copyfile(plot, os.path.join(latest_dir, "latest.png"))
    print(markdown)


def main(argv):
    args, settings = parse_args(argv)
    if args.rerender:
        with open(os.path.join(args.rerender, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        # latest.md follows the newest run in the default place only.
        parent = os.path.dirname(os.path.abspath(args.rerender))
        results_dir = os.path.join(BENCH_DIR, "results")
        newest = max((d for d in os.listdir(results_dir) if os.path.isdir(os.path.join(results_dir, d))),
                     default=None) if os.path.isdir(results_dir) else None
        latest = parent == results_dir and os.path.basename(os.path.abspath(args.rerender)) == newest
        write_reports(results, args.rerender, latest=latest)
        return
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, iptables, uid switching)")
    if (os.cpu_count() or 1) < 2:
        print("bench: one CPU only: proxies and load share it (no pinning)")
        args.proxy_cpu = args.load_cpu = None
    # 10,000 idle connections need that many descriptors in the proxies, which inherit this.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
    except (ValueError, OSError):
        # Not allowed to raise the hard limit here (no CAP_SYS_RESOURCE): use all of it.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # A pair's client proxy holds two descriptors per idle connection (HAProxy's maxconn is
    # derived the same way), and the driver one.
    most = nofile // 2 - 500
    if settings["idle_connections"] > most:
        print(f"bench: {settings['idle_connections']} idle connections need more than the "
              f"{nofile}-descriptor limit allows; using {most}")
        settings["idle_connections_requested"] = settings["idle_connections"]
        settings["idle_connections"] = most

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or os.path.join(BENCH_DIR, "results", stamp)
    os.makedirs(out_dir, exist_ok=True)
    work_dir = f"/tmp/wbench-{os.getpid()}"
    os.makedirs(work_dir, exist_ok=True)
    topo = Topology(work_dir)
    topos = [topo]

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    runs = []
    idle = {}
    idle_conns = {}
    try:
        ctx = ct.Context(topo, args.bin_dir, args.proxy_cpu, args.load_cpu, work_dir,
                         settings["idle_connections"] + 1000)
        if args.oha and os.access(args.oha, os.X_OK):
            generator = load.Oha(args.oha, work_dir)
        else:
            generator = load.HttpLoadFallback(ctx.bin("weft-httpapp"))
            print("bench: oha not available: constant-rate runs use weft-httpapp http-load "
                  "(latency corrected from its per-request records; HTTP/1.1 only)")
            dropped = [s for s in settings["scenarios"] if SCENARIOS[s][1] != "h1" and SCENARIOS[s][0] == "fixed"]
            settings["scenarios"] = [s for s in settings["scenarios"] if s not in dropped]
            if dropped:
                print(f"bench: skipping {dropped} (they need oha)")
        print(f"bench: mode {args.mode}, reps {settings['reps']}, scenarios {settings['scenarios']}, "
              f"contenders {settings['contenders']}; load generator: {generator.name}")
        print(f"bench: proxies pinned to CPU {args.proxy_cpu}, apps and load generator to CPU {args.load_cpu}")
        active = bring_up(ctx, settings["contenders"])
        time.sleep(IDLE_SETTLE_SECONDS)
        for contender in active:
            idle[contender.name] = {role: procstat.memory_kib(p) for role, p in proxy_pids(contender).items()}

        if any(SCENARIOS[sc][1] == "grpc" for sc in settings["scenarios"]):
            for contender in active:
                contender.check_grpc(generator.grpc_body, load.GRPC_ECHO_PATH)

        for rep in range(settings["reps"]):
            # Rotated so no contender always runs first (warm caches) or last.
            order = active[rep % len(active):] + active[:rep % len(active)]
            for scenario in settings["scenarios"]:
                for contender in order:
                    t0 = time.monotonic()
                    result = run_scenario(scenario, settings, contender, generator, ctx)
                    result.update({"rep": rep, "scenario": scenario, "contender": contender.name})
                    runs.append(result)
                    lat = result.get("latency_ms", {})
                    cpu = result["cpu_us_per_req"]
                    print(f"bench: rep {rep + 1} {scenario:15} {contender.name:8} "
                          f"{result['rps']:9.0f} req/s  "
                          + (f"p50 {lat['p50']:.3f}  p99 {lat['p99']:.3f} ms  " if lat else "")
                          + f"errors {result['errors']}  "
                          + (f"pair CPU {cpu['pair']:.1f} us/req  " if "pair" in cpu else "")
                          + f"({time.monotonic() - t0:.0f}s)")
        if settings["idle_connections"] > 0:
            # On freshly started proxies: after the load runs, memory pools and allocator caches
            # hold enough freed connection state to hide what a new connection costs.
            topo.close()
            topos.append(Topology(os.path.join(work_dir, "idle-phase")))
            topo = topos[-1]
            ctx = ct.Context(topo, args.bin_dir, args.proxy_cpu, args.load_cpu, topo.work_dir,
                             settings["idle_connections"] + 1000)
            fresh = bring_up(ctx, [c for c in settings["contenders"] if c != "direct"])
            time.sleep(IDLE_SETTLE_SECONDS)
            for contender in fresh:
                result = idle_connections_run(contender, settings["idle_connections"])
                idle_conns[contender.name] = result
                per = result["bytes_per_connection"]
                print(f"bench: idle {settings['idle_connections']} conns {contender.name:8} "
                      + "  ".join(f"{role} {v['rss'] / 1024:.2f} KiB/conn "
                                  f"({result['open_descriptors_with'][role]} fds)" for role, v in per.items()))
        meta = {
            "timestamp": stamp,
            "mode": args.mode,
            "settings": settings,
            "machine": machine(),
            "versions": versions(args.bin_dir, generator),
            "pinning": {"proxy_cpu": args.proxy_cpu, "load_cpu": args.load_cpu},
            "fixed_connections": FIXED_CONNECTIONS,
            "max_connections": MAX_CONNECTIONS,
            "contenders": {c.name: c.description for c in active},
            "elapsed_seconds": time.monotonic() - started,
        }
        results = {"meta": meta, "idle_memory_kib": idle, "runs": runs, "idle_connections": idle_conns}
        write_reports(results, out_dir, latest=not args.out)
        print(f"bench: results in {out_dir} ({time.monotonic() - started:.0f}s)")
    finally:
        for index, each in enumerate(topos):
            each.close()
            logs = os.path.join(out_dir, "logs" if index == 0 else "logs-idle-phase")
            shutil.copytree(each.log_dir, logs, dirs_exist_ok=True)
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted; namespaces and processes cleaned up", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
