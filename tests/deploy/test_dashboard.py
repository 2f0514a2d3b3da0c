"""deploy/grafana/specdec-dashboard.json: valid Grafana JSON, in step with the metric catalog.

Every `ray_specdec_*` series a query names must be one the catalog exports, with the suffix its kind
allows (`_total` for counters, `_bucket`/`_sum`/`_count` for histograms, none for gauges); every
catalog metric must be shown by some panel, so a new metric cannot go unshown. The PromQL is
checked for the mistakes that make a panel silently empty or wrong: unbalanced brackets, `rate()`
of a gauge or a raw counter, a quantile not grouped by `le`, a label the metric does not carry, and
a template variable that is not defined.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cluster.observability.catalog import CATALOG, MetricSpec

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "specdec-dashboard.json"

EXPORTED = {m.exported: m for m in CATALOG}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SERVE_LABELS = {"deployment", "replica", "application"}  # added by Ray Serve to every metric
COMMON_LABELS = SERVE_LABELS | {"model"}  # ours add model everywhere
METRIC_RE = re.compile(r"\bray_specdec_[a-z0-9_]+")
ANY_METRIC_RE = re.compile(r"\bray_(?:specdec|serve)_[a-z0-9_]+")
RATE_RE = re.compile(r"\b(?:rate|irate|increase)\(")
AGG_BY_RE = re.compile(r"\b(?:sum|count|max|min|avg) by \(([^)]*)\) \(")
VARIABLE_RE = re.compile(r"\$\{?([A-Za-z_]\w*)")


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, with the panels of collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]


def variable_queries(dashboard: dict) -> list[str]:
    out = []
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        out.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return out


def resolve(series: str) -> tuple[MetricSpec, str]:
    """The catalog metric behind a scraped series name, and the histogram suffix used (or '')."""
    if series in EXPORTED:
        spec = EXPORTED[series]
        assert spec.kind != "histogram", (
            f"{series}: a histogram is scraped only as _bucket/_sum/_count"
        )
        return spec, ""
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in EXPORTED:
            spec = EXPORTED[base]
            assert spec.kind == "histogram", f"{series}: {suffix} on a {spec.kind}"
            return spec, suffix
    raise AssertionError(f"{series}: not a series the catalog exports")


def closing(expr: str, open_at: int) -> int:
    """Index of the bracket that closes the one at open_at (quoted strings skipped)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    i = open_at
    while i < len(expr):
        ch = expr[i]
        if ch == '"':
            i = expr.index('"', i + 1)
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch in pairs.values():
            assert stack and stack.pop() == ch, f"unbalanced {ch!r} at {i}: {expr}"
            if not stack:
                return i
        i += 1
    raise AssertionError(f"unclosed bracket at {open_at}: {expr}")


