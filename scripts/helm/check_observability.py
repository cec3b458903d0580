#!/usr/bin/env python3
"""Checks what the chart ships for monitoring: the alert rules
(helm/chime/files/prometheus/chime-rules.yaml), their promtool tests
(helm/chime/ci/prometheus-rules.test.yaml) and the Grafana dashboard
(helm/chime/files/grafana/chime-dashboard.json). scripts/helm/observability.sh runs
`promtool check rules` and `promtool test rules` first, then this.

  1. alert rules: names Chime*, a severity label (warning or critical), summary and
     description annotations that use Prometheus' templates ($labels, $value), no
     (alert, severity) twice; every alert (each of its severities) has a test case
     where it fires, with its exact labels and annotations, and one where it must not
     (exp_alerts: []); helm/chime/README.md lists every alert;
  2. dashboard: uid chime-overview, a `datasource` template variable (type datasource,
     prometheus), unique panel ids, a gridPos on every panel within the 24 columns and
     no two panels overlapping, every panel and target on ${datasource}, every panel
     with a target that has an expr, no template variable the dashboard does not
     define; every expr, with $__rate_interval / $__interval / $__range as 5m and the
     dashboard's variables as their "All" value, goes into a temporary rules file as a
     recording rule for `promtool check rules` (so every expression parses);
  3. metric names: every chime_* name in the rules, their tests and the dashboard is
     declared in shared/src/telemetry.rs (`pub const ... = "chime_..."`; histograms'
     _bucket/_sum/_count series count as their histogram). Declared metrics that the
     dashboard does not show are listed as notes.

    python3 scripts/helm/check_observability.py --promtool target/promtool/promtool
Needs PyYAML (target/helm-pydeps). Exit status 0 when everything passed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "chime"
RULES = CHART / "files" / "prometheus" / "chime-rules.yaml"
TESTS = CHART / "ci" / "prometheus-rules.test.yaml"
DASHBOARD = CHART / "files" / "grafana" / "chime-dashboard.json"
README = CHART / "README.md"
TELEMETRY = REPO / "shared" / "src" / "telemetry.rs"

SEVERITIES = ("warning", "critical")
DASHBOARD_UID = "chime-overview"
# Grafana's built-in interval variables, as a rules file has to see them.
BUILTIN_VARS = {"__rate_interval": "5m", "__interval": "5m", "__range": "5m"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC = re.compile(r"\bchime_[a-z_]+\b")
# $var, ${var}, ${var:fmt} and [[var]]
VAR_REF = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


# ------------------------------------------------------------------ alert rules


def alerts_of(rules_doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, rule) of every alerting rule."""
    out = []
    for g in rules_doc.get("groups") or []:
        for rule in g.get("rules") or []:
            if "alert" in rule:
                out.append((g.get("name", "?"), rule))
    return out


