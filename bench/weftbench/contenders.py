"""The contenders, each a client pod and a server pod running the same apps
(`weft-httpapp http-server` on :8080, `grpc-server` on :50051): `direct` (no proxy, the
floor), `weft` (real control plane issuing certs, `weft-proxy init` iptables in both pods,
proxies as uid 2170), and the HAProxy and nginx mTLS pairs (client-side proxy on loopback,
TLS 1.3 with client certificates between the pods, server-side proxy in front of the app).
Every proxy is pinned to the proxy CPU; apps and load generators to the load CPU."""

import hashlib
import json
import os
import re
import resource
import secrets

import certs
import net
from topo import NODE_IP, BenchError, run, tool, wait_until

APP_PORT = 8080
GRPC_APP_PORT = 50051
# Client-side proxy listeners of the HAProxy and nginx pairs (on the client pod's loopback).
PAIR_H1_PORT = 10080
PAIR_H2_PORT = 10081
PAIR_GRPC_PORT = 10082
# Server-side proxy listeners (mTLS) of the pairs.
PAIR_MTLS_PORT = 8443
PAIR_MTLS_GRPC_PORT = 8444

WEFT_PROXY_UID = 2170
WEFT_CONTROL_PORT = 7150
WEFT_ADMIN_PORT = 7191
WEFT_NAMESPACE = "bench"
WEFT_CONTROL_IDENTITY = "spiffe://cluster.local/ns/weft/sa/weft-control"
# The Service the weft client dials: routed nowhere, only the client's proxy resolves it.
# Still inside 198.18.0.0/15.
WEFT_SERVICE_IP = "198.19.0.21"
WEFT_SERVICE_HTTP_PORT = 80
WEFT_SERVICE_GRPC_PORT = 9090

READY_TIMEOUT = 60
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


class Context:
    """What every contender needs: the topology, binaries, CPUs and the shared PKI."""

    def __init__(self, topo, bin_dir, proxy_cpu, load_cpu, work_dir, connections):
        self.topo = topo
        # Client connections a proxy must hold at once (the idle-connection run's count plus
        # room for the load generators).
        self.connections = connections
        self.bin_dir = bin_dir
        self.proxy_cpu = proxy_cpu
        self.load_cpu = load_cpu
        self.work_dir = work_dir
        self._pki = None
        # {role: argv prefix} run in front of a weft proxy (bench/weftbench/profile.py runs
        # one under valgrind); empty for the benchmark.
        self.wrap = {}

    def bin(self, name):
        path = os.path.join(self.bin_dir, name)
        if not os.access(path, os.X_OK):
            raise BenchError(f"{path} is missing: build with cargo build --release --workspace --bins")
        return path

    def pki(self):
        if self._pki is None:
            self._pki = certs.make_pki(os.path.join(self.work_dir, "pki"))
        return self._pki


def nofile_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def render(template_name, out_path, values):
    with open(os.path.join(CONF_DIR, template_name), encoding="utf-8") as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    if "{{" in text:
        raise BenchError(f"{template_name}: unfilled placeholder near {text[text.index('{{'):][:40]!r}")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(text)
    return out_path


