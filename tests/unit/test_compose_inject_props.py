"""Properties of `meshlet inject` over generated compose files: services with random
subsets of keys (ports in every syntax, networks as list or map, depends_on as list or
map, DNS settings, x-meshlet options), written in a random indentation style, with
comments and blank lines sprinkled between the lines.

inject(inject(x)) == inject(x) and uninject(inject(x)) == x, byte for byte, where x is
the file as ruamel writes it back (the same bytes for one consistent style).
"""

from __future__ import annotations

import io
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from compose.inject import inject, uninject
from compose.inject_build import Settings
from compose.inject_yaml import load

SETTINGS = Settings(project="demo")
names = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
ports = st.integers(min_value=1, max_value=14999)
port_entries = st.one_of(
    ports,
    ports.map(str),
    st.tuples(ports, ports).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(ports, ports).map(lambda t: f"127.0.0.1:{t[0]}:{t[1]}"),
    st.tuples(ports, ports).map(lambda t: {"target": t[0], "published": t[1]}),
    ports.map(lambda p: f"{p}/udp"),
)
words = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True)
label_values = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,6}[a-z0-9])?", fullmatch=True)
ips = st.integers(min_value=1, max_value=254).map(lambda n: f"198.18.0.{n}")
network_settings = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={"aliases": st.lists(names, min_size=1, max_size=2)}),
)
networks = st.one_of(
    st.lists(names, min_size=1, max_size=3, unique=True),
    st.dictionaries(names, network_settings, min_size=1, max_size=3),
)
depends = st.one_of(
    st.lists(names, min_size=1, max_size=3, unique=True),
    st.dictionaries(
        names,
        st.fixed_dictionaries(
            {"condition": st.sampled_from(["service_started", "service_healthy"])}
        ),
        min_size=1,
        max_size=3,
    ),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "inject": st.booleans(),
        "labels": st.dictionaries(st.sampled_from(["version", "track"]), label_values, max_size=2),
        "replicas": st.integers(min_value=1, max_value=3),
        "exclude-ports": st.lists(ports, max_size=2),
    },
)
services = st.fixed_dictionaries(
    {"image": words},
    optional={
        "ports": st.lists(port_entries, min_size=1, max_size=3),
        "expose": st.lists(ports.map(str), min_size=1, max_size=2),
        "networks": networks,
        "depends_on": depends,
        "hostname": names,
        "dns": st.lists(ips, min_size=1, max_size=2),
        "extra_hosts": st.lists(ips.map(lambda ip: f"host.test:{ip}"), min_size=1, max_size=2),
        "environment": st.dictionaries(st.from_regex(r"[A-Z]{1,6}", fullmatch=True), words),
        "command": st.lists(words, min_size=1, max_size=3),
        "restart": st.sampled_from(["always", "no", "on-failure"]),
        "x-meshlet": options,
    },
)


def _labels_need_a_port(svc: dict[str, Any]) -> dict[str, Any]:
    """Labels describe serving replicas: a service with labels gets a port of its own
    (without one, inject refuses them, as it should)."""
    opts = svc.get("x-meshlet", {})
    if opts.get("labels"):
        free = next(p for p in (8080, 8081, 8082) if p not in opts.get("exclude-ports", []))
        svc = {**svc, "expose": [*svc.get("expose", []), str(free)]}
    return svc


documents = st.fixed_dictionaries(
    {"services": st.dictionaries(names, services.map(_labels_need_a_port), min_size=1, max_size=4)},
    optional={
        "volumes": st.dictionaries(names, st.none(), min_size=1, max_size=2),
        "networks": st.dictionaries(names, st.none(), min_size=1, max_size=2),
    },
)
styles = st.sampled_from([(2, 4, 2), (2, 2, 0), (4, 6, 4), (4, 4, 2)])
flows = st.booleans()


def _write(doc: dict[str, Any], style: tuple[int, int, int], flow: bool) -> str:
    services = CommentedMap()  # a one-line flow service ({image: x}) that inject changes
    for name, svc in doc["services"].items():  # gets its end-of-line comment moved right
        services[name] = CommentedMap(svc)  # on uninject (the same known limitation)
        services[name].fa.set_block_style()
    doc = {**doc, "services": services}
    for key in ("volumes", "networks"):  # inject adds an entry to these: a flow mapping's
        if key in doc:  # end-of-line comment would move right (a known limitation)
            block = CommentedMap(doc[key])
            block.fa.set_block_style()
            doc[key] = block
    yaml = YAML(typ="rt", pure=True)
    yaml.indent(mapping=style[0], sequence=style[1], offset=style[2])
    yaml.default_flow_style = None if flow else False
    yaml.width = 4096
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


@st.composite
def compose_files(draw: st.DrawFn) -> str:
    """A generated compose file with comment lines and blank lines inserted, then written
    back the way ruamel writes it (which is the same for one consistent style)."""
    text = _write(draw(documents), draw(styles), draw(flows))
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        kind = draw(st.sampled_from(["none", "none", "none", "comment", "blank", "eol"]))
        following = lines[i + 1] if i + 1 < len(lines) else ""
        indent = len(following) - len(following.lstrip(" "))
        if kind == "comment":
            out.append(" " * indent + f"# note {i}\n")
        elif kind == "blank":
            out.append("\n")
        elif kind == "eol" and ": |" not in line and ": >" not in line:
            out[-1] = line.rstrip("\n") + f"  # eol {i}\n"
    return load("".join(out), source="generated").dump()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compose_files())
def test_uninject_gives_back_the_bytes_and_inject_is_idempotent(text: str) -> None:
    injected = inject(text, source="generated.yml", settings=SETTINGS)
    assert uninject(injected.text, source="generated.yml").text == text
    assert inject(injected.text, source="generated.yml", settings=SETTINGS).text == injected.text
