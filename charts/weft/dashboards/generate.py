#!/usr/bin/env python3
"""Generates the Grafana dashboards in this directory: edit here, then run it and commit
both. Every panel's PromQL is run against a real Prometheus by
tests/tests/telemetry_prometheus.rs."""
import json, os

OUT = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
NS = 'namespace=~"$namespace"'
WL = 'workload=~"$workload"'
RT = 'route=~"$route"'
OK = 'status_code!~"5..", grpc_status=~"|0"'

def sel(*parts):
    return "{" + ", ".join(p for p in parts if p) + "}"

def sum_by(by, inner):
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"

def rate(metric, *filters):
    return f"rate({metric}{sel(*filters)}[{RI}])"

def req_rate(by, *f):
    return sum_by(by, rate("weft_http_requests_total", *f))

def success(by, *f):
    return (sum_by(by, rate("weft_http_responses_total", *f, OK)) + " / " +
            sum_by(by, rate("weft_http_responses_total", *f)))

def quantile(q, by, *f, metric="weft_http_response_latency_seconds_bucket"):
    group = "le" + (", " + by if by else "")
    return f"histogram_quantile({q}, sum by ({group}) ({rate(metric, *f)}))"

def target(expr, legend="", ref="A"):
    t = {"datasource": DS, "expr": expr, "refId": ref}
    if legend:
        t["legendFormat"] = legend
    return t