def check_rules(r: Report, rules_doc: dict[str, Any], tests_doc: dict[str, Any]) -> list[str]:
    print(f"alert rules ({rel(RULES)}) and their tests ({rel(TESTS)})")
    where = rel(RULES)
    alerts = alerts_of(rules_doc)
    r.check(bool(alerts), f"{where}: no alerting rules")
    seen: set[tuple[str, str]] = set()
    severities: dict[str, set[str]] = {}
    for group, rule in alerts:
        name = rule["alert"]
        what = f"{where}: group {group}, alert {name}"
        r.check(name.startswith("Chime"), f"{what}: the name does not start with Chime")
        sev = (rule.get("labels") or {}).get("severity")
        r.check(sev in SEVERITIES, f"{what}: severity {sev!r} is not one of {', '.join(SEVERITIES)}")
        r.check((name, sev) not in seen, f"{what}: a second rule with severity {sev!r}")
        seen.add((name, sev))
        severities.setdefault(name, set()).add(sev)
        ann = rule.get("annotations") or {}
        for key in ("summary", "description"):
            r.check(bool(str(ann.get(key, "")).strip()), f"{what}: no {key} annotation")
        text = " ".join(str(v) for v in ann.values())
        r.check("$labels" in text or "$value" in text,
                f"{what}: the annotations use neither $labels nor $value")
        r.check(bool(str(rule.get("expr", "")).strip()), f"{what}: no expr")

    # The tests: rule_files names the rules file; every alert fires and stays silent.
    files = [(TESTS.parent / f).resolve() for f in tests_doc.get("rule_files") or []]
    r.check(RULES.resolve() in files, f"{rel(TESTS)}: rule_files does not name {where}")
    fires: dict[str, set[str]] = {}
    silent: set[str] = set()
    for t in tests_doc.get("tests") or []:
        for case in t.get("alert_rule_test") or []:
            name = case.get("alertname", "")
            what = f"{rel(TESTS)}: test {t.get('name', '?')!r}, {name} at {case.get('eval_time')}"
            r.check(name in severities, f"{what}: no such alert in {where}")
            exp = case.get("exp_alerts") or []
            if not exp:
                silent.add(name)
            for e in exp:
                labels = e.get("exp_labels") or {}
                fires.setdefault(name, set()).add(labels.get("severity", ""))
                r.check("severity" in labels, f"{what}: an expected alert without its severity label")
                ann = e.get("exp_annotations") or {}
                rule_keys = {
                    k for _, rule in alerts if rule["alert"] == name
                    and (rule.get("labels") or {}).get("severity") == labels.get("severity")
                    for k in (rule.get("annotations") or {})
                }
                r.check(set(ann) == rule_keys,
                        f"{what}: exp_annotations {sorted(ann)} are not the alert's {sorted(rule_keys)} (expect them exactly)")
    for name, sevs in sorted(severities.items()):
        for sev in sorted(sevs):
            r.check(sev in fires.get(name, set()),
                    f"{rel(TESTS)}: alert {name} (severity {sev}) has no test case where it fires")
        r.check(name in silent, f"{rel(TESTS)}: alert {name} has no test case where it must not fire (exp_alerts: [])")

    # README: "Alerts and dashboard" lists every alert.
    readme = README.read_text()
    m = re.search(r"^## Alerts and dashboard\n(.*?)(?=^## )", readme, re.S | re.M)
    if r.check(m is not None, f"{rel(README)}: no section '## Alerts and dashboard'"):
        for name in sorted(severities):
            r.check(f"`{name}`" in m.group(1), f"{rel(README)}: 'Alerts and dashboard' does not list {name}")
    print(f"  {len(alerts)} alerting rules, {len(severities)} alerts, each tested firing and silent")
    return [str(rule.get("expr", "")) for _, rule in alerts_of(rules_doc)] + [
        str(rule.get("expr", "")) for g in rules_doc.get("groups") or [] for rule in g.get("rules") or []
        if "record" in rule
    ]


# ------------------------------------------------------------------ dashboard


