"""Regenerate tests/ecs_fields.json from a checkout of github.com/elastic/ecs:

    python3 tests/gen_ecs_fields.py /path/to/ecs > tests/ecs_fields.json

Takes from generated/csv/fields.csv the name and type of every field of the
field sets fimwatch's ECS output uses, and from generated/ecs/ecs_flat.yml the
allowed values of event.kind, event.category and event.type."""

import csv
import io
import json
import re
import subprocess
import sys

SETS = {"base", "ecs", "event", "file", "host", "log", "process", "user", "related", "package"}


def git(repo, *args):
    return subprocess.run(["git", "-C", repo] + list(args), check=True,
                          stdout=subprocess.PIPE, text=True).stdout


def allowed(flat, field):
    block = re.search(r"(?ms)^%s:\n(.*?)(?=^\S)" % re.escape(field), flat).group(1)
    part = block.split("  allowed_values:", 1)[1]
    part = re.split(r"(?m)^  [a-z_]+:", part, 1)[0]
    return re.findall(r"(?m)^  - .*?name: (\S+)|^    name: (\S+)", part)


def main(repo):
    commit = git(repo, "rev-parse", "HEAD").strip()
    rows = list(csv.DictReader(io.StringIO(git(repo, "show", "HEAD:generated/csv/fields.csv"))))
    flat = git(repo, "show", "HEAD:generated/ecs/ecs_flat.yml")
    fields = {r["Field"]: r["Type"] for r in rows if r["Field_Set"] in SETS}
    out = {"source": "github.com/elastic/ecs %s generated/csv/fields.csv and "
                     "generated/ecs/ecs_flat.yml (ECS %s)" % (commit, rows[0]["ECS_Version"]),
           "allowed_values": {f: sorted(a or b for a, b in allowed(flat, f))
                              for f in ("event.kind", "event.category", "event.type")},
           "fields": dict(sorted(fields.items()))}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