def latency_targets(by, *f, legend_suffix=""):
    out = []
    for ref, (q, name) in zip("ABC", [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")]):
        out.append(target(quantile(q, by, *f), f"{name}{legend_suffix}", ref))
    return out

class Board:
    def __init__(self, uid, title, description, variables):
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables
        self.panels = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        if self.x:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        self.panels.append({"id": self.next_id, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1

    def panel(self, kind, title, description, targets, unit, w=12, h=8, extra=None):
        if isinstance(targets, str):
            targets = [target(targets)]
        p = {
            "id": self.next_id,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": targets,
        }
        if kind == "timeseries":
            p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                       "calcs": ["mean", "lastNotNull"]},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
        elif kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        if unit == "percentunit":
            p["fieldConfig"]["defaults"].update({"min": 0, "max": 1})
        if extra:
            p.update(extra)
        self.next_id += 1
        self.panels.append(p)

    def ts(self, title, description, targets, unit, **kw):
        self.panel("timeseries", title, description, targets, unit, **kw)

    def stat(self, title, description, targets, unit, **kw):
        self.panel("stat", title, description, targets, unit, w=kw.pop("w", 4), h=kw.pop("h", 4), **kw)

    def write(self, file_name):
        board = {
            "annotations": {"list": []},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [{"asDropdown": True, "includeVars": True, "keepTime": True, "tags": ["weft"],
                       "title": "weft dashboards", "type": "dashboards"}],
            "panels": self.panels,
            "refresh": "30s",
            "schemaVersion": 39,
            "tags": ["weft", "service-mesh"],
            "templating": {"list": self.variables},
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
        }
        with open(os.path.join(OUT, file_name), "w") as f:
            json.dump(board, f, indent=2)
            f.write("\n")

DATASOURCE_VAR = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                  "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [],
                  "refresh": 1, "regex": "", "skipUrlSync": False}

def query_var(name, label, query):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "current": {}, "hide": 0, "includeAll": True, "allValue": ".*", "multi": True,
            "options": [], "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 1}

NS_VAR = query_var("namespace", "Namespace", "label_values(weft_control_plane_connected, namespace)")
WL_VAR = query_var("workload", "Workload",
                   'label_values(weft_control_plane_connected{namespace=~"$namespace"}, workload)')
RT_VAR = query_var("route", "Route",
                   'label_values(weft_http_requests_total{namespace=~"$namespace", workload=~"$workload"}, route)')

IN = 'direction="inbound"'
OUT_ = 'direction="outbound"'

# ---------------------------------------------------------------- mesh overview
b = Board("weft-mesh-overview", "weft / Mesh overview",
          "Golden signals of every meshed workload, measured by the server-side (inbound) proxies.",
          [DATASOURCE_VAR, NS_VAR])
b.row("Golden signals (inbound, as the servers' proxies see them)")
b.stat("Request rate", "HTTP and gRPC requests per second received over the mesh.",
       req_rate("", IN, NS), "reqps")
b.stat("Success rate", "Share of responses that are not 5xx and, for gRPC, have status OK.",
       success("", IN, NS), "percentunit")
b.stat("p99 latency", "99th percentile from request to response headers.",
       quantile(0.99, "", IN, NS), "s")
b.stat("Meshed proxies", "Proxies reporting metrics.", f"count(weft_control_plane_connected{sel(NS)})", "short")
b.stat("mTLS connections", "Share of new TCP connections (both directions) carried over mesh mTLS.",
       sum_by("", rate("weft_tcp_connections_opened_total", NS, 'tls="true"')) + " / " +
       sum_by("", rate("weft_tcp_connections_opened_total", NS)), "percentunit")
b.stat("Authorization denials", "Inbound requests and connections denied per second.",
       sum_by("", rate("weft_inbound_authz_total", NS, 'decision="deny"')), "reqps")
b.row("By namespace")
b.ts("Request rate by namespace", "Inbound requests per second.",
     [target(req_rate("namespace", IN, NS), "{{namespace}}")], "reqps")
b.ts("Success rate by namespace", "Inbound non-5xx, gRPC-OK share.",
     [target(success("namespace", IN, NS), "{{namespace}}")], "percentunit")
b.ts("p99 latency by namespace", "Inbound request → response headers.",
     [target(quantile(0.99, "namespace", IN, NS), "{{namespace}}")], "s")
b.ts("Top workloads by request rate", "The ten busiest servers.",
     [target("topk(10, " + req_rate("namespace, workload", IN, NS) + ")", "{{namespace}}/{{workload}}")], "reqps")
b.ts("Outbound request rate by destination service", "Requests the clients' proxies sent, by the Service addressed.",
     [target(req_rate("dst_service", OUT_, NS), "{{dst_service}}")], "reqps")
b.ts("Open TCP connections", "By direction and TLS state (tls=true is mesh mTLS).",
     [target(f"sum by (direction, tls) (weft_tcp_open_connections{sel(NS)})", "{{direction}} tls={{tls}}")], "short")
b.write("weft-mesh-overview.json")

# ---------------------------------------------------------------- namespace
b = Board("weft-namespace", "weft / Namespace",
          "Golden signals per workload of a namespace, inbound and outbound, with TCP and authorization.",
          [DATASOURCE_VAR, NS_VAR])
b.row("Inbound, by workload")
b.ts("Request rate", "Requests per second each workload received over the mesh.",
     [target(req_rate("workload", IN, NS), "{{workload}}")], "reqps")
b.ts("Success rate", "Non-5xx, gRPC-OK share of each workload's responses.",
     [target(success("workload", IN, NS), "{{workload}}")], "percentunit")
b.ts("Latency", "Request → response headers, per workload.",
     latency_targets("workload", IN, NS, legend_suffix=" {{workload}}"), "s")
b.ts("Responses by status code", "Per workload and HTTP status.",
     [target(sum_by("workload, status_code", rate("weft_http_responses_total", IN, NS)),
             "{{workload}} {{status_code}}")], "reqps")
b.row("Outbound, by workload and destination")
b.ts("Request rate", "Requests per second each workload sent, by the Service addressed.",
     [target(req_rate("workload, dst_service", OUT_, NS), "{{workload}} → {{dst_service}}")], "reqps")
b.ts("Success rate", "As the client's proxy saw it (includes connection failures answered 502/503).",
     [target(success("workload, dst_service", OUT_, NS), "{{workload}} → {{dst_service}}")], "percentunit")
b.ts("p99 latency", "Client-side request → response headers.",
     [target(quantile(0.99, "workload, dst_service", OUT_, NS), "{{workload}} → {{dst_service}}")], "s")
b.ts("Retries and timeouts", "Retries sent within the budget, and requests a route timeout answered with 504.",
     [target(sum_by("workload, dst_service", rate("weft_http_retries_total", NS)), "retries {{workload}} → {{dst_service}}", "A"),
      target(sum_by("workload, dst_service", rate("weft_http_timeouts_total", NS)), "timeouts {{workload}} → {{dst_service}}", "B")],
     "reqps")
b.row("TCP (all traffic, including opaque)")
b.ts("Open connections", "By workload and direction.",
     [target(f"sum by (workload, direction) (weft_tcp_open_connections{sel(NS)})", "{{workload}} {{direction}}")], "short")
b.ts("Throughput", "Bytes per second read from and written to the accepted side.",
     [target(sum_by("workload, direction", rate("weft_tcp_read_bytes_total", NS)), "read {{workload}} {{direction}}", "A"),
      target(sum_by("workload, direction", rate("weft_tcp_write_bytes_total", NS)), "write {{workload}} {{direction}}", "B")],
     "Bps")
b.ts("Connections opened", "New connections per second by TLS state.",
     [target(sum_by("workload, direction, tls", rate("weft_tcp_connections_opened_total", NS)),
             "{{workload}} {{direction}} tls={{tls}}")], "cps")
b.ts("Authorization denials", "Denied inbound requests and connections per workload and policy.",
     [target(sum_by("workload, policy", rate("weft_inbound_authz_total", NS, 'decision="deny"')),
             "{{workload}} {{policy}}")], "reqps")
b.write("weft-namespace.json")

# ---------------------------------------------------------------- workload
NSW = (NS, WL)
b = Board("weft-workload", "weft / Workload",
          "One workload's traffic: what it serves (inbound) and what it calls (outbound).",
          [DATASOURCE_VAR, NS_VAR, WL_VAR])
b.row("Inbound")
b.ts("Request rate by route", "Requests received over the mesh (inbound routes are named `default` for now).",
     [target(req_rate("route", IN, *NSW), "{{route}}")], "reqps")
b.ts("Success rate", "Non-5xx, gRPC-OK share.", [target(success("", IN, *NSW), "success")], "percentunit")
b.ts("Latency", "Request → response headers.", latency_targets("", IN, *NSW), "s")
b.ts("Responses by status", "HTTP status and gRPC status.",
     [target(sum_by("status_code, grpc_status", rate("weft_http_responses_total", IN, *NSW)),
             "{{status_code}} {{grpc_status}}")], "reqps")
b.ts("Request rate by source", "Inbound HTTP requests per calling workload (client SPIFFE id; empty: plaintext).",
     [target(req_rate("client_id", IN, *NSW), "{{client_id}}")], "reqps")
b.ts("Success rate by source", "Non-5xx, gRPC-OK share per calling workload.",
     [target(success("client_id", IN, *NSW), "{{client_id}}")], "percentunit")
b.ts("Authorized accesses by client identity", "Allowed inbound requests and connections per client SPIFFE id (empty: plaintext).",
     [target(sum_by("client_id", rate("weft_inbound_authz_total", *NSW, 'decision="allow"')), "{{client_id}}")], "reqps")
b.ts("Inbound TCP connections by peer", "Open connections per client identity.",
     [target(f"sum by (peer_identity, tls) (weft_tcp_open_connections{sel(IN, *NSW)})", "{{peer_identity}} tls={{tls}}")],
     "short")
b.ts("Inbound TCP throughput", "Bytes per second from and to clients.",
     [target(sum_by("peer_identity", rate("weft_tcp_read_bytes_total", IN, *NSW)), "read {{peer_identity}}", "A"),
      target(sum_by("peer_identity", rate("weft_tcp_write_bytes_total", IN, *NSW)), "write {{peer_identity}}", "B")],
     "Bps")
b.ts("Authorization decisions", "Allowed, denied and audit-denied inbound accesses.",
     [target(sum_by("decision", rate("weft_inbound_authz_total", *NSW)), "{{decision}}")], "reqps")
b.row("Outbound")
b.ts("Request rate by destination", "Requests sent, by Service addressed and backend chosen by the split.",
     [target(req_rate("dst_service, dst_backend", OUT_, *NSW), "{{dst_service}} → {{dst_backend}}")], "reqps")
b.ts("Success rate by destination", "As this workload's proxy saw it.",
     [target(success("dst_service", OUT_, *NSW), "{{dst_service}}")], "percentunit")
b.ts("Latency by destination", "Request → response headers, client side.",
     latency_targets("dst_service", OUT_, *NSW, legend_suffix=" {{dst_service}}"), "s")
b.ts("Responses by status", "Per destination and status.",
     [target(sum_by("dst_service, status_code", rate("weft_http_responses_total", OUT_, *NSW)),
             "{{dst_service}} {{status_code}}")], "reqps")
b.ts("Retries and timeouts", "Per route and destination.",
     [target(sum_by("route, dst_service", rate("weft_http_retries_total", *NSW)), "retries {{route}} {{dst_service}}", "A"),
      target(sum_by("route, dst_service", rate("weft_http_timeouts_total", *NSW)), "timeouts {{route}} {{dst_service}}", "B")],
     "reqps")
b.ts("Outbound TCP connections by peer", "Open connections per server identity (empty: plaintext).",
     [target(f"sum by (peer_identity, tls) (weft_tcp_open_connections{sel(OUT_, *NSW)})", "{{peer_identity}} tls={{tls}}")],
     "short")
b.ts("Outbound TCP throughput", "Bytes per second from and to the app.",
     [target(sum_by("peer_identity", rate("weft_tcp_read_bytes_total", OUT_, *NSW)), "read {{peer_identity}}", "A"),
      target(sum_by("peer_identity", rate("weft_tcp_write_bytes_total", OUT_, *NSW)), "write {{peer_identity}}", "B")],
     "Bps")
b.write("weft-workload.json")

# ---------------------------------------------------------------- route
NSWR = (NS, WL, RT)
b = Board("weft-route", "weft / Route",
          "Golden signals of HTTPRoutes (route `default`: requests no route matched). Outbound series are the "
          "client's proxy; inbound routes are not named yet.",
          [DATASOURCE_VAR, NS_VAR, WL_VAR, RT_VAR])
b.ts("Request rate", "Per direction and Service addressed.",
     [target(req_rate("direction, route, dst_service", *NSWR), "{{direction}} {{route}} → {{dst_service}}")], "reqps")
b.ts("Success rate", "Non-5xx, gRPC-OK share of responses.",
     [target(success("direction, route", *NSWR), "{{direction}} {{route}}")], "percentunit")
b.ts("Latency", "Request → response headers.",
     latency_targets("direction, route", *NSWR, legend_suffix=" {{direction}} {{route}}"), "s")
b.ts("Responses by status", "HTTP status and gRPC status.",
     [target(sum_by("direction, route, status_code, grpc_status", rate("weft_http_responses_total", *NSWR)),
             "{{direction}} {{route}} {{status_code}} {{grpc_status}}")], "reqps")
b.ts("Traffic split", "Outbound requests per backend Service chosen by the split.",
     [target(req_rate("route, dst_backend", OUT_, *NSWR), "{{route}} → {{dst_backend}}")], "reqps")
b.ts("Success rate by backend", "Outbound, per backend.",
     [target(success("route, dst_backend", OUT_, *NSWR), "{{route}} → {{dst_backend}}")], "percentunit")
b.ts("Retries and timeouts", "Retries sent (each within the budget) and requests answered 504 by a route timeout.",
     [target(sum_by("route", rate("weft_http_retries_total", *NSWR)), "retries {{route}}", "A"),
      target(sum_by("route", rate("weft_http_timeouts_total", *NSWR)), "timeouts {{route}}", "B")], "reqps")
b.ts("Retry ratio", "Retries per outbound request.",
     [target(sum_by("route", rate("weft_http_retries_total", *NSWR)) + " / " +
             req_rate("route", OUT_, *NSWR), "{{route}}")], "percentunit")
b.write("weft-route.json")

# ---------------------------------------------------------------- authorization
b = Board("weft-authorization", "weft / Authorization",
          "Inbound authorization decisions: per connection for opaque TCP, per request for HTTP.",
          [DATASOURCE_VAR, NS_VAR, WL_VAR])
DENY = 'decision="deny"'
b.stat("Denials", "Denied accesses per second.", sum_by("", rate("weft_inbound_authz_total", *NSW, DENY)), "reqps", w=6)
b.stat("Denied share", "Denied / all decisions (audit denials are counted besides their allow).",
       sum_by("", rate("weft_inbound_authz_total", *NSW, DENY)) + " / " +
       sum_by("", rate("weft_inbound_authz_total", *NSW, 'decision=~"allow|deny"')), "percentunit", w=6)
b.stat("Rejected policy updates", "Policies a proxy refused because they did not compile (it keeps the last good one).",
       f"sum(weft_inbound_policy_rejected_total{sel(*NSW)})", "short", w=6)
b.stat("Audit denials", "Accesses an AUDIT policy would deny (allowed, counted).",
       sum_by("", rate("weft_inbound_authz_total", *NSW, 'decision="audit_deny"')), "reqps", w=6)
b.ts("Decisions", "Per decision.", [target(sum_by("decision", rate("weft_inbound_authz_total", *NSW)), "{{decision}}")], "reqps")
b.ts("Denials by policy and rule", "`default` is the default inbound policy; rule is the index in the policy.",
     [target(sum_by("namespace, workload, policy, rule", rate("weft_inbound_authz_total", *NSW, DENY)),
             "{{namespace}}/{{workload}} {{policy}} #{{rule}}")], "reqps")
b.ts("Denials by client identity", "Empty client: plaintext.",
     [target(sum_by("client_id", rate("weft_inbound_authz_total", *NSW, DENY)), "{{client_id}}")], "reqps")
b.ts("Denials by port", "The pod's port.",
     [target(sum_by("workload, port", rate("weft_inbound_authz_total", *NSW, DENY)), "{{workload}} :{{port}}")], "reqps")
b.ts("Audit denials by policy and client", "What enforcing the audited policy would deny.",
     [target(sum_by("policy, client_id", rate("weft_inbound_authz_total", *NSW, 'decision="audit_deny"')),
             "{{policy}} {{client_id}}")], "reqps")
b.write("weft-authorization.json")

# ---------------------------------------------------------------- proxy resources
b = Board("weft-proxy-resources", "weft / Proxy resources",
          "Proxy health per pod: identity, control-plane connection, connections and failures.",
          [DATASOURCE_VAR, NS_VAR, WL_VAR])
b.ts("Certificate expires in", "Time left on each proxy's workload certificate (renewed well before expiry).",
     [target(f"min by (namespace, pod) (weft_identity_cert_expiry_timestamp_seconds{sel(*NSW)}) - time()",
             "{{namespace}}/{{pod}}")], "s")
b.ts("Control-plane connection", "1 when the proxy's last call to the control plane succeeded.",
     [target(f"min by (namespace, pod) (weft_control_plane_connected{sel(*NSW)})", "{{namespace}}/{{pod}}")], "short")
b.stat("Proxies disconnected", "Proxies whose last control-plane call failed.",
       f"sum(1 - weft_control_plane_connected{sel(*NSW)})", "short", w=6)
b.stat("Soonest certificate expiry", "The earliest expiring workload certificate.",
       f"min(weft_identity_cert_expiry_timestamp_seconds{sel(*NSW)}) - time()", "s", w=6)
b.stat("Open connections", "All proxies, both directions.", f"sum(weft_tcp_open_connections{sel(*NSW)})", "short", w=6)
b.stat("Proxies", "Proxies reporting.", f"count(weft_control_plane_connected{sel(*NSW)})", "short", w=6)
b.ts("Open connections by pod", "Per direction.",
     [target(f"sum by (pod, direction) (weft_tcp_open_connections{sel(*NSW)})", "{{pod}} {{direction}}")], "short")
b.ts("Connections opened by pod", "New connections per second.",
     [target(sum_by("pod, direction", rate("weft_tcp_connections_opened_total", *NSW)), "{{pod}} {{direction}}")], "cps")
b.ts("Connection lifetime", "p50 and p99 of closed connections.",
     [target(quantile(0.5, "direction", *NSW, metric="weft_tcp_connection_duration_seconds_bucket"), "p50 {{direction}}", "A"),
      target(quantile(0.99, "direction", *NSW, metric="weft_tcp_connection_duration_seconds_bucket"), "p99 {{direction}}", "B")],
     "s")
b.ts("Resident memory", "Each proxy's resident set size.",
     [target(f"max by (namespace, pod) (weft_process_resident_memory_bytes{sel(*NSW)})", "{{namespace}}/{{pod}}")], "bytes")
b.ts("CPU", "CPU time each proxy uses, in cores.",
     [target(sum_by("namespace, pod", rate("weft_process_cpu_seconds_total", *NSW)), "{{namespace}}/{{pod}}")], "short")
b.ts("Open file descriptors", "Sockets and files each proxy holds.",
     [target(f"max by (namespace, pod) (weft_process_open_fds{sel(*NSW)})", "{{namespace}}/{{pod}}")], "short")
b.ts("Discovery failures and detection timeouts", "Per pod, per second.",
     [target(sum_by("pod", rate("weft_discovery_failures_total", *NSW)), "discovery failures {{pod}}", "A"),
      target(sum_by("pod", rate("weft_inbound_detect_timeouts_total", *NSW)), "inbound detect timeouts {{pod}}", "B"),
      target(sum_by("pod", rate("weft_outbound_detect_timeouts_total", *NSW)), "outbound detect timeouts {{pod}}", "C")],
     "ops")
b.write("weft-proxy-resources.json")