def call_args(expr: str, pattern: re.Pattern) -> list[tuple[re.Match, str]]:
    """(match, argument text) for each call whose opening parenthesis ends the pattern's match."""
    out = []
    for match in pattern.finditer(expr):
        open_at = match.end() - 1
        out.append((match, expr[open_at + 1 : closing(expr, open_at)]))
    return out


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(series, {label: (operator, value)}) for each metric selector; every one has braces."""
    out = []
    for match in ANY_METRIC_RE.finditer(expr):
        assert expr[match.end() : match.end() + 1] == "{", f"{match[0]} without a selector: {expr}"
        body = expr[match.end() + 1 : closing(expr, match.end())]
        found = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body)
        labels = {label: (op, value) for label, op, value in found}
        assert len(labels) == len(found) == body.count('"') // 2, f"bad selector: {expr}"
        out.append((match[0], labels))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load()


# -- structure --------------------------------------------------------------------------------


def test_is_a_grafana_dashboard(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None  # importable into any Grafana
    assert [p["type"] for p in dashboard["panels"]].count("row") >= 5
    assert len(query_panels(dashboard)) >= 20


def test_panels_have_unique_ids_a_datasource_and_queries(dashboard):
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in query_panels(dashboard):
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert panel["datasource"]["uid"] in ("$datasource", "${datasource}"), where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            if "datasource" in target:
                assert target["datasource"]["uid"] in ("$datasource", "${datasource}"), where


def test_panels_do_not_overlap(dashboard):
    taken: dict[tuple[int, int], int] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["id"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"panels {taken[(x, y)]} and {panel['id']} overlap"
                taken[(x, y)] = panel["id"]


# -- the catalog, both ways -------------------------------------------------------------------


def test_every_series_queried_is_in_the_catalog_with_its_kinds_suffix(dashboard):
    names = [
        n for e in exprs(dashboard) + variable_queries(dashboard) for n in METRIC_RE.findall(e)
    ]
    assert names
    for name in names:
        spec, suffix = resolve(name)
        if name.endswith("_total"):
            assert spec.kind == "counter", name
        if suffix == "_bucket":
            assert spec.kind == "histogram", name


def test_every_catalog_metric_is_shown(dashboard):
    shown = {resolve(n)[0].name for e in exprs(dashboard) for n in METRIC_RE.findall(e)}
    missing = sorted(m.exported for m in CATALOG if m.name not in shown)
    assert not missing, f"catalog metrics no panel shows: {missing}"


# -- PromQL sanity ----------------------------------------------------------------------------


def test_brackets_are_balanced(dashboard):
    for expr in exprs(dashboard) + variable_queries(dashboard):
        stack = []
        i = 0
        while i < len(expr):
            ch = expr[i]
            if ch == '"':
                i = expr.index('"', i + 1)  # ValueError: an unclosed quote
            elif ch in "({[":
                stack.append(")}]"["({[".index(ch)])
            elif ch in ")}]":
                assert stack and stack.pop() == ch, f"unbalanced {ch!r} at {i}: {expr}"
            i += 1
        assert not stack, f"unclosed {stack}: {expr}"


def test_rate_only_over_counters_and_histogram_series_and_they_always_are_rated(dashboard):
    for expr in exprs(dashboard):
        rated = 0
        for _, arg in call_args(expr, RATE_RE):
            names = ANY_METRIC_RE.findall(arg)
            assert len(names) == 1, f"one series per rate(): {expr}"
            if not names[0].startswith("ray_specdec_"):
                continue  # Serve's own
            spec, suffix = resolve(names[0])
            assert spec.kind == "counter" or suffix, f"rate() of a {spec.kind}: {expr}"
            assert re.search(r"\[[^\]]+\]$", arg), f"rate() without a range: {expr}"
            rated += 1
        cumulative = [n for n in METRIC_RE.findall(expr) if resolve(n)[0].kind != "gauge"]
        # each counter or histogram series is inside a rate(): unrated, a total since start
        assert len(cumulative) == rated, f"a counter used raw: {expr}"


def test_histogram_quantiles_group_by_le_over_buckets(dashboard):
    quantiles = 0
    for expr in exprs(dashboard):
        for _, arg in call_args(expr, re.compile(r"\bhistogram_quantile\(")):
            quantiles += 1
            phi, inner = arg.split(",", 1)
            assert 0 < float(phi) < 1, expr
            names = METRIC_RE.findall(inner)
            assert names and all(n.endswith("_bucket") for n in names), expr
            by = AGG_BY_RE.search(inner)
            assert by and "le" in [s.strip() for s in by[1].split(",")], f"not by le: {expr}"
    assert quantiles >= 10


def test_labels_grouped_filtered_and_shown_are_carried_by_the_metric(dashboard):
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for series, labels in selectors(expr):
                if series.startswith("ray_specdec_"):
                    spec, suffix = resolve(series)
                    carried = COMMON_LABELS | set(spec.tags) | ({"le"} if suffix else set())
                    assert set(labels) <= carried, f"{series} has no {set(labels) - carried}"
            grouped = set()
            # one spelling, so that every grouping is checked: `sum by (labels) (...)`
            assert len(re.findall(r"\bby\b", expr)) == len(AGG_BY_RE.findall(expr)), expr
            assert "without" not in expr, expr
            for match, arg in call_args(expr, AGG_BY_RE):
                by = {s.strip() for s in match[1].split(",")}
                grouped |= by
                for series in METRIC_RE.findall(arg):
                    spec, suffix = resolve(series)
                    carried = COMMON_LABELS | set(spec.tags) | ({"le"} if suffix else set())
                    assert by <= carried, f"{series} has no {by - carried}: {expr}"
                for series in re.findall(r"\bray_serve_[a-z0-9_]+", arg):
                    assert by <= SERVE_LABELS, f"{series} has no {by - SERVE_LABELS}: {expr}"
            shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert shown <= grouped, f"legend shows {shown - grouped}, not grouped by: {expr}"


def test_every_selector_filters_by_application_and_model(dashboard):
    for expr in exprs(dashboard):
        for series, labels in selectors(expr):
            assert labels.get("application") == ("=~", "$application"), expr
            if series.startswith("ray_specdec_"):  # Serve's own metrics carry no model
                assert labels.get("model") == ("=~", "$model"), expr


def test_template_variables_are_defined_before_use(dashboard):
    variables = dashboard["templating"]["list"]
    names = [v["name"] for v in variables]
    by_name = {v["name"]: v for v in variables}
    assert by_name["datasource"]["type"] == "datasource"
    assert by_name["datasource"]["query"] == "prometheus"
    for name in ("application", "model"):
        var = by_name[name]
        assert var["type"] == "query" and var["datasource"]["uid"] in (
            "$datasource",
            "${datasource}",
        )
        query = var["query"]["query"]
        assert re.fullmatch(rf"label_values\(ray_specdec_[a-z0-9_]+(\{{.*\}})?, {name}\)", query)
    for i, query in enumerate(variable_queries(dashboard)):
        for used in VARIABLE_RE.findall(query):
            assert used in names[:i], f"variable {names[i]} uses ${used}, not defined before it"
    used = set()
    for panel in query_panels(dashboard):
        used |= set(VARIABLE_RE.findall(json.dumps(panel["datasource"])))
        for target in panel["targets"]:
            used |= set(VARIABLE_RE.findall(target["expr"]))
    used = {u for u in used if not u.startswith("__")}  # Grafana's own: $__rate_interval, ...
    assert {"datasource", "application", "model"} <= used
    assert used <= set(names), f"undefined variables: {used - set(names)}"
