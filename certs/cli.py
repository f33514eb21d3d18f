"""`meshlet certs`: create the mesh CA, issue and inspect SVIDs, renew, rotate.

The shell around ``cadir``/``pki``/``verify``/``schedule``: parse flags, read files,
print. Every failure is one line on stderr; nothing is written unless all succeeds.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from certs import cadir, meshcheck, pki, schedule
from certs.files import PUBLIC, SECRET, ensure_private_dir, read_file, write_files
from certs.spiffe import parse as parse_spiffe_id
from certs.verify import Expectation, verify_svid
from meshlet.durations import format_duration, parse_duration
from meshlet.errors import CertificateError, ConflictError, InputError, MeshError

DirPath = click.Path(file_okay=False, path_type=Path)
FilePath = click.Path(dir_okay=True, path_type=Path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ttl(text: str, flag: str) -> dt.timedelta:
    ttl_seconds = parse_duration(text, what=flag)
    if ttl_seconds < 1:
        raise InputError(
            f"{flag} {text!r} is shorter than a second: certificates count whole seconds"
        )
    try:
        ttl = dt.timedelta(seconds=ttl_seconds)
        _now() + ttl  # certificate times end in the year 9999
    except OverflowError:
        raise InputError(
            f"{flag} {text!r} is too long: certificates cannot outlive the year 9999"
        ) from None
    return ttl


def _load_chain(path: Path, what: str = "certificate file") -> list[x509.Certificate]:
    return pki.load_certs(read_file(path, what=what), source=str(path))


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group()
def certs() -> None:
    """Create the mesh CA, issue and inspect workload certificates, renew and rotate."""


# ---- init / issue ------------------------------------------------------------------------


@certs.command()
@click.option("--dir", "directory", type=DirPath, required=True, help="CA directory to create.")
@click.option("--trust-domain", required=True, help="SPIFFE trust domain, e.g. mesh.local.")
@click.option("--root-ttl", default="10y", show_default=True, help="Root lifetime.")
@click.option("--issuer-ttl", default="1y", show_default=True, help="Issuer lifetime.")
@click.option("--force", is_flag=True, help="Replace an existing CA in --dir.")
def init(directory: Path, trust_domain: str, root_ttl: str, issuer_ttl: str, force: bool) -> None:
    """Create a root, an issuer under it, and the trust bundle in --dir."""
    state = cadir.init(
        directory,
        trust_domain,
        _now(),
        force=force,
        root_ttl=_ttl(root_ttl, "--root-ttl"),
        issuer_ttl=_ttl(issuer_ttl, "--issuer-ttl"),
    )
    click.echo(f"created CA for trust domain {state.trust_domain} in {directory}")
    click.echo(
        f"  root    {pki.fingerprint(state.root)[:16]}  valid until {_ts(state.root.not_valid_after_utc)}"
    )
    click.echo(
        f"  issuer  {pki.fingerprint(state.issuer)[:16]}  valid until {_ts(state.issuer.not_valid_after_utc)}"
    )
    click.echo(
        f"  files   {', '.join(sorted(n for n in cadir.ALL_FILES if (directory / n).exists()))}"
    )


def _write_leaf(
    out: Path,
    chain: Sequence[x509.Certificate],
    key: pki.PrivateKey | None,
    bundle: Sequence[x509.Certificate] | None,
    cert_name: str = "cert.pem",
    key_name: str = "key.pem",
) -> None:
    files: dict[str, tuple[bytes, int]] = {}
    if key is not None:
        files[key_name] = (pki.dump_key(key), SECRET)
    files[cert_name] = (pki.dump_certs(chain), PUBLIC)
    if bundle is not None:
        files["bundle.pem"] = (pki.dump_certs(bundle), PUBLIC)
    write_files(out, files)


def _warn_capped(capped: bool, state: cadir.CaState) -> None:
    if capped:
        click.echo(
            f"warning: the issuer expires at {_ts(state.issuer.not_valid_after_utc)}, so the "
            "certificate does too; run `meshlet certs rotate issuer`",
            err=True,
        )


@certs.command()
@click.option("--dir", "directory", type=DirPath, required=True, help="CA directory.")
@click.option("--spiffe-id", required=True, help="spiffe://TD/ns/NS/sa/NAME")
@click.option("--out", type=DirPath, required=True, help="Directory for cert.pem and key.pem.")
@click.option("--ttl", default="24h", show_default=True, help="Certificate lifetime.")
def issue(directory: Path, spiffe_id: str, out: Path, ttl: str) -> None:
    """Issue a workload certificate (X.509-SVID) and its key into --out."""
    lifetime = _ttl(ttl, "--ttl")
    sid = parse_spiffe_id(spiffe_id, require_path=True)
    state = cadir.load(directory)
    chain, key, capped = cadir.issue(state, sid, _now(), ttl=lifetime)
    ensure_private_dir(out)
    _write_leaf(out, chain, key, state.bundle)
    _warn_capped(capped, state)
    click.echo(
        f"issued {sid} valid until {_ts(chain[0].not_valid_after_utc)}: {out / 'cert.pem'}, {out / 'key.pem'}"
    )


# ---- inspect / needs-renewal ---------------------------------------------------------------


def _chain_status(
    chain: Sequence[x509.Certificate], bundle: Path | None, now: dt.datetime
) -> tuple[bool | None, str]:
    if bundle is None:
        return None, "not checked (pass --bundle)"
    roots = _load_chain(bundle, "trust bundle")
    leaf = chain[0]
    if pki.is_ca(leaf):
        anchor = pki.anchor_of(chain, roots)
        if anchor is None:
            return False, f"does not chain to a root in {bundle}"
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            return False, "outside its validity period"
        return True, f"verified against {bundle}"
    sid = pki.spiffe_id_of(leaf)
    td = sid.trust_domain if sid else pki.trust_domain_of(roots[0]) if roots else ""
    verdict = verify_svid(chain, roots, now=now, expect=Expectation(trust_domain=td))
    if verdict.ok:
        return True, f"verified against {bundle}"
    return False, str(verdict)


def describe(path: Path, bundle: Path | None, now: dt.datetime) -> dict[str, Any]:
    chain = _load_chain(path)
    leaf = chain[0]
    sid = pki.spiffe_id_of(leaf)
    left = (leaf.not_valid_after_utc - now).total_seconds()
    ok, detail = _chain_status(chain, bundle, now)
    return {
        "file": str(path),
        "subject": leaf.subject.rfc4514_string() or "(empty)",
        "spiffe_id": str(sid) if sid else None,
        "issuer": leaf.issuer.rfc4514_string(),
        "serial": format(leaf.serial_number, "x"),
        "not_before": _ts(leaf.not_valid_before_utc),
        "not_after": _ts(leaf.not_valid_after_utc),
        "time_left": format_duration(left) if left > 0 else f"expired {format_duration(-left)} ago",
        "time_left_seconds": int(left),
        "key_type": pki.key_type(leaf),
        "is_ca": pki.is_ca(leaf),
        "certificates_in_file": len(chain),
        "chain_verified": ok,
        "chain": detail,
    }


@certs.command()
@click.argument("file", type=FilePath)
@click.option("--bundle", type=FilePath, help="Trust bundle to verify the chain against.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def inspect(file: Path, bundle: Path | None, output: str) -> None:
    """Show a certificate: identity, issuer, validity, key, and whether its chain verifies."""
    info = describe(file, bundle, _now())
    if output == "json":
        click.echo(json.dumps(info, indent=2))
        return
    rows = [
        (k.replace("_", " "), "" if v is None else str(v))
        for k, v in info.items()
        if k not in ("time_left_seconds", "chain_verified")
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    if info["chain_verified"] is False:
        sys.exit(1)


@certs.command("needs-renewal")
@click.argument("file", type=FilePath)
@click.option(
    "--expires-in", default=None, help="Renew when this much is left: 33% of the lifetime, or 1h."
)
def needs_renewal(file: Path, expires_in: str | None) -> None:
    """Exit 0 when FILE needs renewal, 1 when it does not (default: past 2/3 of its lifetime)."""
    threshold = schedule.Threshold.parse(expires_in) if expires_in else schedule.DEFAULT_THRESHOLD
    leaf = _load_chain(file)[0]
    now = _now()
    left = (leaf.not_valid_after_utc - now).total_seconds()
    if schedule.needs_renewal(leaf.not_valid_before_utc, leaf.not_valid_after_utc, now, threshold):
        click.echo(f"{file}: renew now ({format_duration(left) if left > 0 else 'expired'} left)")
        sys.exit(0)
    click.echo(f"{file}: no renewal needed yet ({format_duration(left)} left)")
    sys.exit(1)


# ---- renew ------------------------------------------------------------------------------------


def renew_once(
    directory: Path, cert: Path, key_path: Path, ttl: dt.timedelta | None, rekey: bool
) -> x509.Certificate:
    """Re-issue the identity in ``cert``; return the new leaf."""
    state = cadir.load(directory)
    old = _load_chain(cert)[0]
    key = pki.load_key(read_file(key_path, what="key file"), source=str(key_path))
    if not pki.key_matches(old, key):
        raise CertificateError(f"{key_path} is not the key of {cert}: pass the matching --key")
    sid = pki.spiffe_id_of(old)
    if sid is None:
        raise CertificateError(
            f"{cert} has no single SPIFFE ID URI SAN: it is not an SVID meshlet can renew"
        )
    new_key = pki.new_key() if rekey else key
    chain, _, capped = cadir.issue(state, sid, _now(), ttl=ttl or pki.ttl_of(old), key=new_key)
    writes: dict[Path, dict[str, tuple[bytes, int]]] = defaultdict(dict)
    if rekey:
        writes[key_path.parent][key_path.name] = (pki.dump_key(new_key), SECRET)
    writes[cert.parent][cert.name] = (pki.dump_certs(chain), PUBLIC)
    if (cert.parent / "bundle.pem").exists():
        writes[cert.parent]["bundle.pem"] = (pki.dump_certs(state.bundle), PUBLIC)
    for folder, files in writes.items():
        write_files(folder, files)
    _warn_capped(capped, state)
    return chain[0]


def _run_exec(command: str) -> None:
    result = subprocess.run(
        command, shell=True, check=False
    )  # the user's own command, as step --exec
    if result.returncode != 0:
        click.echo(f"warning: --exec {command!r} exited {result.returncode}", err=True)


def _daemon(
    directory: Path,
    cert: Path,
    key: Path,
    ttl: dt.timedelta | None,
    rekey: bool,
    command: str | None,
) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rng = random.Random()
    due: tuple[int, dt.datetime] | None = None  # (serial, when): jitter drawn once per cert
    failures = 0
    while not stop.is_set():
        leaf = _load_chain(cert)[0]
        if due is None or due[0] != leaf.serial_number:
            due = (
                leaf.serial_number,
                schedule.renewal_time(leaf.not_valid_before_utc, leaf.not_valid_after_utc, rng),
            )
        wait = (due[1] - _now()).total_seconds()
        if wait > 0:
            stop.wait(min(wait, 3600))
            continue
        try:
            new = renew_once(directory, cert, key, ttl, rekey)
        except MeshError as e:
            failures += 1
            delay = schedule.retry_delay(failures, rng)
            click.echo(f"renewal of {cert} failed ({e}); retrying in {delay:.0f}s", err=True)
            stop.wait(delay)
            continue
        failures = 0
        click.echo(f"renewed {cert}: valid until {_ts(new.not_valid_after_utc)}", err=True)
        if command:
            _run_exec(command)


@certs.command()
@click.option("--dir", "directory", type=DirPath, required=True, help="CA directory.")
@click.option("--cert", type=FilePath, required=True, help="The certificate to renew (cert.pem).")
@click.option("--key", type=FilePath, required=True, help="Its key (key.pem).")
@click.option("--ttl", default=None, help="New lifetime (default: the same as the old one).")
@click.option("--rekey", is_flag=True, help="Make a new key instead of keeping the old one.")
@click.option(
    "--daemon", is_flag=True, help="Keep running; renew at 2/3 of each lifetime, with jitter."
)
@click.option("--exec", "command", default=None, help="Shell command to run after each renewal.")
def renew(
    directory: Path,
    cert: Path,
    key: Path,
    ttl: str | None,
    rekey: bool,
    daemon: bool,
    command: str | None,
) -> None:
    """Re-issue the same identity; with --daemon, keep doing it before each expiry."""
    lifetime = _ttl(ttl, "--ttl") if ttl else None
    if daemon:
        # Check everything once up front so bad flags fail now, not at the first renewal.
        cadir.load(directory)
        leaf = _load_chain(cert)[0]
        if not pki.key_matches(
            leaf, pki.load_key(read_file(key, what="key file"), source=str(key))
        ):
            raise CertificateError(f"{key} is not the key of {cert}: pass the matching --key")
        _daemon(directory, cert, key, lifetime, rekey, command)
        return
    new = renew_once(directory, cert, key, lifetime, rekey)
    click.echo(f"renewed {cert}: valid until {_ts(new.not_valid_after_utc)}")
    if command:
        _run_exec(command)


# ---- rotate -----------------------------------------------------------------------------------


@certs.group()
def rotate() -> None:
    """Rotate the issuer, or the root in steps (add, promote, retire)."""


@rotate.command("issuer")
@click.option("--dir", "directory", type=DirPath, required=True, help="CA directory.")
@click.option("--ttl", default="1y", show_default=True, help="New issuer lifetime.")
def rotate_issuer(directory: Path, ttl: str) -> None:
    """Make a new issuer under the same root; leaves of the old issuer keep verifying."""
    lifetime = _ttl(ttl, "--ttl")
    state = cadir.load(directory)
    cadir.apply(directory, cadir.plan_rotate_issuer(state, _now(), lifetime))
    new = cadir.load(directory)
    click.echo(
        f"new issuer {pki.fingerprint(new.issuer)[:16]} valid until {_ts(new.issuer.not_valid_after_utc)}"
    )


_STEP_HELP = {
    cadir.Step.ADD: "add: create a new root and trust both (bundle.pem gets the new root)",
    cadir.Step.PROMOTE: (
        "promote: sign a new issuer under the new root. Do it once every workload trusts "
        "the new bundle.pem (both roots)"
    ),
    cadir.Step.RETIRE: (
        "retire: drop the old root from bundle.pem. Do it once every certificate in use "
        "was re-issued under the new root (check with --still-in-use)"
    ),
}


def _split_files(values: Sequence[str]) -> list[Path]:
    return [Path(p) for v in values for p in v.split(",") if p]


def _status(
    state: cadir.CaState, in_use: list[tuple[str, list[x509.Certificate]]]
) -> dict[str, Any]:
    def role(c: x509.Certificate) -> str:
        if c == state.root:
            return "active"
        if c == state.next_root:
            return "next"
        if c == state.previous_root:
            return "previous"
        return "trusted"

    old = state.previous_root or (state.root if state.next_root else None)
    blocking = []
    if old is not None:
        others = [c for c in state.bundle if c != old]
        blocking = [
            (n, why)
            for n, ch in in_use
            if (why := cadir.retire_blocker(ch, old, others, state.issuer))
        ]
    return {
        "trust_domain": state.trust_domain,
        "roots": [
            {
                "fingerprint": pki.fingerprint(c)[:16],
                "role": role(c),
                "not_after": _ts(c.not_valid_after_utc),
            }
            for c in state.bundle
        ],
        "issuer_root": pki.fingerprint(
            pki.anchor_of(list(state.chain), state.bundle) or state.root
        )[:16],
        "next_step": state.next_step.value,
        "next_step_help": _STEP_HELP[state.next_step],
        "still_on_old_root": [name for name, _ in blocking],
        "blocking": [{"file": name, "reason": why} for name, why in blocking],
    }


def _client(server: str, token_file: str | None) -> Any:
    from meshlet.apiclient import ApiClient
    from meshlet.ctl import read_token_file

    return ApiClient(server, read_token_file(token_file) if token_file else None)


def _mesh_report(server: str, token_file: str | None) -> dict[str, Any]:
    report: dict[str, Any] = _client(server, token_file).get("/v1/ca").data
    return report


@rotate.command("root")
@click.option("--dir", "directory", type=DirPath, required=True, help="CA directory.")
@click.option("--step", type=click.Choice([s.value for s in cadir.Step]), default=None)
@click.option(
    "--status", is_flag=True, help="Say which step is next and what still depends on the old root."
)
@click.option(
    "--still-in-use",
    multiple=True,
    help="Certificate files still in use (repeat or comma-separate).",
)
@click.option(
    "--root-ttl", default="10y", show_default=True, help="Lifetime of the new root (add)."
)
@click.option(
    "--issuer-ttl", default="1y", show_default=True, help="Lifetime of the new issuer (promote)."
)
@click.option(
    "--control-plane",
    metavar="URL",
    default=None,
    help="Ask this running control plane (admin API) whether the mesh is ready for the step.",
)
@click.option("--token-file", envvar="MESHLET_TOKEN_FILE", metavar="PATH", help="Admin token file.")
@click.option("--force", is_flag=True, help="Take the step even if the mesh is not ready.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def rotate_root(
    directory: Path,
    step: str | None,
    status: bool,
    still_in_use: Sequence[str],
    root_ttl: str,
    issuer_ttl: str,
    control_plane: str | None,
    token_file: str | None,
    force: bool,
    output: str,
) -> None:
    """Rotate the root with overlap: --step add, then promote, then retire.

    With --control-plane, the running mesh is asked first: promote waits until every
    sidecar trusts both roots, retire until every sidecar runs a leaf under the new root.
    """
    if (step is None) == (not status):
        raise InputError("give exactly one of --step add|promote|retire and --status")
    in_use = [(str(p), _load_chain(p, "--still-in-use file")) for p in _split_files(still_in_use)]
    state = cadir.load(directory)
    mesh = _mesh_report(control_plane, token_file) if control_plane else None
    if status:
        info = _status(state, in_use)
        if mesh is not None:
            waiting = meshcheck.blockers(mesh, state.next_step)
            info["mesh"] = {"clients": len(mesh.get("clients", [])), "waiting_for": waiting}
        if output == "json":
            click.echo(json.dumps(info, indent=2))
            return
        click.echo(f"trust domain  {info['trust_domain']}")
        for r in info["roots"]:
            click.echo(
                f"root          {r['fingerprint']}  {r['role']:<8}  valid until {r['not_after']}"
            )
        click.echo(f"next step     {info['next_step_help']}")
        for entry in info["blocking"]:
            click.echo(f"blocking      {entry['file']} {entry['reason']}")
        if "mesh" in info:
            waiting = info["mesh"]["waiting_for"]
            verdict = "not yet: waiting for" if waiting else "ready for this step"
            click.echo(f"mesh          {info['mesh']['clients']} client(s); {verdict}")
            for reason in waiting:
                click.echo(f"waiting       {reason}")
        return
    assert step is not None  # exactly one of --step and --status, checked above
    chosen = cadir.Step(step)
    if mesh is not None and not force and (waiting := meshcheck.blockers(mesh, chosen)):
        raise ConflictError(
            f"the mesh is not ready to {chosen.value}: {waiting[0]}"
            + (f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else "")
            + "; wait and check `--status`, or pass --force"
        )
    change = cadir.plan_root_step(
        state,
        chosen,
        _now(),
        root_ttl=_ttl(root_ttl, "--root-ttl"),
        issuer_ttl=_ttl(issuer_ttl, "--issuer-ttl"),
        still_in_use=in_use,
    )
    cadir.apply(directory, change)
    after = cadir.load(directory)
    if control_plane:
        _client(control_plane, token_file).post("/v1/ca/reload")  # push the change now
    click.echo(f"{chosen.value}: done; bundle.pem now holds {len(after.bundle)} root(s)")
    click.echo(f"next step: {_STEP_HELP[after.next_step]}")
