"""Load generators, run inside the client pod on the load CPU:
- constant rate with latency correction (latency counted from when each request was due, so
  a stall is not hidden by the requests it delayed): oha `-q R --latency-correction`, or, when
  oha could not be installed, `weft-httpapp http-load --rate R --records` corrected here;
- maximum throughput: wrk (HTTP/1.1) and h2load (HTTP/2), which burn less CPU per request
  than oha, so the pinned proxies rather than the generator are the bottleneck.
Every function returns a dict with requests, errors, rps and latency_ms percentiles."""

import json
import os
import re
import subprocess

from topo import BenchError, tool

PERCENTILES = ("p50", "p90", "p99", "p99.9")
# The body of a gRPC unary call weft.e2e.v1.TestService/Echo{message: "hi"}: a 5-byte
# length-prefixed message frame (uncompressed) around the protobuf bytes.
GRPC_ECHO_PATH = "/weft.e2e.v1.TestService/Echo"
GRPC_ECHO_BODY = b"\x00\x00\x00\x00\x04" + b"\x0a\x02hi"
WRK_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf",
                          "wrk-report.lua")


def _exec(netns, cpu, argv, timeout):
    cmd = ["ip", "netns", "exec", netns]
    if cpu is not None:
        cmd += ["taskset", "-c", str(cpu)]
    cmd += [str(a) for a in argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}\n{proc.stdout[-2000:]}")
    return proc.stdout


def _last_json_line(text, what):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"{what}: no JSON report in its output:\n{text[-2000:]}")


class Oha:
    name = "oha (constant rate, --latency-correction)"

    def __init__(self, path, work_dir):
        self.path = path
        self.grpc_body = os.path.join(work_dir, "grpc-echo.bin")
        with open(self.grpc_body, "wb") as f:
            f.write(GRPC_ECHO_BODY)

    def fixed_rate(self, netns, cpu, url, proto, rate, seconds, connections, keep_alive=True):
        argv = [self.path, "--no-tui", "--output-format", "json", "-z", f"{seconds}s", "-w",
                "-q", str(rate), "--latency-correction"]
        if proto in ("h2", "grpc"):
            # A few connections with several streams each, as an HTTP/2 client would.
            argv += ["--http2", "-p", "8", "-c", str(max(1, connections // 8))]
        else:
            argv += ["-c", str(connections)]
        if proto == "grpc":
            argv += ["-m", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers",
                     "-D", self.grpc_body]
            url = url.rstrip("/") + GRPC_ECHO_PATH
        if not keep_alive:
            argv.append("--disable-keepalive")
        argv.append(url)
        text = _exec(netns, cpu, argv, seconds + 60)
        try:
            # One pretty-printed JSON document.
            report = json.loads(text[text.index("{"):])
        except ValueError as e:
            raise BenchError(f"oha: unreadable report ({e}):\n{text[-2000:]}") from e
        statuses = report.get("statusCodeDistribution", {})
        ok = sum(v for k, v in statuses.items() if k.startswith("2"))
        kinds = report.get("errorDistribution", {})
        # Requests still in flight when the duration ends (oha cannot wait for them on
        # HTTP/2) are cut off by the generator, not failed by the proxy.
        aborted = sum(v for k, v in kinds.items() if "deadline" in k)
        errors = sum(kinds.values()) - aborted + sum(
            v for k, v in statuses.items() if not k.startswith("2"))
        pcts = report.get("latencyPercentiles", {})
        total_s = report.get("summary", {}).get("total") or seconds
        return {
            "requests": ok,
            "errors": errors,
            "error_kinds": kinds,
            "aborted_at_deadline": aborted,
            "rps": ok / total_s if total_s else 0.0,
            # oha reports seconds.
            "latency_ms": {p: (pcts.get(p) or 0.0) * 1000.0 for p in PERCENTILES},
        }


class HttpLoadFallback:
    name = "weft-httpapp http-load (constant rate, latency corrected from its per-request records)"

    def __init__(self, httpapp):
        self.httpapp = httpapp

    def fixed_rate(self, netns, cpu, url, proto, rate, seconds, connections, keep_alive=True):
        if proto != "h1":
            raise BenchError("the fallback load generator speaks HTTP/1.1 only (install oha)")
        requests = int(rate * seconds)
        argv = [self.httpapp, "http-load", "--url", url, "--requests", str(requests),
                "--concurrency", str(connections), "--rate", str(rate), "--records"]
        if not keep_alive:
            argv.append("--no-keep-alive")
        report = _last_json_line(_exec(netns, cpu, argv, seconds + 120), "http-load")
        latencies = []
        errors = 0
        for i, record in enumerate(report.get("records", [])):
            if record.get("status") is None or not 200 <= record["status"] < 300:
                errors += 1
                continue
            # Request i was due at i/rate; it may have been sent late (a busy connection),
            # and that wait is latency the user saw.
            due_ms = i * 1000.0 / rate
            latencies.append(record["start_ms"] + record["latency_ms"] - due_ms)
        latencies.sort()
        elapsed_s = report.get("elapsed_ms", seconds * 1000.0) / 1000.0
        return {
            "requests": len(latencies),
            "errors": errors,
            "error_kinds": {m: 1 for m in report.get("error_messages", [])},
            "rps": len(latencies) / elapsed_s if elapsed_s else 0.0,
            "latency_ms": {p: percentile(latencies, float(p[1:]) / 100.0) for p in PERCENTILES},
        }


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-q * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def wrk_max(netns, cpu, url, seconds, connections):
    argv = [tool("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s", "-s", WRK_SCRIPT, url]
    report = _last_json_line(_exec(netns, cpu, argv, seconds + 60), "wrk")
    duration_s = report["duration_us"] / 1e6
    return {
        "requests": report["requests"] - report["errors"],
        "errors": report["errors"],
        "rps": (report["requests"] - report["errors"]) / duration_s if duration_s else 0.0,
        "latency_ms": {"p50": report["p50_us"] / 1000.0, "p90": report["p90_us"] / 1000.0,
                       "p99": report["p99_us"] / 1000.0, "p99.9": report["p999_us"] / 1000.0},
    }


_H2LOAD_DONE = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")
_H2LOAD_TIME = re.compile(r"finished in ([\d.]+)(m?s)")


def h2load_max(netns, cpu, url, seconds, connections, streams):
    # h2c with prior knowledge (no upgrade), which every client-side listener here accepts.
    argv = [tool("h2load"), "-c", str(connections), "-m", str(streams), "-D", str(seconds),
            "-t", "1", url]
    text = _exec(netns, cpu, argv, seconds + 60)
    done = _H2LOAD_DONE.search(text)
    took = _H2LOAD_TIME.search(text)
    if not done or not took:
        raise BenchError(f"h2load: unexpected output:\n{text[-2000:]}")
    succeeded, failed, errored = int(done.group(4)), int(done.group(5)), int(done.group(6))
    elapsed = float(took.group(1)) / (1000.0 if took.group(2) == "ms" else 1.0)
    return {
        "requests": succeeded,
        "errors": failed + errored,
        "rps": succeeded / elapsed if elapsed else 0.0,
        "latency_ms": {},
    }
