#!/usr/bin/env python3
"""Generates tern-cpu's catalogue data from the installed QEMU.

Writes crates/tern-cpu/data/qemu-cpu-models.json: the QEMU version, the x86 feature names
QEMU knows (canonical names and their aliases), the bool properties that are not CPUID
features, and the exact feature set of each vendor model tern offers as an EVC mode, as
QEMU's `query-cpu-model-expansion` (type "static") reports them. If QEMU has named x86-64-vN
models, their expansions are recorded too; so is qemu64, the generic model tern builds its own
x86-64 levels from.

Usage: scripts/gen-cpu-models.py [--qemu qemu-system-x86_64] [--out FILE | --out -]

QEMU is started with `-machine none -accel tcg -nodefaults -nographic -qmp stdio`: a model's
expansion does not depend on the accelerator (only `host`/`max` do, and they are not recorded).
tern-cpu's test `catalogue_matches_qemu` runs this script again and compares.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

# The EVC modes tern offers, in their vendor line's order (oldest first). Keep in step with
# crates/tern-cpu/src/catalogue.rs (INTEL_LINE, AMD_LINE); a test checks they agree.
INTEL = ["Nehalem", "Westmere", "SandyBridge", "IvyBridge", "Haswell", "Broadwell",
         "Skylake-Server", "Cascadelake-Server", "Icelake-Server", "SapphireRapids"]
AMD = ["EPYC", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa"]
LEVELS = ["x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4"]
# Generic models tern builds other CPUs from (the x86-64 levels start from qemu64 when QEMU has
# no x86-64-vN models of its own).
BASES = ["qemu64"]

# Static-expansion props that are not features (CPU identity and CPUID level minimums).
IDENTITY_PROPS = {"vendor", "family", "model", "stepping", "model-id"}
# Props only used to make an alias probe meaningful (svm sub-features need svm).
PROBE_BASE = {"svm": True}
# Never set these on a probe object.
NEVER_PROBE = {"realized"}

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates",
                           "tern-cpu", "data", "qemu-cpu-models.json")


class Qmp:
    """A QMP session over QEMU's stdio."""

    def __init__(self, qemu):
        # QEMU warns on stderr about each alias probe's dependencies: keep that quiet unless
        # QEMU dies.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [qemu, "-machine", "none", "-accel", "tcg", "-nodefaults", "-nographic",
             "-qmp", "stdio"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.stderr.seek(0)
                raise RuntimeError("QEMU closed its QMP stream: " + self.stderr.read().strip())
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        msg = self._read()
        if "error" in msg:
            raise QmpError(msg["error"].get("desc", str(msg["error"])))
        return msg["return"]

    def close(self):
        try:
            self.cmd("quit")
        except (RuntimeError, QmpError, BrokenPipeError):
            pass
        self.proc.wait(timeout=10)


class QmpError(Exception):
    pass


def static_props(qmp, name, props=None):
    model = {"name": name}
    if props:
        model["props"] = props
    return qmp.cmd("query-cpu-model-expansion", type="static", model=model)["model"]["props"]


def model_entry(qmp, name, qemu_model, features):
    props = static_props(qmp, name)
    return {
        "name": name,
        "qemu_model": qemu_model,
        "vendor": props.get("vendor", ""),
        "family": props.get("family", 0),
        "model": props.get("model", 0),
        "stepping": props.get("stepping", 0),
        "model_id": props.get("model-id", ""),
        "features": sorted(k for k, v in props.items() if v is True and k in features),
    }


