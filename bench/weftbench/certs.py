"""Certificates for the HAProxy and nginx pairs, made with openssl: an ECDSA P-256 CA and a
P-256 server and client certificate it signs (the same key type weft's workload certificates
use), so every contender pays for the same kind of handshake and signatures."""

import os

from topo import run, tool

SERVER_NAME = "server.bench"
CLIENT_NAME = "client.bench"


def _leaf(openssl, out_dir, name, usage, ca_crt, ca_key):
    key = os.path.join(out_dir, f"{name}.key")
    csr = os.path.join(out_dir, f"{name}.csr")
    crt = os.path.join(out_dir, f"{name}.crt")
    ext = os.path.join(out_dir, f"{name}.ext")
    host = SERVER_NAME if name == "server" else CLIENT_NAME
    with open(ext, "w", encoding="ascii") as f:
        f.write(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\n"
            f"subjectAltName=DNS:{host}\n"
        )
    run([openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", key])
    run([openssl, "req", "-new", "-key", key, "-subj", f"/CN={host}", "-out", csr])
    run([openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-days", "7", "-sha256", "-extfile", ext, "-out", crt])
    # HAProxy wants the certificate and its key in one file.
    pem = os.path.join(out_dir, f"{name}.pem")
    with open(pem, "w", encoding="ascii") as out:
        for part in (crt, key):
            with open(part, encoding="ascii") as f:
                out.write(f.read())
    return {"crt": crt, "key": key, "pem": pem}


def make_pki(out_dir):
    """Writes ca.crt and server/client {crt,key,pem} under out_dir; returns their paths."""
    openssl = tool("openssl")
    os.makedirs(out_dir, exist_ok=True)
    ca_key = os.path.join(out_dir, "ca.key")
    ca_crt = os.path.join(out_dir, "ca.crt")
    run([openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", ca_key])
    run([openssl, "req", "-x509", "-new", "-key", ca_key, "-sha256", "-days", "7",
         "-subj", "/CN=weft-bench-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-out", ca_crt])
    return {
        "ca": ca_crt,
        "server": _leaf(openssl, out_dir, "server", "serverAuth", ca_crt, ca_key),
        "client": _leaf(openssl, out_dir, "client", "clientAuth", ca_crt, ca_key),
    }