def flat_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, with the panels of collapsed rows."""
    out = []
    for p in panels:
        out.append(p)
        out += flat_panels(p.get("panels") or [])
    return out


def is_ds_var(ds: Any, var: str) -> bool:
    if isinstance(ds, str):
        return ds in (f"${var}", f"${{{var}}}")
    return isinstance(ds, dict) and ds.get("uid") in (f"${var}", f"${{{var}}}") and ds.get("type", "prometheus") == "prometheus"


def substitute(expr: str, variables: dict[str, str]) -> tuple[str, list[str]]:
    """expr with every variable replaced; the names it references that have no value."""
    unknown: list[str] = []

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in variables:
            return variables[name]
        unknown.append(name)
        return m.group(0)

    return VAR_REF.sub(one, expr), unknown


def check_dashboard(r: Report, promtool: str) -> list[str]:
    print(f"Grafana dashboard ({rel(DASHBOARD)})")
    where = rel(DASHBOARD)
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        r.check(False, f"{where}: not JSON: {e}")
        return []
    r.check(dash.get("uid") == DASHBOARD_UID, f"{where}: uid {dash.get('uid')!r} is not {DASHBOARD_UID!r}")
    r.check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36,
            f"{where}: schemaVersion {dash.get('schemaVersion')!r} (expected a current one, 36 or newer)")
    r.check(bool(dash.get("title")), f"{where}: no title")
    templ = (dash.get("templating") or {}).get("list") or []
    by_name = {v.get("name"): v for v in templ}
    dsv = by_name.get("datasource")
    r.check(dsv is not None and dsv.get("type") == "datasource" and dsv.get("query") == "prometheus",
            f"{where}: no template variable 'datasource' of type datasource, query prometheus")
    # What a dashboard variable stands for in an expression: its "All" value, else its
    # current one; the datasource variable has no place in an expression.
    variables = dict(BUILTIN_VARS)
    for v in templ:
        name = v.get("name")
        if v.get("type") == "datasource":
            continue
        what = f"{where}: template variable {name!r}"
        if v.get("type") == "query":
            r.check(is_ds_var(v.get("datasource"), "datasource"), f"{what}: its query does not use ${{datasource}}")
        value = v.get("allValue") if v.get("includeAll") else None
        if value is None:
            cur = (v.get("current") or {}).get("value")
            value = cur if isinstance(cur, str) and cur else None
        if r.check(value is not None, f"{what}: neither an allValue nor a current value to check expressions with"):
            variables[name] = value

    panels = flat_panels(dash.get("panels") or [])
    ids = [p.get("id") for p in panels]
    dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    r.check(not dup, f"{where}: panel ids used twice: {dup}")
    r.check(all(isinstance(i, int) for i in ids), f"{where}: panels without an integer id: {[p.get('title') for p in panels if not isinstance(p.get('id'), int)]}")
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    exprs: list[tuple[str, str, str]] = []  # (panel and target, substituted expr, raw expr)
    for p in panels:
        what = f"{where}: panel {p.get('id')} {p.get('title')!r}"
        gp = p.get("gridPos")
        if r.check(isinstance(gp, dict) and all(isinstance(gp.get(k), int) for k in ("h", "w", "x", "y")),
                   f"{what}: no gridPos with integer h, w, x, y"):
            r.check(gp["x"] >= 0 and gp["w"] > 0 and gp["h"] > 0 and gp["x"] + gp["w"] <= 24,
                    f"{what}: gridPos {gp} is outside the 24 columns")
            box = (gp["x"], gp["y"], gp["x"] + gp["w"], gp["y"] + gp["h"])
            for other, ob in boxes:
                r.check(box[2] <= ob[0] or ob[2] <= box[0] or box[3] <= ob[1] or ob[3] <= box[1],
                        f"{what}: gridPos {gp} overlaps {other}")
            boxes.append((f"panel {p.get('id')} {p.get('title')!r}", box))
        if p.get("type") == "row":
            continue
        r.check(is_ds_var(p.get("datasource"), "datasource"), f"{what}: datasource {p.get('datasource')!r} is not ${{datasource}}")
        targets = p.get("targets") or []
        r.check(any(str(t.get("expr", "")).strip() for t in targets), f"{what}: no target with an expr")
        refs = [t.get("refId") for t in targets]
        r.check(len(refs) == len(set(refs)) and all(refs), f"{what}: refIds missing or repeated: {refs}")
        for t in targets:
            tw = f"{what} target {t.get('refId')}"
            r.check(is_ds_var(t.get("datasource"), "datasource"), f"{tw}: datasource {t.get('datasource')!r} is not ${{datasource}}")
            raw = str(t.get("expr", ""))
            if not raw.strip():
                continue
            expr, unknown = substitute(raw, variables)
            if r.check(not unknown, f"{tw}: references ${', $'.join(unknown)}, which the dashboard does not define (or which has no place in an expression)"):
                exprs.append((tw, expr, raw))
    for v in templ:
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else str(q or "")
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            if m:
                expr, unknown = substitute(m.group(1), variables)
                if r.check(not unknown, f"{where}: template variable {v.get('name')!r}: references ${', $'.join(unknown)}"):
                    exprs.append((f"{where}: template variable {v.get('name')!r}", expr, q))

    # Every expression parses: recording rules in a temporary rules file, for promtool.
    if exprs:
        ok = promtool_parses(promtool, [e for _, e, _ in exprs])
        if not r.check(ok is None, f"{where}: promtool check rules refused the dashboard's expressions"):
            for what, expr, _ in exprs:
                err = promtool_parses(promtool, [expr])
                r.check(err is None, f"{what}: expression does not parse: {err}\n      {expr}")
    n = len([p for p in panels if p.get("type") != "row"])
    print(f"  {n} panels in {len(panels) - n} rows, {len(exprs)} expressions parsed by promtool")
    return [raw for _, _, raw in exprs]


def promtool_parses(promtool: str, exprs: list[str]) -> str | None:
    """None when `promtool check rules` takes every expression as a recording rule,
    else its output."""
    import yaml

    doc = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}
    with tempfile.TemporaryDirectory(prefix="chime-dashboard-") as d:
        path = Path(d) / "dashboard-exprs.rules.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
        p = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    if p.returncode == 0:
        return None
    out = " ".join((p.stdout + p.stderr).split())
    # Drop the temporary file's name: "... could not parse expression: 1:36: parse error: ..."
    m = re.search(r"could not parse expression: (.*)", out)
    return m.group(1) if m else out


# ------------------------------------------------------------------ metric names


def declared_metrics() -> set[str]:
    return set(re.findall(r'^\s*pub const \w+: &str = "(chime_[a-z_]+)";', TELEMETRY.read_text(), re.M))


def check_metric_names(r: Report, sources: dict[str, list[str]]) -> None:
    print(f"metric names against {rel(TELEMETRY)}")
    declared = declared_metrics()
    r.check(bool(declared), f"{rel(TELEMETRY)}: no `pub const ... = \"chime_...\"` found")

    def known(name: str) -> bool:
        if name in declared:
            return True
        return any(name.endswith(s) and name[: -len(s)] in declared for s in HISTOGRAM_SUFFIXES)

    used: dict[str, set[str]] = {}
    for where, texts in sources.items():
        names = {n for t in texts for n in METRIC.findall(t)}
        used[where] = names
        for n in sorted(names):
            r.check(known(n), f"{where}: metric {n} is not declared in {rel(TELEMETRY)}")
    on_dashboard = {n if n in declared else re.sub(r"_(bucket|sum|count)$", "", n) for n in used.get(rel(DASHBOARD), set())}
    missing = sorted(declared - on_dashboard)
    if missing:
        r.note(f"{rel(DASHBOARD)} shows no panel of {', '.join(missing)}")
    print(f"  {len(declared)} metrics declared; {', '.join(f'{w}: {len(n)}' for w, n in used.items())} names used")


def test_series(tests_doc: dict[str, Any]) -> list[str]:
    out = []
    for t in tests_doc.get("tests") or []:
        out += [str(s.get("series", "")) for s in t.get("input_series") or []]
        out += [str(c.get("expr", "")) for c in t.get("promql_expr_test") or []]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--promtool", default="promtool", help="promtool binary (default: promtool on PATH)")
    args = ap.parse_args()
    try:
        import yaml
    except ImportError as e:
        sys.exit(f"{e}: run scripts/helm/observability.sh (PYTHONPATH=target/helm-pydeps)")

    r = Report()
    rules_doc = yaml.safe_load(RULES.read_text()) or {}
    tests_doc = yaml.safe_load(TESTS.read_text()) or {}
    rule_exprs = check_rules(r, rules_doc, tests_doc)
    dash_exprs = check_dashboard(r, args.promtool)
    check_metric_names(r, {rel(RULES): rule_exprs, rel(TESTS): test_series(tests_doc), rel(DASHBOARD): dash_exprs})
    for n in r.notes:
        print(f"note: {n}")
    if r.failures:
        print(f"check_observability.py: FAILED: {len(r.failures)} of {r.checks} checks failed")
        return 1
    print(f"check_observability.py: OK: {r.checks} checks passed (alert rules and their tests, dashboard, metric names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