class Contender:
    name = ""
    description = ""

    def __init__(self, ctx, octet):
        self.ctx = ctx
        self.client_ns, self.client_ip = ctx.topo.add_pod(f"{self.name}-c", octet)
        self.server_ns, self.server_ip = ctx.topo.add_pod(f"{self.name}-s", octet + 1)
        self.apps = []
        self.proxy_procs = {}

    def start_apps(self):
        httpapp = self.ctx.bin("weft-httpapp")
        for label, args, port in (
            ("http-server", ["http-server", "--listen", f"0.0.0.0:{APP_PORT}", "--name", self.name], APP_PORT),
            ("grpc-server", ["grpc-server", "--listen", f"0.0.0.0:{GRPC_APP_PORT}", "--name", self.name], GRPC_APP_PORT),
        ):
            proc = self.ctx.topo.spawn(self.server_ns, f"{self.name}-{label}", [httpapp] + args,
                                       cpu=self.ctx.load_cpu)
            self.apps.append(proc)
            wait_until(f"{self.name} {label} to listen", 15,
                       lambda port=port: net.can_connect(self.server_ns, "127.0.0.1", port),
                       failed=lambda proc=proc: None if proc.alive() else proc.log_tail())

    def start(self):
        self.start_apps()
        self.start_proxies()
        self.check()

    def start_proxies(self):
        pass

    def target(self, proto):
        """(host, port) the load generator in the client pod dials for 'h1', 'h2' or 'grpc'."""
        raise NotImplementedError

    def url(self, proto, path="/"):
        host, port = self.target(proto)
        return f"http://{host}:{port}{path}"

    def proxies(self):
        """{"client": Proc, "server": Proc}; empty for the floor."""
        return self.proxy_procs

    def check(self):
        """One request through the whole path, answered by this contender's app."""
        host, port = self.target("h1")
        status, headers, _ = net.http_get(self.client_ns, host, port)
        if status != 200 or headers.get("x-served-by") != self.name:
            raise BenchError(f"{self.name}: sanity GET {host}:{port} answered {status} "
                             f"x-served-by={headers.get('x-served-by')!r}")
        for role, proc in self.proxy_procs.items():
            if not proc.alive():
                raise BenchError(f"{self.name} {role} proxy exited:\n{proc.log_tail()}")


    def check_grpc(self, body_path, path):
        """One unary call through the whole path must end with grpc-status 0 (oha only sees the
        HTTP status, and a gRPC failure travels in the trailers of a 200)."""
        host, port = self.target("grpc")
        out = run(["ip", "netns", "exec", self.client_ns, tool("nghttp"), "-v", "-d", body_path,
                   "-H", "content-type: application/grpc", "-H", "te: trailers",
                   f"http://{host}:{port}{path}"], check=False)
        if not re.search(r"recv \(stream_id=\d+\) grpc-status: 0$", out.stdout, re.MULTILINE):
            raise BenchError(f"{self.name}: gRPC sanity call via {host}:{port} did not end with "
                             f"grpc-status 0:\n{out.stdout[-1500:]}{out.stderr[-500:]}")


class Direct(Contender):
    name = "direct"
    description = "no proxy: the load generator talks to the app (the floor)"

    def target(self, proto):
        return self.server_ip, GRPC_APP_PORT if proto == "grpc" else APP_PORT


