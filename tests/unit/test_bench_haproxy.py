"""The HAProxy side of `make bench` is a fair fight: the generated configs are the ones
kept in bench/haproxy/, HAProxy accepts them (`haproxy -c`), and a running inbound hop
speaks TLS 1.3 only and refuses a client whose certificate is not from the mesh CA."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `bench`

from bench import haproxy_config, haproxy_run
from bench.workloads import PATHS


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/bin")
    assert found, "haproxy is not installed: `make bootstrap` installs scripts/apt-packages.txt"
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(certs: Path) -> dict[str, str]:
    env = {name: str(_free_port()) for name in haproxy_config.env_names()}
    env[haproxy_config.CERTS_ENV] = str(certs)
    return env


def _sections(text: str, kind: str) -> dict[str, list[str]]:
    """frontend/backend name → its indented lines."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            head = line.split()
            current = out.setdefault(head[1], []) if head[0] == kind else None
        elif current is not None and line.strip():
            current.append(line.strip())
    return out


def test_the_configs_kept_in_the_repo_are_the_generated_ones() -> None:
    for hop in haproxy_config.HOPS:
        kept = haproxy_run.REPO_DIR / f"{hop}.cfg"
        assert kept.read_text() == haproxy_config.render(hop), (
            f"{kept} differs from what bench/haproxy_config.py generates: run `make bench`"
        )


def test_both_hops_are_tls13_only_single_threaded_and_log_every_request() -> None:
    for hop in haproxy_config.HOPS:
        text = haproxy_config.render(hop)
        assert "ssl-default-bind-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3" in text
        assert "ssl-default-server-options ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3" in text
        assert "nbthread 1" in text
        assert "log stdout" in text


def test_outbound_is_plaintext_in_and_verified_mtls_out_inbound_the_reverse() -> None:
    out = _sections(haproxy_config.render("outbound"), "frontend")
    out_be = _sections(haproxy_config.render("outbound"), "backend")
    inb = _sections(haproxy_config.render("inbound"), "frontend")
    inb_be = _sections(haproxy_config.render("inbound"), "backend")
    assert set(out) == set(inb) == {p.name for p in PATHS}
    for p in PATHS:
        bind_out = next(line for line in out[p.name] if line.startswith("bind"))
        assert " ssl " not in bind_out
        server_out = next(line for line in out_be[f"{p.name}_next"] if line.startswith("server"))
        assert " ssl crt " in server_out and "verify required" in server_out
        assert "haproxy-outbound.pem" in server_out and "bundle.pem" in server_out
        bind_in = next(line for line in inb[p.name] if line.startswith("bind"))
        assert " ssl crt " in bind_in and "verify required" in bind_in and "ca-file" in bind_in
        server_in = next(line for line in inb_be[f"{p.name}_next"] if line.startswith("server"))
        assert " ssl" not in server_in
        mode = "tcp" if p.haproxy_mode == "tcp" else "http"
        for section in (out[p.name], inb[p.name], out_be[f"{p.name}_next"]):
            assert f"mode {mode}" in section
    assert "proto h2" in next(line for line in out["grpc"] if line.startswith("bind"))
    assert "alpn h2" in next(line for line in out_be["grpc_next"] if line.startswith("server"))
    assert "proto h2" in next(line for line in inb_be["grpc_next"] if line.startswith("server"))


def test_every_port_comes_from_the_environment() -> None:
    for hop in haproxy_config.HOPS:
        text = haproxy_config.render(hop)
        for p in PATHS:
            assert f"${{{haproxy_config.env_name(hop, p.name)}}}" in text
    with pytest.raises(ValueError, match="hop must be one of"):
        haproxy_config.render("sideways")


@pytest.mark.integration
def test_haproxy_accepts_both_configs(tmp_path: Path) -> None:
    haproxy_run.write_certs(tmp_path / "certs")
    env = _env(tmp_path / "certs")
    for hop in haproxy_config.HOPS:
        cfg = tmp_path / f"{hop}.cfg"
        cfg.write_text(haproxy_config.render(hop))
        assert "Configuration file is valid" in haproxy_run.check(_haproxy(), cfg, env)


def _client_context(certs: Path, cert: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(certs / "bundle.pem")
    ctx.load_cert_chain(cert)
    return ctx


@pytest.mark.integration
def test_inbound_hop_verifies_its_peer_and_speaks_tls13_only(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    haproxy_run.write_certs(certs)
    haproxy_run.write_certs(tmp_path / "stranger")  # another CA: must be refused
    env = _env(certs)
    port = int(env[haproxy_config.env_name("inbound", "echo")])
    cfg = tmp_path / "inbound.cfg"
    cfg.write_text(haproxy_config.render("inbound"))
    with socket.socket() as app:  # the echo app behind the hop: one byte back
        app.bind(("127.0.0.1", int(env[haproxy_config.env_name("app", "echo")])))
        app.listen(8)
        app.settimeout(20)
        proc = haproxy_run.start(_haproxy(), cfg, env, tmp_path / "haproxy.log")
        try:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
                assert time.monotonic() < deadline, "HAProxy did not listen in 20 s"
                time.sleep(0.05)
            good = _client_context(certs, certs / "haproxy-outbound.pem")
            with (
                socket.create_connection(("127.0.0.1", port), 10) as raw,
                good.wrap_socket(raw) as tls,
            ):
                assert tls.version() == "TLSv1.3"
                tls.sendall(b"x")
                served, _ = app.accept()
                with served:
                    assert served.recv(1) == b"x"
                    served.sendall(b"y")
                    assert tls.recv(1) == b"y"
            stranger = _client_context(certs, tmp_path / "stranger" / "haproxy-outbound.pem")
            with socket.create_connection(("127.0.0.1", port), 10) as raw:
                refused = False
                try:
                    with stranger.wrap_socket(raw) as tls:
                        tls.sendall(b"x")
                        refused = tls.recv(1) == b""  # TLS 1.3: the alert comes after
                except (ssl.SSLError, OSError):
                    refused = True
                assert refused, "the inbound hop let in a client from another CA"
            tls12 = _client_context(certs, certs / "haproxy-outbound.pem")
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            with (
                socket.create_connection(("127.0.0.1", port), 10) as raw,
                pytest.raises((ssl.SSLError, OSError)),
            ):
                tls12.wrap_socket(raw)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
