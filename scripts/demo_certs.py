"""The certificate walkthrough: a mesh CA, two workloads talking mutual TLS with their
SVIDs, and a root rotation in steps with no failed handshake. Every step runs the real
`meshlet certs` command and a real TLS 1.3 handshake on 127.0.0.1.
"""

from __future__ import annotations

import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from cryptography import x509

from certs.spiffe import parse
from certs.verify import Expectation, check_identity

TD = "demo.meshlet.local"
BOLD, DIM, GREEN, RED, END = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RED = END = ""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"{BOLD}$ meshlet {shlex.join(args)}{END}")
    proc = subprocess.run(
        [sys.executable, "-m", "meshlet", *args], capture_output=True, text=True, check=False
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"  {DIM}{line}{END}")
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `meshlet {shlex.join(args)}` failed")
    return proc


def context(workload: Path, bundle: Path, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(workload / "cert.pem", workload / "key.pem")
    ctx.load_verify_locations(bundle)
    return ctx


def handshake(client: Path, server: Path, client_bundle: Path, server_bundle: Path) -> str:
    """One mutual-TLS exchange from client to server; returns what the client saw."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, str] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context(server, server_bundle, True).wrap_socket(conn, server_side=True) as tls:
                peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                verdict = check_identity(peer, Expectation(trust_domain=TD))
                tls.sendall(f"hello {verdict.spiffe_id}".encode())
        except (ssl.SSLError, OSError) as e:
            seen["server"] = str(e)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            ctx = context(client, client_bundle, False)
            with ctx.wrap_socket(raw) as tls:
                peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                want = parse(f"spiffe://{TD}/ns/shop/sa/orders")
                verdict = check_identity(peer, Expectation.exactly(want))
                if not verdict.ok:
                    return f"{RED}refused: {verdict}{END}"
                reply = tls.recv(200).decode()
                return f"{GREEN}ok{END}: server is {verdict.spiffe_id}; it said {reply!r}"
    except (ssl.SSLError, OSError) as e:
        return f"{RED}handshake failed: {e}{END}"
    finally:
        thread.join(timeout=5)
        listener.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="meshlet-demo-") as tmp:
        root = Path(tmp)
        ca, web, orders = root / "ca", root / "web", root / "orders"
        bundle = ca / "bundle.pem"
        print(f"{BOLD}1. A mesh CA: root (10 y) → issuer (1 y) → workload SVIDs (24 h){END}")
        run("certs", "init", "--dir", str(ca), "--trust-domain", TD)
        run(
            "certs",
            "issue",
            "--dir",
            str(ca),
            "--spiffe-id",
            f"spiffe://{TD}/ns/shop/sa/web",
            "--out",
            str(web),
        )
        run(
            "certs",
            "issue",
            "--dir",
            str(ca),
            "--spiffe-id",
            f"spiffe://{TD}/ns/shop/sa/orders",
            "--out",
            str(orders),
        )
        run("certs", "inspect", str(orders / "cert.pem"), "--bundle", str(bundle))
        print(f"\n{BOLD}2. web → orders over mutual TLS 1.3, identities checked{END}")
        print("  " + handshake(web, orders, bundle, bundle))
        print(f"\n{BOLD}3. A bad identity is refused: a leaf from another trust domain{END}")
        run(
            "certs",
            "issue",
            "--dir",
            str(ca),
            "--spiffe-id",
            "spiffe://evil.example/ns/x/sa/y",
            "--out",
            str(root / "evil"),
            check=False,
        )

        print(f"\n{BOLD}4. Root rotation in steps, with overlap{END}")
        run("certs", "rotate", "root", "--dir", str(ca), "--status")
        old_web = root / "old-web"
        old_web.mkdir(mode=0o700)
        for name in ("cert.pem", "key.pem"):
            (old_web / name).write_bytes((web / name).read_bytes())
        run("certs", "rotate", "root", "--dir", str(ca), "--step", "add")
        print(
            "  both roots trusted; old leaves still work: " + handshake(web, orders, bundle, bundle)
        )
        run("certs", "rotate", "root", "--dir", str(ca), "--step", "promote")
        run(
            "certs",
            "renew",
            "--dir",
            str(ca),
            "--cert",
            str(orders / "cert.pem"),
            "--key",
            str(orders / "key.pem"),
        )
        print("  new orders leaf, old web leaf: " + handshake(web, orders, bundle, bundle))
        run(
            "certs",
            "rotate",
            "root",
            "--dir",
            str(ca),
            "--step",
            "retire",
            "--still-in-use",
            str(web / "cert.pem"),
            check=False,
        )
        run(
            "certs",
            "renew",
            "--dir",
            str(ca),
            "--cert",
            str(web / "cert.pem"),
            "--key",
            str(web / "key.pem"),
        )
        run(
            "certs",
            "rotate",
            "root",
            "--dir",
            str(ca),
            "--step",
            "retire",
            "--still-in-use",
            f"{web / 'cert.pem'},{orders / 'cert.pem'}",
        )
        print("  after retire, re-issued leaves: " + handshake(web, orders, bundle, bundle))
        print(
            "  after retire, a leaf under the old root: "
            + handshake(old_web, orders, bundle, bundle)
        )
        run("certs", "rotate", "root", "--dir", str(ca), "--status")


if __name__ == "__main__":
    main()