class Weft(Contender):
    name = "weft"
    description = ("weft-proxy pair: transparent (iptables), mTLS with certs from weft-control, "
                   "one runtime thread (WEFT_WORKER_THREADS=1), WEFT_LOG=warn")
    # Every weft variant has its own control plane in the node namespace, so each needs its
    # own port there.
    control_port = WEFT_CONTROL_PORT

    def extra_manifests(self):
        """{file name: YAML} added to the control plane's manifests next to the pods and the
        Service; none for plain weft."""
        return {}

    def start_proxies(self):
        ctx = self.ctx
        base = os.path.join(ctx.work_dir, self.name)
        identity = os.path.join(base, "identity")
        manifests = os.path.join(base, "manifests")
        os.makedirs(manifests, exist_ok=True)
        os.chmod(base, 0o755)
        out = ctx.topo.spawn(ctx.topo.node, f"{self.name}-identity", [ctx.bin("weft"), "identity", "--out", identity])
        if out.popen.wait(timeout=60) != 0:
            raise BenchError(f"weft identity failed:\n{out.log_tail()}")
        os.chmod(identity, 0o755)
        write_yaml(manifests, "namespace-bench.yaml",
                   f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {WEFT_NAMESPACE}\n")
        tokens = {}
        for role, ip in (("client", self.client_ip), ("server", self.server_ip)):
            token = secrets.token_hex(32)
            token_file = os.path.join(base, f"token-{role}")
            with open(token_file, "w", encoding="ascii") as f:
                f.write(token)
            os.chmod(token_file, 0o644)
            tokens[role] = token_file
            write_yaml(manifests, f"pod-{role}.yaml", pod_yaml(f"weft-{role}", ip, role, token))
        write_yaml(manifests, "service-app.yaml", service_yaml())
        for file_name, text in self.extra_manifests().items():
            write_yaml(manifests, file_name, text)
        control = ctx.topo.spawn(
            ctx.topo.node, f"{self.name}-control",
            [ctx.bin("weft-control"), "--source", f"dir:{manifests}", "--identity", identity,
             "--listen", f"{NODE_IP}:{self.control_port}"],
            env={"WEFT_LOG": "warn"})
        self.apps.append(control)
        wait_until(f"{self.name} control plane to listen", READY_TIMEOUT,
                   lambda: net.can_connect(ctx.topo.node, NODE_IP, self.control_port),
                   failed=lambda: None if control.alive() else control.log_tail())
        for role, netns in (("client", self.client_ns), ("server", self.server_ns)):
            init = ctx.topo.spawn(netns, f"{self.name}-init-{role}", [ctx.bin("weft-proxy"), "init"])
            if init.popen.wait(timeout=60) != 0:
                raise BenchError(f"weft-proxy init ({role}) failed:\n{init.log_tail()}")
            env = {
                "WEFT_CONTROL_ADDR": f"{NODE_IP}:{self.control_port}",
                "WEFT_CONTROL_IDENTITY": WEFT_CONTROL_IDENTITY,
                "WEFT_TRUST_ANCHORS": os.path.join(identity, "trust-anchors.pem"),
                "WEFT_IDENTITY_TOKEN_FILE": tokens[role],
                "WEFT_NAMESPACE": WEFT_NAMESPACE,
                "WEFT_SERVICE_ACCOUNT": role,
                "WEFT_POD_NAME": f"weft-{role}",
                # The pairs log nothing per request either.
                "WEFT_LOG": "warn",
                "WEFT_WORKER_THREADS": "1",
            }
            self.proxy_procs[role] = ctx.topo.spawn(
                netns, f"{self.name}-proxy-{role}", ctx.wrap.get(role, []) + [ctx.bin("weft-proxy")],
                env=env, cpu=ctx.proxy_cpu, uid=WEFT_PROXY_UID)
        for role, ip in (("client", self.client_ip), ("server", self.server_ip)):
            proc = self.proxy_procs[role]
            wait_until(f"{self.name} {role} proxy to be ready", READY_TIMEOUT * (5 if ctx.wrap else 1),
                       lambda ip=ip: net.http_get(ctx.topo.node, ip, WEFT_ADMIN_PORT, "/ready")[0] == 200,
                       interval=0.25,
                       failed=lambda proc=proc: None if proc.alive() else proc.log_tail())

    def target(self, proto):
        if proto == "grpc":
            return WEFT_SERVICE_IP, WEFT_SERVICE_GRPC_PORT
        return WEFT_SERVICE_IP, WEFT_SERVICE_HTTP_PORT

    def check(self):
        super().check()
        # The request must have reached the server's proxy over mesh mTLS (counted there as
        # an inbound HTTP request with tls="true"), not around it.
        _, _, body = net.http_get(self.ctx.topo.node, self.server_ip, WEFT_ADMIN_PORT, "/metrics")
        if not MESH_INBOUND_REQUEST.search(body.decode("utf-8", "replace")):
            raise BenchError(f"{self.name}: the server proxy counted no inbound mTLS HTTP request "
                             "(no weft_http_requests_total{direction=\"inbound\",..,tls=\"true\"} > 0)")


MESH_INBOUND_REQUEST = re.compile(
    r'^weft_http_requests_total\{direction="inbound"[^}]*tls="true"[^}]*\} [1-9]', re.MULTILINE)

AUTHZ_POLICY_NAME = "bench-server-allow-get"
# Time for the server proxy to receive the policy over its Inbound watch after /ready.
AUTHZ_POLICY_TIMEOUT = 30


class WeftAuthz(Weft):
    """weft with an ALLOW AuthorizationPolicy on the server pod, so every request is checked
    against a rule (client identity + method + a regex path) instead of the permissive
    default: what issue 4's "no measurable p99 latency" is measured against."""
    name = "weft-authz"
    description = ("weft, plus an AuthorizationPolicy (ALLOW) on the server pod: from "
                   f"serviceAccounts [{WEFT_NAMESPACE}/client], to GET regex:/.* or GET / "
                   "(a per-request check with a regex that the benchmark's requests pass)")
    control_port = WEFT_CONTROL_PORT + 1

    def extra_manifests(self):
        return {"authz-server.yaml": (
            "apiVersion: policy.weft.io/v1alpha1\nkind: AuthorizationPolicy\n"
            f"metadata:\n  name: {AUTHZ_POLICY_NAME}\n  namespace: {WEFT_NAMESPACE}\n"
            "spec:\n  selector:\n    matchLabels:\n      app: \"weft-server\"\n"
            "  action: ALLOW\n  rules:\n"
            f"  - from: [{{serviceAccounts: [\"{WEFT_NAMESPACE}/client\"]}}]\n"
            "    to: [{methods: [\"GET\"], paths: [\"regex:/.*\"]},\n"
            "         {methods: [\"GET\"], paths: [\"/\"]}]\n")}

    def allowed_count(self):
        """The server proxy's weft_inbound_authz_total{decision="allow"} for this policy, summed
        over its other labels."""
        status, _, body = net.http_get(self.ctx.topo.node, self.server_ip, WEFT_ADMIN_PORT, "/metrics")
        if status != 200:
            raise BenchError(f"{self.name}: server proxy /metrics answered {status}")
        return sum(float(m.group(1)) for m in AUTHZ_ALLOW.finditer(body.decode("utf-8", "replace")))

    def check(self):
        host, port = self.target("h1")
        # The policy reaches the proxy over its Inbound watch, possibly after /ready: wait until
        # it is in force, which a request outside its rules (POST) shows by being refused.
        wait_until(f"{self.name}: the server proxy to enforce {AUTHZ_POLICY_NAME} (POST -> 403)",
                   AUTHZ_POLICY_TIMEOUT,
                   lambda: net.http_request(self.client_ns, host, port, "POST")[0] == 403,
                   interval=0.25)
        before = self.allowed_count()
        super().check()
        after = self.allowed_count()
        if after <= before:
            raise BenchError(f"{self.name}: the sanity GET passed but the server proxy's "
                             f"weft_inbound_authz_total{{decision=\"allow\",policy=\"{WEFT_NAMESPACE}/"
                             f"{AUTHZ_POLICY_NAME}\"}} stayed at {before:g}")


AUTHZ_ALLOW = re.compile(
    r'^weft_inbound_authz_total\{decision="allow",[^}]*policy="' + re.escape(f"{WEFT_NAMESPACE}/{AUTHZ_POLICY_NAME}")
    + r'"[^}]*\} (\d+(?:\.\d+)?)$', re.MULTILINE)


def write_yaml(directory, name, text):
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.rename(tmp, os.path.join(directory, name))


def pod_yaml(name, ip, service_account, token):
    digest = hashlib.sha256(token.encode()).hexdigest()
    q = json.dumps
    return (
        "apiVersion: v1\nkind: Pod\n"
        f"metadata:\n  name: {q(name)}\n  namespace: {q(WEFT_NAMESPACE)}\n"
        f"  labels:\n    app: {q(name)}\n"
        f"  annotations:\n    weft.io/inject: \"enabled\"\n    weft.io/token-sha256: {q(digest)}\n"
        f"spec:\n  serviceAccountName: {q(service_account)}\n"
        "  containers:\n  - name: app\n    image: weft-httpapp\n"
        f"status:\n  phase: Running\n  podIP: {q(ip)}\n  podIPs:\n  - ip: {q(ip)}\n"
    )


def service_yaml():
    return (
        "apiVersion: v1\nkind: Service\n"
        f"metadata:\n  name: \"app\"\n  namespace: {json.dumps(WEFT_NAMESPACE)}\n"
        f"spec:\n  type: ClusterIP\n  clusterIP: {json.dumps(WEFT_SERVICE_IP)}\n"
        "  selector:\n    app: \"weft-server\"\n"
        "  ports:\n"
        f"  - name: http\n    protocol: TCP\n    port: {WEFT_SERVICE_HTTP_PORT}\n    targetPort: {APP_PORT}\n"
        f"  - name: grpc\n    protocol: TCP\n    port: {WEFT_SERVICE_GRPC_PORT}\n    targetPort: {GRPC_APP_PORT}\n"
    )


class Pair(Contender):
    """A client-side and a server-side proxy of one kind, configured from bench/conf."""

    def template_values(self, run_dir):
        pki = self.ctx.pki()
        return {
            "RUN": run_dir,
            "H1_PORT": PAIR_H1_PORT,
            "H2_PORT": PAIR_H2_PORT,
            "GRPC_PORT": PAIR_GRPC_PORT,
            "MTLS_PORT": PAIR_MTLS_PORT,
            "MTLS_GRPC_PORT": PAIR_MTLS_GRPC_PORT,
            "APP_PORT": APP_PORT,
            "GRPC_APP_PORT": GRPC_APP_PORT,
            "SERVER_IP": self.server_ip,
            "SERVER_NAME": certs.SERVER_NAME,
            "CA": pki["ca"],
            "CLIENT_PEM": pki["client"]["pem"],
            "CLIENT_CRT": pki["client"]["crt"],
            "CLIENT_KEY": pki["client"]["key"],
            "SERVER_PEM": pki["server"]["pem"],
            "SERVER_CRT": pki["server"]["crt"],
            "SERVER_KEY": pki["server"]["key"],
            # Sized to what the run needs, not beyond: nginx initialises its whole connection
            # table at start (it shows in RSS), HAProxy sizes its descriptor table from maxconn.
            # HAProxy needs two descriptors per proxied connection, nginx counts both sides in
            # worker_connections, and neither may pass the descriptor limit they inherit.
            "MAXCONN": min(self.ctx.connections, nofile_limit() // 2 - 100),
            "WORKER_CONNECTIONS": min(2 * self.ctx.connections, nofile_limit() - 100),
        }

    def command(self, config_path, run_dir):
        """argv that runs one proxy of the pair in the foreground."""
        raise NotImplementedError

    def start_proxies(self):
        for role, netns in (("server", self.server_ns), ("client", self.client_ns)):
            run_dir = os.path.join(self.ctx.work_dir, f"{self.name}-{role}")
            os.makedirs(run_dir, exist_ok=True)
            config = render(self.templates[role], os.path.join(run_dir, self.templates[role]),
                            self.template_values(run_dir))
            proc = self.ctx.topo.spawn(netns, f"{self.name}-{role}", self.command(config, run_dir),
                                       cpu=self.ctx.proxy_cpu)
            self.proxy_procs[role] = proc
            host, port = (self.server_ip, PAIR_MTLS_PORT) if role == "server" else ("127.0.0.1", PAIR_H1_PORT)
            wait_until(f"{self.name} {role} proxy to listen", READY_TIMEOUT,
                       lambda netns=netns, host=host, port=port: net.can_connect(netns, host, port),
                       failed=lambda proc=proc: None if proc.alive() else proc.log_tail())

    def target(self, proto):
        return "127.0.0.1", {"h1": PAIR_H1_PORT, "h2": PAIR_H2_PORT, "grpc": PAIR_GRPC_PORT}[proto]

    def check(self):
        super().check()
        # The server side must speak TLS 1.3 and refuse a client without a certificate
        # (HAProxy fails the handshake, nginx answers 400).
        pki = self.ctx.pki()
        cert = (pki["client"]["crt"], pki["client"]["key"])
        version, status = net.tls_get(self.client_ns, self.server_ip, PAIR_MTLS_PORT,
                                      certs.SERVER_NAME, pki["ca"], cert)
        if version != "TLSv1.3" or status != 200:
            raise BenchError(f"{self.name}: mTLS to the server side gave {version} / {status}")
        try:
            _, status = net.tls_get(self.client_ns, self.server_ip, PAIR_MTLS_PORT,
                                    certs.SERVER_NAME, pki["ca"])
        except OSError:
            return  # ssl.SSLError is an OSError: refused in the handshake
        if status == 200:
            raise BenchError(f"{self.name}: the server side served a client without a certificate")


class HAProxy(Pair):
    name = "haproxy"
    description = "HAProxy pair, nbthread 1, keep-alive + http-reuse always, TLS 1.3 mTLS"
    templates = {"client": "haproxy-client.cfg", "server": "haproxy-server.cfg"}

    def command(self, config_path, run_dir):
        # -db: foreground, one process (no master-worker).
        return [tool("haproxy"), "-db", "-f", config_path]


class Nginx(Pair):
    name = "nginx"
    description = "nginx pair, 1 worker (+ master), upstream keepalive pools, TLS 1.3 mTLS"
    templates = {"client": "nginx-client.conf", "server": "nginx-server.conf"}

    def command(self, config_path, run_dir):
        return [tool("nginx"), "-p", run_dir, "-e", "stderr", "-c", config_path]


ALL = {"direct": Direct, "weft": Weft, "weft-authz": WeftAuthz, "haproxy": HAProxy, "nginx": Nginx}
# Pod addresses: 198.18.0.<octet> (client) and <octet+1> (server).
OCTETS = {"direct": 10, "weft": 20, "weft-authz": 24, "haproxy": 30, "nginx": 40}