def generate(qemu):
    qmp = Qmp(qemu)
    try:
        ver = qmp.cmd("query-version")
        q = ver["qemu"]
        defs = {d["name"]: d for d in qmp.cmd("query-cpu-definitions")}

        base = static_props(qmp, "base")
        features = sorted(k for k, v in base.items() if isinstance(v, bool))
        feature_set = set(features)
        # Everything in a static expansion is either a feature or identity/level data.
        unexpected = [k for k, v in base.items()
                      if not isinstance(v, bool) and k not in IDENTITY_PROPS
                      and not k.startswith("min-")]
        if unexpected:
            raise RuntimeError(f"static expansion has unknown non-bool props: {unexpected}")

        # Bool props of the full expansion that are not canonical features: aliases or other
        # CPU options. Setting one on `base` and seeing which canonical feature turns on tells
        # which it is; kvm_* aliases cannot be probed under TCG (the KVM leaf is dropped), so
        # those fall back to QEMU's naming rule (`_` for `-`).
        full = qmp.cmd("query-cpu-model-expansion", type="full",
                       model={"name": "base"})["model"]["props"]
        probe_base = static_props(qmp, "base", dict(PROBE_BASE))
        aliases, non_feature = {}, []
        for key in sorted(k for k, v in full.items() if isinstance(v, bool)):
            if key in feature_set:
                continue
            turned_on = []
            if key not in NEVER_PROBE:
                probed = static_props(qmp, "base", dict(PROBE_BASE, **{key: True}))
                turned_on = [f for f in features
                             if probed.get(f) is True and probe_base.get(f) is not True]
            if len(turned_on) == 1:
                aliases[key] = turned_on[0]
            elif not turned_on and key.replace("_", "-") in feature_set:
                aliases[key] = key.replace("_", "-")
            elif not turned_on:
                non_feature.append(key)
            else:
                raise RuntimeError(f"{key} turns on several features: {turned_on}")

        models = []
        for name in INTEL + AMD:
            if name not in defs:
                raise RuntimeError(f"QEMU has no CPU model {name}")
            target = defs[name].get("alias-of") or name
            models.append(model_entry(qmp, name, target, feature_set))
        levels = []
        for name in LEVELS:
            if name in defs:
                target = defs[name].get("alias-of") or name
                levels.append(model_entry(qmp, name, target, feature_set))
        bases = []
        for name in BASES:
            target = defs[name].get("alias-of") or name
            bases.append(model_entry(qmp, name, target, feature_set))
    finally:
        qmp.close()

    return {
        "generated_by": "scripts/gen-cpu-models.py",
        "qemu_version": f"{q['major']}.{q['minor']}.{q['micro']}",
        "qemu_package": ver.get("package", ""),
        "features": features,
        "aliases": aliases,
        "non_feature_props": non_feature,
        "models": models,
        "levels": levels,
        "bases": bases,
    }


def wrap_list(items, indent, width=100):
    """A JSON list of strings wrapped to `width` columns, for a readable diff."""
    if not items:
        return "[]"
    lines, cur = [], ""
    for s in (json.dumps(i) for i in items):
        piece = s if not cur else cur + ", " + s
        if len(" " * (indent + 2) + piece) > width and cur:
            lines.append(cur + ",")
            cur = s
        else:
            cur = piece
    lines.append(cur)
    pad = " " * (indent + 2)
    return "[\n" + "\n".join(pad + l for l in lines) + "\n" + " " * indent + "]"


def render(data):
    out = ["{"]
    for key in ["generated_by", "qemu_version", "qemu_package"]:
        out.append(f"  {json.dumps(key)}: {json.dumps(data[key])},")
    out.append(f'  "features": {wrap_list(data["features"], 2)},')
    alias_items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data["aliases"].items()]
    out.append('  "aliases": {\n    ' + ",\n    ".join(alias_items) + "\n  },")
    out.append(f'  "non_feature_props": {wrap_list(data["non_feature_props"], 2)},')
    for section in ["models", "levels", "bases"]:
        entries = []
        for m in data[section]:
            fields = [f"      {json.dumps(k)}: {json.dumps(m[k])}" for k in m if k != "features"]
            fields.append(f'      "features": {wrap_list(m["features"], 6)}')
            entries.append("    {\n" + ",\n".join(fields) + "\n    }")
        body = "[\n" + ",\n".join(entries) + "\n  ]" if entries else "[]"
        out.append(f'  {json.dumps(section)}: {body}' + ("" if section == "bases" else ","))
    out.append("}")
    text = "\n".join(out) + "\n"
    assert json.loads(text) == data, "renderer lost data"
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output file, or - for stdout")
    args = ap.parse_args()
    text = render(generate(args.qemu))
    if args.out == "-":
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {os.path.normpath(args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
