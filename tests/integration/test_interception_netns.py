"""`meshlet sidecar init` against the real kernel, in network namespaces this module
creates (and deletes, even on failure): the rules install once however often it runs,
`--remove` takes away exactly them, the app's TCP really lands on :15001 with
SO_ORIGINAL_DST = the VIP:port it dialled, its DNS really lands on the sidecar's DNS,
and the sidecar's own traffic, excluded ports/CIDRs and replies are left alone.

Each test builds an "app" namespace (the container: lo, 198.18.0.2/24, default route
via 198.18.0.1) joined by a veth pair to a "peer" namespace (the rest of the network:
198.18.0.1, and on its lo the VIP 198.19.128.5, 198.18.5.9 and a resolver
198.18.0.53). Servers in the peer answer "peer ADDR:PORT", so traffic that is NOT
intercepted proves it reached where it was sent. Needs root, `ip`, `nft`, `setpriv`.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlet.errors import MeshError, NotFoundError
from sidecar import intercept, nft

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
APP_UID = 65534  # nobody: the app
PROXY_UID = 1337  # the sidecar
VIP = "198.19.128.5"
RESOLVER = "198.18.0.53"  # the "real" resolver, in the peer namespace
SIDECAR_DNS = "127.0.0.53"
SIDECAR_ANSWER = VIP
UPSTREAM_ANSWER = "198.18.99.99"
PREFIX = "meshlet-t-"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(b) for b in ("ip", "nft", "setpriv")),
        reason="needs root, ip, nft and setpriv (network namespaces)",
    ),
]

# `meshlet ...` through the real dispatcher, with `sidecar` registered if it is not yet.
MESHLET = (
    "import meshlet.cli as c; "
    "c.LAZY_COMMANDS.setdefault('sidecar', ('sidecar.cli:main', 'the sidecar')); c.main()"
)

# A TCP server. argv: LABEL BIND... ; LABEL "origdst" answers "orig <SO_ORIGINAL_DST>",
# any other label answers "LABEL <local addr:port>". Prints "ready" once listening.
SERVER = r"""
import signal, socket, sys, threading
signal.alarm(60)
label, binds = sys.argv[1], sys.argv[2:]
def fmt(h, p): return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
def serve(s):
    while True:
        c, _ = s.accept()
        with c:
            if label == "origdst":
                from meshlet.errors import MeshError
                from sidecar.origdst import original_dst
                try:
                    msg = "orig " + fmt(*original_dst(c))
                except MeshError as e:
                    msg = f"error {e}"
            else:
                h, p = c.getsockname()[:2]
                msg = f"{label} " + fmt(h.removeprefix("::ffff:"), p)
            c.sendall(msg.encode() + b"\n")
for b in binds:
    host, _, port = b.rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, int(port)))
    s.listen(64)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
signal.pause()
"""

# A DNS server on UDP and TCP. argv: ADDR PORT ANSWER; every A query gets ANSWER.
RESPONDER = r"""
import signal, socket, struct, sys, threading
import dns.message, dns.rrset
signal.alarm(60)
addr, port, answer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def reply(wire):
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 5, "IN", "A", answer))
    return r.to_wire()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((addr, port))
t = socket.create_server((addr, port))
def udp():
    while True:
        data, peer = u.recvfrom(4096)
        u.sendto(reply(data), peer)
def tcp():
    while True:
        c, _ = t.accept()
        with c:
            n = struct.unpack("!H", c.recv(2))[0]
            data = b""
            while len(data) < n:
                data += c.recv(n - len(data))
            out = reply(data)
            c.sendall(struct.pack("!H", len(out)) + out)
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
signal.pause()
"""

# A TCP client (stdlib only: it runs as the app or proxy uid). argv: HOST PORT [MARK].
CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(1.0)
if len(sys.argv) > 3:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(sys.argv[3], 0))
try:
    s.connect((host, port))
    print(s.makefile().readline().strip())
except socket.timeout:
    print("timeout")
except OSError as e:
    print(f"oserror {e.strerror}")
"""

# A DNS client (stdlib only). argv: udp|tcp HOST PORT HEXQUERY; prints the reply in hex.
DNS_CLIENT = r"""
import socket, struct, sys
proto, host, port, query = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(1.0)
        s.sendto(query, (host, port))
        print(s.recv(4096).hex())
    else:
        s = socket.create_connection((host, port), timeout=1.0)
        s.sendall(struct.pack("!H", len(query)) + query)
        n = struct.unpack("!H", s.recv(2))[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        print(data.hex())
except OSError as e:
    print(f"oserror {e}")
"""


def sh(*args: str, input: str | None = None, check: bool = True) -> str:
    done = subprocess.run(args, input=input, capture_output=True, text=True, timeout=15)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def netns_names() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()}


