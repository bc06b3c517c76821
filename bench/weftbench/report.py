"""Turns the raw runs into medians with min–max over repetitions, ratios to HAProxy and to the
floor (direct), the issue-7 target verdicts, a markdown report and a gnuplot PNG."""

import os
import shutil
import subprocess

PCTS = ("p50", "p90", "p99", "p99.9")
ROLES = ("client", "server")
MIB = 1024.0


def _flatten(run, floor):
    """One run as {metric key: number}; added latency is against the floor's run of the same
    scenario and repetition."""
    out = {"rps": run["rps"], "errors": run["errors"]}
    for p, v in run.get("latency_ms", {}).items():
        out[f"lat.{p}"] = v
        if floor is not None and p in floor.get("latency_ms", {}):
            out[f"added.{p}"] = v - floor["latency_ms"][p]
    for role, v in run.get("cpu_us_per_req", {}).items():
        out[f"cpu.{role}"] = v
    for role, mem in run.get("memory_kib", {}).items():
        for k, v in mem.items():
            out[f"{k}.{role}"] = v / MIB
    return out


def stat(values):
    values = sorted(values)
    n = len(values)
    if n == 0:
        return None
    mid = n // 2
    median = values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2.0
    return {"median": median, "min": values[0], "max": values[-1], "n": n}


def summarize(results):
    runs = results["runs"]
    floors = {(r["scenario"], r["rep"]): r for r in runs if r["contender"] == "direct"}
    per = {}
    for run in runs:
        flat = _flatten(run, floors.get((run["scenario"], run["rep"])))
        bucket = per.setdefault(run["scenario"], {}).setdefault(run["contender"], {})
        for key, value in flat.items():
            bucket.setdefault(key, []).append(value)
    scenarios = {
        scenario: {c: {k: stat(v) for k, v in metrics.items()} for c, metrics in by_contender.items()}
        for scenario, by_contender in per.items()
    }
    idle = {}
    for contender, roles in results.get("idle_memory_kib", {}).items():
        idle[contender] = {f"{k}.{role}": v / MIB for role, mem in roles.items() for k, v in mem.items()}
    conns = {}
    for contender, r in results.get("idle_connections", {}).items():
        conns[contender] = {f"{k}.{role}": v / 1024.0
                            for role, per_role in r["bytes_per_connection"].items() for k, v in per_role.items()}
        for role, count in r.get("open_descriptors_with", {}).items():
            conns[contender][f"fds.{role}"] = count
    summary = {"scenarios": scenarios, "idle_memory_mib": idle, "idle_connection_kib": conns}
    summary["targets"] = targets(summary)
    return summary


def _median(summary, scenario, contender, key):
    s = summary["scenarios"].get(scenario, {}).get(contender, {}).get(key)
    return None if s is None else s["median"]


def targets(summary):
    """Issue 7's targets, each with the measured figure and whether it is met."""
    out = []

    def add(target, measured, met):
        out.append({"target": target, "measured": measured,
                    "verdict": "not measured" if met is None else ("met" if met else "missed")})

    for scenario in ("h1_1000", "h2_1000", "h1_max", "h2_max"):
        weft = _median(summary, scenario, "weft", "cpu.pair")
        ha = _median(summary, scenario, "haproxy", "cpu.pair")
        if weft is None or ha is None or ha <= 0:
            continue
        ratio = weft / ha
        add(f"CPU per request ≤ 0.7× HAProxy's ({scenario})",
            f"{weft / 2:.1f} vs {ha / 2:.1f} µs/req per proxy = {ratio:.2f}×", ratio <= 0.7)
    for scenario in ("h1_1000", "h2_1000"):
        for p in ("p50", "p99"):
            weft = _median(summary, scenario, "weft", f"added.{p}")
            ha = _median(summary, scenario, "haproxy", f"added.{p}")
            if weft is None or ha is None:
                continue
            add(f"added {p} ≤ HAProxy pair's ({scenario})",
                f"{weft:.3f} vs {ha:.3f} ms", weft <= ha)
        weft = _median(summary, scenario, "weft", "added.p50")
        if weft is not None:
            add(f"added p50 ≤ 0.15 ms ({scenario})", f"{weft:.3f} ms", weft <= 0.15)
    weft = _median(summary, "h1_max", "weft", "rps")
    ha = _median(summary, "h1_max", "haproxy", "rps")
    if weft is not None and ha:
        add("max HTTP/1.1 throughput ≥ 1.2× HAProxy's (one proxy core)",
            f"{weft:.0f} vs {ha:.0f} req/s = {weft / ha:.2f}×", weft / ha >= 1.2)
    idle = summary["idle_memory_mib"].get("weft")
    if idle:
        worst = max(idle.get(f"rss.{r}", 0) for r in ROLES)
        add("RSS ≤ 8 MiB idle", f"{worst:.1f} MiB (larger of the two proxies)", worst <= 8)
    loaded = [_median(summary, "h1_1000", "weft", f"rss.{r}") for r in ROLES]
    if all(v is not None for v in loaded):
        worst = max(loaded)
        add("RSS ≤ 12 MiB at 1,000 req/s", f"{worst:.1f} MiB after the h1_1000 run", worst <= 12)
    conns = summary["idle_connection_kib"].get("weft")
    if conns:
        worst = max(conns.get(f"rss.{r}", 0) for r in ROLES)
        add("≤ 2 KiB per idle connection", f"{worst:.2f} KiB RSS per connection", worst <= 2)
    else:
        add("≤ 2 KiB per idle connection", "not run (--full or --idle-connections N)", None)
    return out


