"""What a proxy costs, read from /proc: CPU time of the process and its children (e.g.
nginx's master and worker) and memory (VmRSS, VmHWM and PSS)."""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid):
    """`pid` and every descendant alive now."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids):
    """utime+stime of `pids` (all threads, including ones that exited), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # Fields 14 and 15 of stat(5); `fields` starts at field 3.
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def cpu_snapshot(pids):
    """CPU used so far by `pids`: per-thread nanoseconds from /proc/<pid>/task/*/schedstat
    (precise) and utime+stime ticks from /proc/<pid>/stat (coarse, but they keep threads that
    have exited)."""
    threads = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                    threads[int(tid)] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return {"threads_ns": threads, "stat_seconds": cpu_seconds(pids)}


def cpu_delta_seconds(before, after):
    """CPU time between two snapshots: from schedstat when the same threads lived through the
    whole interval, else from stat (a thread that started or ended would be miscounted)."""
    if before["threads_ns"] and set(before["threads_ns"]) == set(after["threads_ns"]):
        return sum(after["threads_ns"][t] - before["threads_ns"][t] for t in before["threads_ns"]) / 1e9
    return after["stat_seconds"] - before["stat_seconds"]


def _status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kib(pids):
    """Summed over `pids`: {"rss": VmRSS, "hwm": VmHWM (peak RSS), "pss": Pss}, in KiB."""
    return {
        "rss": sum(_status_kib(p, "VmRSS") for p in pids),
        "hwm": sum(_status_kib(p, "VmHWM") for p in pids),
        "pss": sum(_pss_kib(p) for p in pids),
    }


def load_average():
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def open_descriptors(pids):
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total