@dataclass
class Mesh:
    """An app namespace and a peer namespace, and the processes started in them."""

    app: str
    peer: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(
        self, ns: str, *args: str, uid: int | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        who = (
            [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        )
        return subprocess.run(
            ["ip", "netns", "exec", ns, *who, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=15,
            cwd=ROOT,
        )

    def meshlet(self, *args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(self.app, PY, "-c", MESHLET, *args, uid=uid)

    def init(self, *args: str) -> str:
        done = self.meshlet("sidecar", "init", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def nft(self, *args: str) -> str:
        done = self.run(self.app, "nft", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, ns: str, script: str, *args: str, uid: int | None = None) -> None:
        who = (
            [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        )
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *who, PY, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(
                f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
            )

    def connect(
        self, host: str, port: int, *, uid: int | None = APP_UID, mark: int | None = None
    ) -> str:
        extra = [] if mark is None else [hex(mark)]
        done = self.run(self.app, PY, "-c", CLIENT, host, str(port), *extra, uid=uid)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def resolve(self, proto: str, server: str, *, uid: int = APP_UID) -> str:
        query = dns.message.make_query("orders.svc.meshlet", dns.rdatatype.A)
        done = self.run(
            self.app, PY, "-c", DNS_CLIENT, proto, server, "53", query.to_wire().hex(), uid=uid
        )
        out = done.stdout.strip()
        assert done.returncode == 0 and not out.startswith("oserror"), (out, done.stderr)
        answer = dns.message.from_wire(bytes.fromhex(out))
        assert answer.id == query.id
        return str(answer.answer[0][0])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, 9)
            proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        self.procs.clear()


@pytest.fixture(scope="module", autouse=True)
def no_namespace_left_behind() -> Iterator[None]:
    before = netns_names()
    yield
    left = {n for n in netns_names() - before if n.startswith(PREFIX)}
    assert not left, f"namespaces left behind: {left}"


def build_mesh() -> Mesh:
    tag = secrets.token_hex(4)
    mesh = Mesh(app=f"{PREFIX}{tag}", peer=f"{PREFIX}{tag}-peer")
    try:
        for ns in (mesh.app, mesh.peer):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # (no dummy interfaces in this kernel: a veth pair to the peer namespace instead)
        sh(
            "ip",
            "-n",
            mesh.app,
            "link",
            "add",
            "m0",
            "type",
            "veth",
            "peer",
            "name",
            "m0p",
            "netns",
            mesh.peer,
        )
        sh("ip", "-n", mesh.app, "addr", "add", "198.18.0.2/24", "dev", "m0")
        sh("ip", "-n", mesh.app, "link", "set", "m0", "up")
        sh("ip", "-n", mesh.app, "route", "add", "default", "via", "198.18.0.1", "dev", "m0")
        sh("ip", "-n", mesh.peer, "addr", "add", "198.18.0.1/24", "dev", "m0p")
        sh("ip", "-n", mesh.peer, "link", "set", "m0p", "up")
        for addr in (f"{VIP}/32", "198.18.5.9/32", f"{RESOLVER}/32"):
            sh("ip", "-n", mesh.peer, "addr", "add", addr, "dev", "lo")
        mesh.start(mesh.peer, SERVER, "peer", "0.0.0.0:8080", "0.0.0.0:9000")
        mesh.start(mesh.peer, RESPONDER, RESOLVER, "53", UPSTREAM_ANSWER)
    except BaseException:
        destroy(mesh)
        raise
    return mesh


def destroy(mesh: Mesh) -> None:
    try:
        mesh.stop()
    finally:
        for ns in (mesh.app, mesh.peer):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    m = build_mesh()
    try:
        yield m
    finally:
        destroy(m)


INIT_ARGS = (
    "--outbound-port", "15001", "--inbound-port", "15006", "--dns", f"{SIDECAR_DNS}:53",
    "--exclude-ports", "9000,22", "--exclude-cidrs", "198.18.5.0/24",
    "--proxy-uid", str(PROXY_UID),
)  # fmt: skip


@pytest.fixture(scope="module")
def intercepted() -> Iterator[Mesh]:
    """A mesh with the rules installed, the sidecar's outbound listener and DNS running."""
    m = build_mesh()
    try:
        assert m.connect(VIP, 8080) == f"peer {VIP}:8080"  # the network works before init
        m.init(*INIT_ARGS)
        m.start(m.app, SERVER, "origdst", "0.0.0.0:15001")
        m.start(m.app, SERVER, "local", "0.0.0.0:9090")
        m.start(m.app, RESPONDER, SIDECAR_DNS, "53", SIDECAR_ANSWER)
        m.start(m.app, SERVER, "inbound", "0.0.0.0:15006", uid=APP_UID)
        yield m
    finally:
        destroy(m)


def test_init_twice_leaves_one_set_of_rules_and_remove_only_ours(mesh: Mesh) -> None:
    mesh.nft("add", "table", "inet", "other")
    mesh.nft("add", "chain", "inet", "other", "out", "{ type filter hook output priority 0; }")
    mesh.nft("add", "rule", "inet", "other", "out", "tcp", "dport", "4242", "counter")
    other = mesh.nft("list", "table", "inet", "other")

    first = mesh.init(*INIT_ARGS)
    assert first.count("\n") == 1 and first.startswith("installed table inet meshlet: ")
    once = mesh.nft("list", "table", "inet", "meshlet")
    assert mesh.init(*INIT_ARGS) == first
    twice = mesh.nft("list", "table", "inet", "meshlet")
    assert twice == once
    assert twice.count("redirect to :15001") == 1
    assert twice.count(f"meta skuid {PROXY_UID} return") == 1
    assert twice.count("dnat ip to 127.0.0.53:53") == 1
    tables = mesh.nft("list", "tables").splitlines()
    assert sorted(tables) == ["table inet meshlet", "table inet other"]
    assert mesh.nft("list", "table", "inet", "other") == other

    assert mesh.init("--remove") == "removed table inet meshlet\n"
    assert mesh.nft("list", "tables").splitlines() == ["table inet other"]
    assert mesh.nft("list", "table", "inet", "other") == other
    assert mesh.init("--remove") == "nothing to remove: table inet meshlet is not installed\n"
    assert mesh.connect(VIP, 8080) == f"peer {VIP}:8080"  # nothing captures any more


def test_a_changed_config_replaces_the_rules(mesh: Mesh) -> None:
    mesh.init(*INIT_ARGS)
    mesh.init("--outbound-port", "16001", "--proxy-uid", str(PROXY_UID))
    listing = mesh.nft("list", "table", "inet", "meshlet")
    assert "redirect to :16001" in listing and ":15001" not in listing and "dnat" not in listing


def test_dry_run_prints_the_script_and_installs_nothing(mesh: Mesh) -> None:
    out = mesh.init(*INIT_ARGS, "--dry-run")
    assert out.startswith(intercept.PREAMBLE) and "redirect to :15001" in out
    assert mesh.nft("list", "tables") == ""


@pytest.mark.parametrize(
    ("who", "host", "port", "expected"),
    [
        ("app", VIP, 8080, f"orig {VIP}:8080"),
        ("app", "198.19.200.1", 443, "orig 198.19.200.1:443"),
        ("root", VIP, 8080, f"orig {VIP}:8080"),  # any uid but the proxy's is captured
        ("proxy", VIP, 8080, f"peer {VIP}:8080"),
        ("marked", VIP, 8080, f"peer {VIP}:8080"),
        ("app", VIP, 9000, f"peer {VIP}:9000"),  # --exclude-ports
        ("app", "198.18.5.9", 8080, "peer 198.18.5.9:8080"),  # --exclude-cidrs
        ("app", "127.0.0.1", 9090, "local 127.0.0.1:9090"),  # loopback: not captured
        ("app", "198.18.0.2", 9090, "local 198.18.0.2:9090"),  # own address: not captured
    ],
)
def test_where_each_connection_lands(
    intercepted: Mesh, who: str, host: str, port: int, expected: str
) -> None:
    uid = {"app": APP_UID, "proxy": PROXY_UID, "root": None, "marked": None}[who]
    mark = 0x539 if who == "marked" else None
    assert intercepted.connect(host, port, uid=uid, mark=mark) == expected


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_app_dns_goes_to_the_sidecar_dns_and_the_sidecars_own_does_not(
    intercepted: Mesh, proto: str
) -> None:
    assert intercepted.resolve(proto, RESOLVER) == SIDECAR_ANSWER
    assert intercepted.resolve(proto, "198.18.77.77") == SIDECAR_ANSWER  # any address, port 53
    assert intercepted.resolve(proto, RESOLVER, uid=PROXY_UID) == UPSTREAM_ANSWER
    # DNAT of the app's DNS to 127.0.0.53 works without route_localnet
    sysctl = intercepted.run(intercepted.app, "sysctl", "-n", "net.ipv4.conf.all.route_localnet")
    assert sysctl.stdout.strip() == "0"


def test_inbound_connections_and_their_replies_are_not_captured(intercepted: Mesh) -> None:
    # a peer dials the app namespace's inbound port; the server there runs as the app
    # uid, whose new connections would be captured, yet its replies flow back.
    done = intercepted.run(intercepted.peer, PY, "-c", CLIENT, "198.18.0.2", "15006")
    assert done.stdout.strip() == "inbound 198.18.0.2:15006", done.stderr


def test_ipv6_and_loopback_capture_with_one_dual_stack_listener(mesh: Mesh) -> None:
    mesh.init("--capture-loopback", "--proxy-uid", str(PROXY_UID))
    mesh.start(mesh.app, SERVER, "origdst", "[::]:15001")
    assert mesh.connect("::1", 8080) == "orig [::1]:8080"  # IP6T_SO_ORIGINAL_DST
    assert mesh.connect("127.0.0.1", 8080) == "orig 127.0.0.1:8080"  # v4-mapped peer
    assert mesh.connect(VIP, 8080) == f"orig {VIP}:8080"


def test_a_connection_that_was_not_redirected_never_yields_a_vip(mesh: Mesh) -> None:
    mesh.start(mesh.app, SERVER, "origdst", "0.0.0.0:15001")
    reply = mesh.connect("127.0.0.1", 15001)
    # without conntrack: a clear error; with it: the listener's own address, never a VIP
    assert reply.startswith("error no original destination") or reply == "orig 127.0.0.1:15001"


def test_without_net_admin_the_error_says_so(mesh: Mesh) -> None:
    for args in (INIT_ARGS, ("--remove",)):
        done = mesh.meshlet("sidecar", "init", *args, uid=APP_UID)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("meshlet: error: cannot ")
        assert "Operation not permitted" in done.stderr and "needs NET_ADMIN" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--outbound-port", "0"), "--outbound-port 0 is out of range 1-65535"),
        (("--inbound-port", "15001"), "--inbound-port 15001 is the same as --outbound-port"),
        (("--dns", "resolver"), "--dns 'resolver' must be ADDR or ADDR:PORT"),
        (("--exclude-ports", "22,ssh"), "--exclude-ports: 'ssh' is not a port number"),
        (("--proxy-mark", "0"), "--proxy-mark 0 must be 1-0xffffffff"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(
    mesh: Mesh, args: tuple[str, ...], message: str
) -> None:
    done = mesh.meshlet("sidecar", "init", *args)
    assert done.returncode == 2
    assert done.stderr.startswith(f"meshlet: error: {message}") and done.stderr.count("\n") == 1
    assert mesh.nft("list", "tables") == ""


def test_the_python_api_in_a_named_namespace(mesh: Mesh) -> None:
    cfg = intercept.InterceptConfig(dns=(SIDECAR_DNS, 53), proxy_uid=PROXY_UID)
    assert not nft.table_exists(netns=mesh.app)
    with pytest.raises(NotFoundError, match="not installed"):
        nft.list_table(netns=mesh.app)
    nft.ensure(cfg, netns=mesh.app)
    nft.ensure(cfg, netns=mesh.app)
    assert nft.table_exists(netns=mesh.app)
    assert nft.list_table(netns=mesh.app).count("redirect to :15001") == 1
    assert nft.remove(netns=mesh.app) is True
    assert nft.remove(netns=mesh.app) is False
    with pytest.raises(MeshError, match="syntax error"):
        nft.apply("table inet meshlet { chain c { bogus } }\n", netns=mesh.app)


def test_a_missing_nft_binary_is_a_clear_error() -> None:
    with pytest.raises(MeshError, match="`/nonexistent/nft` was not found; install nftables"):
        nft.apply(intercept.removal(), nft="/nonexistent/nft")


ports = st.integers(min_value=1, max_value=65535)


@st.composite
def configs(draw: st.DrawFn) -> intercept.InterceptConfig:
    outbound = draw(ports)
    nets = st.sampled_from(["198.18.5.0/24", "198.19.0.0/17", "2001:db8::/32", "::1/128"])
    return intercept.InterceptConfig(
        outbound_port=outbound,
        inbound_port=draw(ports.filter(lambda p: p != outbound)),
        dns=draw(st.none() | st.tuples(st.sampled_from([SIDECAR_DNS, RESOLVER, "::1"]), ports)),
        exclude_ports=tuple(draw(st.lists(ports, max_size=5))),
        exclude_cidrs=tuple(draw(st.lists(nets, max_size=3))),
        proxy_uid=draw(st.none() | st.integers(0, 2**32 - 2)),
        proxy_mark=draw(st.integers(1, 2**32 - 1)),
        capture_loopback=draw(st.booleans()),
    )


def test_nft_accepts_every_script_intercept_can_generate(mesh: Mesh) -> None:
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(configs())
    def check(cfg: intercept.InterceptConfig) -> None:
        nft.apply(intercept.ruleset(cfg), netns=mesh.app)
        assert nft.list_table(netns=mesh.app).count("redirect to") == 1

    started = time.monotonic()
    check()
    assert time.monotonic() - started < 60