def _fmt(value, digits):
    return f"{value:,.{digits}f}"


def _cell(block, contender, key, digits, ratios):
    """`median (min–max)`, then the ratios the row asks for: H to the HAProxy pair, D to
    direct. Added latency is not shown for direct (it is the zero it is measured from)."""
    s = block.get(contender, {}).get(key)
    if s is None or (contender == "direct" and key.startswith("added.")):
        return "—"
    text = _fmt(s["median"], digits)
    if s["n"] > 1 and _fmt(s["min"], digits) != _fmt(s["max"], digits):
        text += f" ({_fmt(s['min'], digits)}–{_fmt(s['max'], digits)})"
    shown = []
    for letter, other in (("H", "haproxy"), ("D", "direct")):
        if letter not in ratios or contender in (other, "direct"):
            continue
        base = block.get(other, {}).get(key)
        # A ratio of a difference that noise pushed to or below zero says nothing.
        if base is not None and base["median"] > 0 and s["median"] >= 0:
            shown.append(f"{s['median'] / base['median']:.2f}×{letter}")
    if shown:
        text += " · " + " ".join(shown)
    return text


# (label, metric key, decimals, ratios to show: H = to HAProxy, D = to direct)
FIXED_ROWS = [
    ("achieved req/s", "rps", 0, ""),
    ("errors", "errors", 0, ""),
    ("p50 ms", "lat.p50", 3, "HD"),
    ("p90 ms", "lat.p90", 3, "HD"),
    ("p99 ms", "lat.p99", 3, "HD"),
    ("p99.9 ms", "lat.p99.9", 3, "HD"),
    ("added p50 ms", "added.p50", 3, "H"),
    ("added p90 ms", "added.p90", 3, "H"),
    ("added p99 ms", "added.p99", 3, "H"),
    ("added p99.9 ms", "added.p99.9", 3, "H"),
    ("CPU µs/req, client proxy", "cpu.client", 1, "H"),
    ("CPU µs/req, server proxy", "cpu.server", 1, "H"),
    ("CPU µs/req, pair", "cpu.pair", 1, "H"),
    ("RSS after, client proxy MiB", "rss.client", 1, "H"),
    ("RSS after, server proxy MiB", "rss.server", 1, "H"),
    ("PSS after, client proxy MiB", "pss.client", 1, "H"),
    ("PSS after, server proxy MiB", "pss.server", 1, "H"),
]
MAX_ROWS = [
    ("req/s", "rps", 0, "HD"),
    ("errors", "errors", 0, ""),
    ("p50 ms (uncorrected)", "lat.p50", 3, "HD"),
    ("p99 ms (uncorrected)", "lat.p99", 3, "HD"),
    ("CPU µs/req, client proxy", "cpu.client", 1, "H"),
    ("CPU µs/req, server proxy", "cpu.server", 1, "H"),
    ("CPU µs/req, pair", "cpu.pair", 1, "H"),
    ("peak RSS (VmHWM), client proxy MiB", "hwm.client", 1, "H"),
    ("peak RSS (VmHWM), server proxy MiB", "hwm.server", 1, "H"),
]
TITLES = {
    "h1_1000": "HTTP/1.1 at 1,000 req/s (constant rate, latency-corrected)",
    "h1_5000": "HTTP/1.1 at 5,000 req/s (constant rate, latency-corrected)",
    "h2_1000": "HTTP/2 (h2c from the app) at 1,000 req/s",
    "h2_5000": "HTTP/2 (h2c from the app) at 5,000 req/s",
    "grpc_1000": "gRPC unary (Echo) at 1,000 req/s",
    "h1_newconn_500": "HTTP/1.1, a new connection per request, at 500 req/s (handshake to the client proxy)",
    "h1_max": "Maximum HTTP/1.1 throughput (wrk -t1 -c32; proxies pinned to one core)",
    "h2_max": "Maximum HTTP/2 throughput (h2load -c4 -m16; proxies pinned to one core)",
}


def _table(header_contenders, rows, block):
    lines = ["| | " + " | ".join(header_contenders) + " |",
             "|---|" + "---|" * len(header_contenders)]
    for label, key, digits, ratios in rows:
        if not any(key in block.get(c, {}) for c in header_contenders):
            continue
        cells = [_cell(block, c, key, digits, ratios) for c in header_contenders]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results):
    meta, summary = results["meta"], results["summary"]
    contenders = list(meta["contenders"])
    s = meta["settings"]
    m = meta["machine"]
    v = meta["versions"]
    out = [
        f"# weft benchmark — {meta['timestamp']} ({meta['mode']})",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}. "
        f"Proxies pinned to CPU {meta['pinning']['proxy_cpu']}; apps and load generators to CPU "
        f"{meta['pinning']['load_cpu']}. {s['reps']} repetition(s): cells are medians "
        "(min–max when reps > 1); **×H** = ratio to the HAProxy pair, **×D** = ratio to direct "
        f"(no proxy). Constant-rate runs: {s['fixed_seconds']} s after a {s['warmup']} s warm-up, "
        f"{meta['fixed_connections']} keep-alive connections; load generator: {v['load_generator']}. "
        "CPU is the time each proxy (all its processes and threads, from /proc schedstat) "
        "ran during the measured interval divided by the requests served; memory is "
        "VmRSS/PSS summed over the proxy's processes.",
        "",
        f"Versions: weft {v['weft']}; {v['haproxy']}; {v['nginx']}; {v['wrk']}.",
        "",
        _load_note(results),
        "",
        "Contenders:",
    ]
    out += [f"- **{c}**: {d}" for c, d in meta["contenders"].items()]
    out += ["", "## Targets (issue 7)", "", "| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in summary["targets"]]
    for scenario in s["scenarios"]:
        block = summary["scenarios"].get(scenario)
        if not block:
            continue
        rows = MAX_ROWS if scenario.endswith("_max") else FIXED_ROWS
        out += ["", f"## {TITLES.get(scenario, scenario)}", "", _table(contenders, rows, block)]
    out += _authz_section(summary)
    idle = summary["idle_memory_mib"]
    proxied = [c for c in contenders if c != "direct"]
    if idle:
        block = {c: {k: {"median": val, "min": val, "max": val, "n": 1} for k, val in idle.get(c, {}).items()}
                 for c in proxied}
        rows = [(f"{kind} idle, {role} proxy MiB", f"{key}.{role}", 1, "H")
                for kind, key in (("RSS", "rss"), ("PSS", "pss")) for role in ROLES]
        out += ["", "## Memory before any load (after start-up and one sanity request)", "",
                _table(proxied, rows, block)]
    conns = summary["idle_connection_kib"]
    if conns:
        block = {c: {k: {"median": val, "min": val, "max": val, "n": 1} for k, val in conns.get(c, {}).items()}
                 for c in proxied}
        rows = [(f"{kind} KiB per connection, {role} proxy", f"{key}.{role}", 2, "H")
                for kind, key in (("RSS", "rss"), ("PSS", "pss")) for role in ROLES]
        rows += [(f"open descriptors meanwhile, {role} proxy", f"fds.{role}", 0, "") for role in ROLES]
        count = next(iter(results["idle_connections"].values()))["connections"]
        note = ""
        if s.get("idle_connections_requested"):
            note = (f" ({s['idle_connections_requested']:,} asked; capped by the descriptor limit, "
                    "which cannot be raised here)")
        out += ["", f"## {count:,} idle keep-alive connections from the app (memory per connection){note}",
                "", "On freshly started proxies (a second topology, after the load runs): each "
                "connection sent one request and got its answer, then stays open; RSS/PSS growth "
                "of each proxy divided by the connection count.", "",
                _table(proxied, rows, block)]
    return "\n".join(out) + "\n"


def _authz_section(summary):
    """Issue 4: what per-request authorization costs, weft-authz next to weft in the same
    runs (no verdict: on this machine's noise a difference is judged by the min–max spread)."""
    lines = []
    for scenario, block in summary["scenarios"].items():
        if "weft" not in block or "weft-authz" not in block or scenario.endswith("_max"):
            continue
        if not lines:
            lines = ["", "## Authorization cost (issue 4): weft vs weft-authz", "",
                     "weft-authz is the same pair with an ALLOW AuthorizationPolicy on the server "
                     "pod (client identity + GET + a `regex:` path checked on every request); "
                     "weft has none (the permissive default). Median (min–max) over repetitions.", "",
                     "| scenario | figure | weft | weft-authz | weft-authz − weft (medians) |",
                     "|---|---|---|---|---|"]
        for label, key, digits in (("p50 ms", "lat.p50", 3), ("p99 ms", "lat.p99", 3),
                                   ("p99.9 ms", "lat.p99.9", 3), ("CPU µs/req, server proxy", "cpu.server", 1),
                                   ("CPU µs/req, pair", "cpu.pair", 1)):
            a, b = block["weft"].get(key), block["weft-authz"].get(key)
            if a is None or b is None:
                continue
            lines.append(f"| {scenario} | {label} | {_cell(block, 'weft', key, digits, '')} | "
                         f"{_cell(block, 'weft-authz', key, digits, '')} | "
                         f"{b['median'] - a['median']:+.{digits}f} |")
    return lines


def _load_note(results):
    """The machine's 1-minute load average as each run started: the proxies, the app and the
    load generator account for about 2 of it; more means something else shared the cores."""
    loads = [r["loadavg_before"][0] for r in results["runs"] if r.get("loadavg_before")]
    if not loads:
        return ""
    return (f"1-minute load average at the start of the runs: {min(loads):.2f}–{max(loads):.2f} "
            "(the benchmark itself accounts for up to about 2 on this machine; more means other "
            "work shared the cores).")


def plot(results, out_dir):
    """latency.png: latency percentiles per contender at 1,000 req/s (log scale); None when
    gnuplot is missing or there is no such run."""
    gnuplot = shutil.which("gnuplot")
    scenarios = [s for s in ("h1_1000", "h2_1000") if s in results["summary"]["scenarios"]]
    if gnuplot is None or not scenarios:
        return None
    contenders = list(results["meta"]["contenders"])
    columns = [(s, c) for s in scenarios for c in contenders]
    data_path = os.path.join(out_dir, "latency.dat")
    with open(data_path, "w", encoding="ascii") as f:
        f.write("pct " + " ".join(f"{s}:{c}" for s, c in columns) + "\n")
        for p in PCTS:
            values = []
            for s, c in columns:
                st = results["summary"]["scenarios"][s].get(c, {}).get(f"lat.{p}")
                values.append(f"{st['median']:.4f}" if st else "NaN")
            f.write(f"{p} " + " ".join(values) + "\n")
    png = os.path.join(out_dir, "latency.png")
    # One colour per contender; HTTP/1.1 solid, HTTP/2 dashed.
    colours = {"direct": "#555555", "weft": "#d62728", "weft-authz": "#ff7f0e", "haproxy": "#1f77b4", "nginx": "#2ca02c"}
    plots = ", ".join(
        f"'{data_path}' using {i + 2}:xtic(1) with linespoints lw 2 pt {7 if s == 'h1_1000' else 5} "
        f"dt {1 if s == 'h1_1000' else 2} lc rgb '{colours.get(c, '#000000')}' "
        f"title '{c} ({'HTTP/1.1' if s == 'h1_1000' else 'HTTP/2'})'"
        for i, (s, c) in enumerate(columns))
    script = (
        "set terminal pngcairo size 900,540 noenhanced\n"
        f"set output '{png}'\n"
        "set title 'Latency percentiles at 1,000 req/s (median over repetitions)'\n"
        "set ylabel 'ms (log scale)'\nset logscale y\nset grid ytics\nset key left top\n"
        f"plot {plots}\n"
    )
    proc = subprocess.run([gnuplot], input=script, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(png):
        print(f"bench: gnuplot failed: {proc.stderr.strip()}")
        return None
    return png
