#!/usr/bin/env python3
"""Checks the operations pack: the Grafana dashboard and the Kubernetes manifests.

Standard library only (Python >= 3.11); PyYAML is used when it is importable.

  check_ops.py --dashboard envoy/grafana/llm-meter.json
      Validates the dashboard: it parses, has no `__inputs` (so it can be provisioned as a file),
      the `datasource`, `model` and `app` template variables exist, panel ids and titles are
      unique, panels do not overlap, every panel and target uses the `${datasource}` variable,
      every target has a refId and a PromQL `expr` that uses only known metric names (llm-meter's,
      Envoy's, and the recording rules envoy/prometheus/alerts.yml defines), filters
      `model=~"$model"` (`gen_ai_request_model=~"$model"` for the OpenTelemetry GenAI instruments)
      and `app=~"$app"` where the metric has that label, and is well formed.

  check_ops.py --exprs envoy/grafana/llm-meter.json
      Validates as above, then prints every expression with Grafana's variables substituted
      (`$model`, `$app` -> `.*`, `$__rate_interval`, `$__interval` -> `1m`, `$__range` -> `1h`),
      one JSON object per line: {"source": "grafana:<panel title>/<refId>", "expr": "..."}, plus
      "may_be_empty": true for targets marked `"mayBeEmpty": true` in the dashboard (series that
      only exist after rare events, e.g. rate-limit key overflow).

  check_ops.py --yaml envoy/k8s/*.yaml [--structural] [--schemas target/ops-schemas]
      Validates Kubernetes manifests: multi-document YAML (parsed with PyYAML when available and
      --structural is not given, otherwise a structural check: no tabs in indentation, `---`
      separators, every document has top-level `apiVersion`, `kind` and `metadata.name`; a file
      named *.patch.yaml is a strategic merge patch of a Deployment and has neither). The llm-meter
      JSON configuration found between the `# llm-meter configuration begin` / `end` markers must
      parse as JSON and have the same keys as the one in envoy/envoy.yaml (with PyYAML, it must
      also be what the manifest field actually holds); `stats_tags` and
      `histogram_bucket_settings` (entries and order) must match envoy/envoy.yaml's. Istio splits
      the tags: `extraStatTags` names the tags whose regex is the `(<tag>=\\.=(.*?);\\.;)` that
      istio-agent renders for a name, and custom_bootstrap.json's stats_tags holds the others (the
      OpenTelemetry GenAI tags, whose keys end in `_`), with envoy.yaml's regexes.
      With PyYAML, also what Istio and Envoy Gateway do with the objects: no EnvoyFilter patches
      BOOTSTRAP (Istio >= 1.21 ignores such patches); a WasmPlugin comes with a workload patch whose
      pod annotations set `proxy.istio.io/config` extraStatTags (as above) and
      `sidecar.istio.io/bootstrapOverride` naming a ConfigMap, in the WasmPlugin's namespace, whose
      custom_bootstrap.json holds envoy.yaml's buckets and the tags extraStatTags cannot express,
      and nothing else (Envoy merges it into Istio's bootstrap: lists are appended, single values
      replace Istio's); an EnvoyProxy bootstrap holds envoy.yaml's stats_tags and buckets; the CRDs' CEL
      rules that apply (restated by hand). Wrong copies of the manifests must fail these rules (a
      self-test on every run).
      --schemas DIR: also validates every object the way the API server would, against the
      schemas of the npm packages installed in DIR (`just ops-schemas`; tools/k8s_schema.mjs under
      Node.js): types, enums, required fields, and fields the schema does not declare (which the API
      server prunes) are errors; wrong copies of the manifests must fail.

Exits 1 with one line per problem on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"

PANEL_TYPES = {"timeseries", "stat", "bargauge", "table", "state-timeline"}
DATASOURCE = "${datasource}"
GRID_WIDTH = 24

# llm-meter's metrics (prefix `llm`) and their labels, as /stats/prometheus prints them with the
# shipped stats_tags (docs/metrics.md, "Metrics reference"). Histograms also have `_bucket` (with `le`),
# `_sum` and `_count` series.
COUNTERS = {
    "llm_requests_total": {"model", "app", "operation", "status", "error_type"},
    "llm_tokens_total": {"model", "app", "token_type"},
    "llm_cost_microusd_total": {"model", "app"},
    "llm_usage_missing_total": {"model"},
    "llm_meter_skips_total": {"reason"},
    "llm_meter_errors_total": {"kind"},
    "llm_ratelimit_rejected_total": {"model", "rule", "mode"},
    "llm_ratelimit_warnings_total": {"rule"},
    "llm_ratelimit_key_overflow_total": {"rule"},
    "llm_ratelimit_service_errors_total": {"rule"},
    "llm_circuit_transitions_total": {"model", "state"},
    "llm_fallbacks_total": {"model", "to"},
    "llm_upstream_retries_total": {"model"},
}
HISTOGRAMS = {
    "llm_request_duration_ms": {"model"},
    "llm_time_to_first_token_ms": {"model"},
    "llm_tokens_per_request": {"model", "token_type"},
    "llm_time_per_output_token_ms": {"model"},
    # The OpenTelemetry GenAI instruments (`metrics.naming: otel` or `both`; src/meter/metrics.rs):
    # no `llm` prefix, and the model is `gen_ai_request_model`.
    "gen_ai_client_token_usage": {"gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                                  "gen_ai_token_type"},
    "gen_ai_server_request_duration_ms": {"gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                                          "error_type"},
    "gen_ai_server_time_to_first_token_ms": {"gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"},
    "gen_ai_server_time_per_output_token_ms": {"gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"},
}
# The label holding the model, and the matcher a dashboard query over a metric with it must have.
MODEL_LABELS = {"model": 'model=~"$model"', "gen_ai_request_model": 'gen_ai_request_model=~"$model"'}
GAUGES = {
    "llm_active_requests": {"model"},
    "llm_upstream_ratelimit_remaining": {"model", "kind"},
    "llm_upstream_ratelimit_limit": {"model", "kind"},
    "llm_meter_memory_bytes": set(),
    "llm_meter_memory_budget_bytes": set(),
    "llm_model_state": {"model"},
    "llm_ratelimit_used": {"rule"},
    "llm_ratelimit_limit": {"rule"},
    "llm_output_tokens_estimate": {"model"},
}
# Recording rules of envoy/prometheus/alerts.yml (`- record:`) and their labels: a dashboard
# query over one needs those rules loaded, so each must be defined there. Named
# level:metric:operations, the level being the labels kept.
RECORDING_RULES = {
    "llm_ratelimit_used_ratio": {"rule"},
    "model:llm_requests_upstream_errors:ratio_rate5m": {"model"},
    "model_token_type:llm_tokens:per_minute_rate5m": {"model", "token_type"},
    "model_app:llm_cost_usd:increase1h": {"model", "app"},
    "model_app:llm_cost_usd:increase1d": {"model", "app"},
}
ALERTS_YML = ROOT / "envoy" / "prometheus" / "alerts.yml"
# Series that only exist after rare events (or with a configuration few have): a query over
# nothing else must be marked mayBeEmpty (or fall back to a value with `or vector(...)`).
SPARSE = {
    "llm_meter_skips_total",
    "llm_ratelimit_key_overflow_total",
    "llm_ratelimit_service_errors_total",
    "llm_model_state",
    "llm_circuit_transitions_total",
    "llm_fallbacks_total",
    "llm_upstream_retries_total",
    "llm_ratelimit_warnings_total",
    "llm_output_tokens_estimate",
    # Only with `metrics.naming: otel` or `both` (the default naming has none of them).
    *(f"{base}{series}" for base in HISTOGRAMS if base.startswith("gen_ai_") for series in ("_bucket", "_sum", "_count")),
}


def llm_metric_labels(name: str) -> set[str] | None:
    """Labels of an llm-meter series name, or None if the name is unknown."""
    if name in COUNTERS:
        return COUNTERS[name]
    if name in GAUGES:
        return GAUGES[name]
    if name in RECORDING_RULES:
        return RECORDING_RULES[name]
    for base, labels in HISTOGRAMS.items():
        if name == base + "_bucket":
            return labels | {"le"}
        if name in (base + "_sum", base + "_count"):
            return labels
    return None


# Grafana variables and what a real query gets in their place (the `All` value of the model and
# app variables is `.*`).
SUBSTITUTIONS = {
    "model": ".*",
    "app": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str) -> tuple[str, list[str]]:
    unknown: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in SUBSTITUTIONS:
            return SUBSTITUTIONS[name]
        unknown.append("$" + name)
        return m.group(0)

    return VARIABLE.sub(repl, expr), unknown


# ---------------------------------------------------------------------------------------------
# PromQL well-formedness (the real parse happens in Prometheus, see tests/prometheus.rs)

def strip_strings(expr: str) -> tuple[str, str | None]:
    """The expression with string literals blanked out, or an error for an unterminated one."""
    out = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            if j >= len(expr):
                return "", f"unterminated string starting at column {i + 1}"
            out.append('""')
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out), None


def bracket_error(expr: str) -> str | None:
    bare, err = strip_strings(expr)
    if err:
        return err
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for c in bare:
        if c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack[-1] != pairs[c]:
                return f"unbalanced {c!r}"
            stack.pop()
    if stack:
        return f"unclosed {stack[-1]!r}"
    return None


_recorded: set[str] | None = None


def recorded_names() -> set[str]:
    """The names of the recording rules envoy/prometheus/alerts.yml defines."""
    global _recorded
    if _recorded is None:
        try:
            text = ALERTS_YML.read_text()
        except OSError:
            text = ""
        _recorded = set(re.findall(r"^\s*-?\s*record:\s*['\"]?([a-zA-Z_:][\w:]*)", text, re.M))
    return _recorded


STRING = re.compile(r"""\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile", "limitk", "limit_ratio"}
KEYWORDS = GROUPING | AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "inf", "nan"}
TOKEN = re.compile(
    r'(?P<string>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)'
    r"|(?P<number>\d[\w.]*)"
    r"|(?P<ident>[a-zA-Z_:][\w:]*)"
    r"|(?P<space>\s+)"
    r"|(?P<other>.)",
    re.S,
)


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of every vector selector of a PromQL expression; the name is
    empty for a selector such as {__name__=~"..."}."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr) if m.lastgroup != "space"]
    out = []
    i = 0

    def block(i: int, open_: str, close: str) -> tuple[str, int]:
        """Text inside the bracket opening at tokens[i], and the index after its close."""
        depth, j, parts = 0, i, []
        while j < len(tokens):
            kind, text = tokens[j]
            if kind == "other" and text == open_:
                depth += 1
            elif kind == "other" and text == close:
                depth -= 1
                if depth == 0:
                    return "".join(parts[1:]), j + 1
            parts.append(text)
            j += 1
        return "".join(parts[1:]), j

    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident":
            if text in GROUPING and nxt == ("other", "("):
                _, i = block(i + 1, "(", ")")  # a label list, not metrics
                continue
            if text.lower() in KEYWORDS or nxt == ("other", "("):
                i += 1  # keyword, function or aggregation
                continue
            if nxt == ("other", "{"):
                matchers, i = block(i + 1, "{", "}")
                out.append((text, matchers))
                continue
            out.append((text, ""))
            i += 1
        elif kind == "other" and text == "{":
            matchers, i = block(i, "{", "}")
            out.append(("", matchers))
        elif kind == "other" and text == "[":
            _, i = block(i, "[", "]")  # range or subquery duration
        else:
            i += 1
    return out


def check_expr(expr: str, where: str, errors: list[str]) -> None:
    if not isinstance(expr, str) or not expr.strip():
        errors.append(f"{where}: empty or missing expr")
        return
    err = bracket_error(expr)
    if err:
        errors.append(f"{where}: malformed PromQL ({err}): {expr}")
    _, unknown = substitute(expr)
    if unknown:
        errors.append(f"{where}: unknown Grafana variable(s) {', '.join(sorted(set(unknown)))}")
    sels = selectors(expr)
    if not sels:
        errors.append(f"{where}: no metric selector in {expr}")
    # llm-meter's series, recording rules included (model_app:..., not only llm_...).
    llm = [(n, m) for n, m in sels if llm_metric_labels(n) is not None]
    app_everywhere = all("app" in (llm_metric_labels(n) or set()) for n, _ in llm)
    for name, matchers in sels:
        if not name:
            if "__name__" not in matchers:
                errors.append(f"{where}: selector without a metric name: {{{matchers}}}")
            continue
        if name.startswith("envoy_"):
            continue
        labels = llm_metric_labels(name)
        if labels is None:
            errors.append(f"{where}: unknown metric {name} (not an llm-meter metric of the docs/metrics.md, Metrics reference, nor a recording rule listed in RECORDING_RULES)")
            continue
        if name in RECORDING_RULES and name not in recorded_names():
            errors.append(f"{where}: {name} is a recording rule that {ALERTS_YML.relative_to(ROOT)} does not define")
        for label, matcher in MODEL_LABELS.items():
            if label in labels and matcher not in matchers:
                errors.append(f"{where}: {name} has a {label} label but the selector does not filter {matcher}")
        if "app" in labels and app_everywhere and 'app=~"$app"' not in matchers:
            errors.append(f'{where}: {name} has an app label but the selector does not filter app=~"$app"')
        bare_matchers = STRING.sub('""', matchers)
        for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", bare_matchers):
            if label != "__name__" and label not in labels:
                errors.append(f"{where}: {name} has no label {label!r}")


# ---------------------------------------------------------------------------------------------
# Dashboard

def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels") or []))
    return out


def overlaps(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def panel_label(p: dict) -> str:
    return f'panel {p.get("id")} "{p.get("title", "")}"'


def uses_datasource_var(ds: object) -> bool:
    if isinstance(ds, dict):
        return ds.get("uid") == DATASOURCE and ds.get("type", "prometheus") == "prometheus"
    return ds == DATASOURCE


def check_variables(dash: dict, errors: list[str]) -> None:
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append('template variable "datasource" must be of type datasource with query "prometheus"')
    for name in ("model", "app"):
        v = variables.get(name)
        if not v:
            errors.append(f'template variable "{name}" is missing')
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        want = f"label_values(llm_requests_total, {name})"
        if v.get("type") != "query" or not isinstance(q, str) or q.replace(" ", "") != want.replace(" ", ""):
            errors.append(f'template variable "{name}" must be a query variable with {want}')
        if not v.get("multi") or not v.get("includeAll") or v.get("allValue") != ".*":
            errors.append(f'template variable "{name}" must be multi-select with include-all and allValue ".*"')
        if not uses_datasource_var(v.get("datasource")):
            errors.append(f'template variable "{name}" must query {DATASOURCE}')


def check_dashboard(path: Path) -> tuple[list[dict], list[str]]:
    """Validates the dashboard; returns its expressions (source, expr, may_be_empty) and errors."""
    errors: list[str] = []
    try:
        text = path.read_text()
        dash = json.loads(text)
    except (OSError, ValueError) as e:
        return [], [f"cannot read the dashboard: {e}"]
    if not isinstance(dash, dict):
        return [], ["the dashboard is not a JSON object"]
    if "__inputs" in dash or "${DS_" in text:
        errors.append("the dashboard has __inputs / ${DS_...} placeholders: it must be provisionable as a file")
    for key in ("uid", "title"):
        if not isinstance(dash.get(key), str) or not dash[key]:
            errors.append(f"dashboard {key} is missing")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 39:
        errors.append("schemaVersion must be 39 or later")
    check_variables(dash, errors)

    top = dash.get("panels")
    if not isinstance(top, list) or not top:
        return [], errors + ["the dashboard has no panels"]
    panels = all_panels(top)
    ids: dict[object, dict] = {}
    titles: set[str] = set()
    exprs: list[dict] = []
    for p in panels:
        label = panel_label(p)
        pid = p.get("id")
        if not isinstance(pid, int):
            errors.append(f"{label}: id must be an integer")
        elif pid in ids:
            errors.append(f"{label}: id {pid} is also used by {panel_label(ids[pid])}")
        else:
            ids[pid] = p
        gp = p.get("gridPos")
        if not isinstance(gp, dict) or not all(isinstance(gp.get(k), int) for k in "xywh"):
            errors.append(f"{label}: gridPos needs integer x, y, w, h")
        elif gp["x"] < 0 or gp["y"] < 0 or gp["w"] <= 0 or gp["h"] <= 0 or gp["x"] + gp["w"] > GRID_WIDTH:
            errors.append(f"{label}: gridPos {gp} is outside the {GRID_WIDTH}-column grid")
        ptype = p.get("type")
        if ptype == "row":
            continue
        if ptype not in PANEL_TYPES:
            errors.append(f"{label}: type {ptype!r} is not one of {sorted(PANEL_TYPES)}")
        title = p.get("title")
        if not isinstance(title, str) or not title:
            errors.append(f"{label}: no title")
        elif title in titles:
            errors.append(f"{label}: title used twice")
        else:
            titles.add(title)
        if not uses_datasource_var(p.get("datasource")):
            errors.append(f"{label}: datasource must be {DATASOURCE}")
        targets = p.get("targets")
        if not isinstance(targets, list) or not targets:
            errors.append(f"{label}: no targets")
            continue
        refs: set[str] = set()
        for t in targets:
            ref = t.get("refId")
            where = f"{label}/{ref}"
            if not isinstance(ref, str) or not ref:
                errors.append(f"{label}: a target has no refId")
                continue
            if ref in refs:
                errors.append(f"{where}: refId used twice")
            refs.add(ref)
            if "datasource" in t and not uses_datasource_var(t["datasource"]):
                errors.append(f"{where}: target datasource must be {DATASOURCE}")
            expr = t.get("expr")
            check_expr(expr, where, errors)
            if not isinstance(expr, str):
                continue
            may_be_empty = t.get("mayBeEmpty") is True
            names = {n for n, _ in selectors(expr) if n}
            if names and names <= SPARSE and "vector(" not in expr and not may_be_empty:
                errors.append(f'{where}: {", ".join(sorted(names))} only exist after rare events (or with a configuration '
                          'few have): mark the target "mayBeEmpty": true')
            exprs.append({"source": f"grafana:{title}/{ref}", "expr": substitute(expr)[0], "may_be_empty": may_be_empty})

    # Overlaps among the panels laid out together: the top level, and each collapsed row's own.
    def layout_groups(ps: list[dict]) -> list[list[dict]]:
        groups = [ps]
        for p in ps:
            if p.get("panels"):
                groups.extend(layout_groups(p["panels"]))
        return groups

    for group in layout_groups(top):
        placed = [p for p in group if isinstance(p.get("gridPos"), dict) and all(isinstance(p["gridPos"].get(k), int) for k in "xywh")]
        for i, a in enumerate(placed):
            for b in placed[i + 1:]:
                if overlaps(a["gridPos"], b["gridPos"]):
                    errors.append(f"{panel_label(a)} overlaps {panel_label(b)}")
    return exprs, errors


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests

BEGIN = "# llm-meter configuration begin"
END = "# llm-meter configuration end"


def embedded_config(text: str) -> tuple[str | None, str | None]:
    """The JSON text between the llm-meter configuration markers, or an error."""
    b = text.find(BEGIN)
    if b < 0:
        return None, None
    e = text.find(END, b)
    if e < 0:
        return None, f"{BEGIN!r} without {END!r}"
    block = text[b + len(BEGIN):e]
    lines = [l for l in block.splitlines() if not l.strip().startswith("#")]
    block = "\n".join(lines)
    start, stop = block.find("{"), block.rfind("}")
    if start < 0 or stop < start:
        return None, "no JSON object between the configuration markers"
    if text.find(BEGIN, e) >= 0:
        return None, "more than one llm-meter configuration block"
    return block[start:stop + 1], None


def key_shape(value: object) -> object:
    """The keys of a JSON value, recursively (values themselves are ignored)."""
    if isinstance(value, dict):
        return {k: key_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [key_shape(v) for v in value]
    return None


def shape_diff(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in a:
                out.append(f"{p} missing")
            elif k not in b:
                out.append(f"{p} not in envoy/envoy.yaml")
            else:
                out.extend(shape_diff(a[k], b[k], p))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path or '.'}: {len(a)} entries, envoy/envoy.yaml has {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(shape_diff(x, y, f"{path}[{i}]"))
        return out
    if isinstance(a, (dict, list)) != isinstance(b, (dict, list)) or type(a) is not type(b):
        return [f"{path or '.'}: a different kind of value than in envoy/envoy.yaml"]
    return []


TAG = re.compile(r"tag_name:\s*['\"]?(\w+)['\"]?\s*\n\s*regex:\s*(\S+)")
# The same written as JSON (custom_bootstrap.json of the Istio ConfigMap).
TAG_JSON = re.compile(r'"tag_name"\s*:\s*"(\w+)"\s*,\s*"regex"\s*:\s*("(?:[^"\\]|\\.)*")')
BUCKETS = re.compile(r"match:\s*\{\s*suffix:\s*['\"]?([\w.]+)['\"]?\s*\}\s*\n\s*buckets:\s*(\[[^\]]*\])")
BUCKETS_BLOCK = re.compile(r"match:\s*\n\s*suffix:\s*['\"]?([\w.]+)['\"]?\s*\n\s*buckets:\s*(\[[^\]]*\])")
# The same settings written as JSON (custom_bootstrap.json of the Istio ConfigMap).
BUCKETS_JSON = re.compile(r'"match"\s*:\s*\{\s*"suffix"\s*:\s*"([\w.]+)"\s*\}\s*,\s*"buckets"\s*:\s*(\[[^\]]*\])')
EXTRA_STAT_TAGS = re.compile(r"extraStatTags:\s*\[([^\]]*)\]")

# Istio: a file whose name ends in PATCH_SUFFIX is a strategic merge patch of the workload's
# Deployment (`kubectl patch --patch-file`), not an object: it has no apiVersion/kind.
PATCH_SUFFIX = ".patch.yaml"
ISTIO_PROXY_CONFIG = "proxy.istio.io/config"
ISTIO_BOOTSTRAP_OVERRIDE = "sidecar.istio.io/bootstrapOverride"
CUSTOM_BOOTSTRAP = "custom_bootstrap.json"
# Envoy Gateway: the target kinds its CRD allows for an EnvoyExtensionPolicy (x-kubernetes-validations).
EEP_TARGET_KINDS = {"Gateway", "ListenerSet", "HTTPRoute", "GRPCRoute", "UDPRoute", "TCPRoute", "TLSRoute"}


def istio_tag_regex(tag: str) -> str:
    """The stats tag regex istio-agent renders for an `extraStatTags` entry: istio/istio's
    tools/packaging/common/envoy_bootstrap.json has `"regex": "({{ $tag }}=\\\\.=(.*?);\\\\.;)"`
    (Istio 1.6 and later), i.e. `(model=\\.=(.*?);\\.;)` for `model`."""
    return f"({tag}=\\.=(.*?);\\.;)"


def istio_split(ref_tags: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """envoy.yaml's stats_tags as Istio gets them: (the names for `extraStatTags`, whose regex is
    exactly what istio-agent renders for a name; the other tags, which go into the bootstrap
    override's stats_config.stats_tags as they are). The other tags are the OpenTelemetry GenAI
    ones: the filter writes their keys with a trailing `_` (`gen_ai_request_model_=.=`, so that
    the `model` regex cannot match inside them), which `(<name>=\\.=(.*?);\\.;)` cannot express."""
    names = [t for t, rx in ref_tags.items() if rx == istio_tag_regex(t)]
    return names, {t: rx for t, rx in ref_tags.items() if rx != istio_tag_regex(t)}


def same_buckets(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """Same entries in the same order: Envoy uses the first entry whose suffix matches a histogram
    (`_request_duration_ms` also matches `gen_ai_server_request_duration_ms`)."""
    return list(a.items()) == list(b.items())


def unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == "'":
        return s[1:-1].replace("''", "'")
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return json.loads(s)
    return s


def uncommented(text: str) -> str:
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))


def stats_settings(text: str) -> tuple[dict[str, str], dict[str, list[float]]]:
    tags = {name: unquote(rx) for name, rx in TAG.findall(text) + TAG_JSON.findall(text)}
    buckets = {}
    for suffix, values in BUCKETS.findall(text) + BUCKETS_BLOCK.findall(text) + BUCKETS_JSON.findall(text):
        buckets[suffix] = [float(v) for v in values.strip("[]").split(",") if v.strip()]
    return tags, buckets


def reference() -> tuple[object, dict[str, str], dict[str, list[float]], list[str]]:
    errors = []
    text = ENVOY_YAML.read_text()
    raw, err = embedded_config(text)
    config = None
    if err or raw is None:
        errors.append(f"{ENVOY_YAML}: {err or 'no llm-meter configuration block'}")
    else:
        try:
            config = json.loads(raw)
        except ValueError as e:
            errors.append(f"{ENVOY_YAML}: the llm-meter configuration is not JSON: {e}")
    tags, buckets = stats_settings(text)
    if not tags or not buckets:
        errors.append(f"{ENVOY_YAML}: no stats_tags / histogram_bucket_settings found")
    return config, tags, buckets, errors


TOP_KEY = re.compile(r"^([A-Za-z_][\w.-]*)\s*:(.*)$")


def structural_documents(text: str, where: str, errors: list[str], patch: bool = False) -> list[dict[str, str]]:
    """Documents of a multi-document YAML file, checked without a YAML parser."""
    docs: list[list[str]] = [[]]
    for line in text.splitlines():
        if re.match(r"^---\s*(#.*)?$", line):
            docs.append([])
        elif line.startswith("---"):
            errors.append(f"{where}: content after '---' on the separator line")
        elif line.startswith("..."):
            docs.append([])
        else:
            docs[-1].append(line)
    out = []
    for lines in docs:
        content = [l for l in lines if l.strip() and not l.lstrip().startswith("#")]
        if not content:
            continue
        top: dict[str, str] = {}
        metadata_name = None
        in_metadata = False
        child_indent = None
        for line in content:
            m = TOP_KEY.match(line)
            if m:
                top[m.group(1)] = m.group(2).strip()
                in_metadata = m.group(1) == "metadata"
                child_indent = None
                continue
            if in_metadata:
                indent = len(line) - len(line.lstrip(" "))
                if child_indent is None:
                    child_indent = indent
                nm = re.match(r"^\s+name:\s*(\S+)", line)
                if nm and indent == child_indent:
                    metadata_name = nm.group(1)
        if patch:
            if "apiVersion" in top or "kind" in top:
                errors.append(f"{where}: a {PATCH_SUFFIX} file is a patch, not an object: no apiVersion/kind")
        else:
            for key in ("apiVersion", "kind"):
                if not top.get(key):
                    errors.append(f"{where}: a document has no top-level {key}")
            if "metadata" not in top or not metadata_name:
                errors.append(f"{where}: document {top.get('kind', '?')} has no metadata.name")
        out.append({"apiVersion": top.get("apiVersion", ""), "kind": top.get("kind", ""), "name": metadata_name or ""})
    return out


def find_config_fields(doc: object) -> list[object]:
    """The llm-meter configuration a manifest document carries (WasmPlugin / EnvoyExtensionPolicy)."""
    if not isinstance(doc, dict):
        return []
    spec = doc.get("spec") or {}
    if doc.get("kind") == "WasmPlugin" and "pluginConfig" in spec:
        return [spec["pluginConfig"]]
    if doc.get("kind") == "EnvoyExtensionPolicy":
        return [w.get("config") for w in spec.get("wasm") or [] if isinstance(w, dict) and "config" in w]
    return []


# A manifest file as parsed by PyYAML: (where, documents, is a patch file).
Parsed = tuple[str, list, bool]


def check_yaml(paths: list[Path], structural: bool = False, schemas: Path | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes on what was checked)."""
    errors: list[str] = []
    notes: list[str] = []
    yaml = None
    if not structural:
        try:
            import yaml  # type: ignore
        except ImportError:
            pass
    ref_config, ref_tags, ref_buckets, ref_errors = reference()
    errors.extend(ref_errors)
    parsed: list[Parsed] = []
    for path in paths:
        where = str(path)
        is_patch = path.name.endswith(PATCH_SUFFIX)
        try:
            text = path.read_text()
        except OSError as e:
            errors.append(f"{where}: {e}")
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if "\t" in line[: len(line) - len(line.lstrip(" \t"))]:
                errors.append(f"{where}:{n}: tab character in indentation")
        docs: list[object] = []
        if yaml is not None:
            try:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as e:
                errors.append(f"{where}: invalid YAML: {e}")
                continue
            for d in docs:
                if not isinstance(d, dict):
                    errors.append(f"{where}: a document is not a mapping")
                    continue
                if is_patch:
                    if "apiVersion" in d or "kind" in d:
                        errors.append(f"{where}: a {PATCH_SUFFIX} file is a patch, not an object: no apiVersion/kind")
                    continue
                for key in ("apiVersion", "kind"):
                    if not isinstance(d.get(key), str) or not d.get(key):
                        errors.append(f"{where}: a document has no {key}")
                if not isinstance(d.get("metadata"), dict) or not d["metadata"].get("name"):
                    errors.append(f"{where}: document {d.get('kind', '?')} has no metadata.name")
            parsed.append((where, docs, is_patch))
        else:
            structural_documents(text, where, errors, patch=is_patch)

        raw, err = embedded_config(text)
        if err:
            errors.append(f"{where}: {err}")
        elif raw is not None:
            try:
                config = json.loads(raw)
            except ValueError as e:
                errors.append(f"{where}: the llm-meter configuration is not valid JSON: {e}")
                config = None
            if config is not None and ref_config is not None:
                for d in shape_diff(key_shape(config), key_shape(ref_config)):
                    errors.append(f"{where}: llm-meter configuration: {d}")
            if config is not None and yaml is not None:
                fields = [f for d in docs for f in find_config_fields(d)]
                if not fields:
                    errors.append(f"{where}: no WasmPlugin pluginConfig / EnvoyExtensionPolicy wasm config holds the configuration")
                for f in fields:
                    if f != config:
                        errors.append(f"{where}: the manifest field differs from the JSON between the configuration markers")

        # The settings as text (comments aside), so that this part also works without PyYAML.
        body = uncommented(text)
        tags, buckets = stats_settings(body)
        istio_names, override_tags = istio_split(ref_tags)
        # Istio's custom_bootstrap.json carries only the tags extraStatTags cannot express.
        want_tags = override_tags if CUSTOM_BOOTSTRAP in body else ref_tags
        if "stats_tags" in body and tags != want_tags:
            missing = sorted(set(want_tags) - set(tags))
            extra = sorted(set(tags) - set(want_tags))
            changed = sorted(k for k in set(tags) & set(want_tags) if tags[k] != want_tags[k])
            errors.append(f"{where}: stats_tags differ from envoy/envoy.yaml (missing {missing}, extra {extra}, different regex {changed})")
        if "histogram_bucket_settings" in body and not same_buckets(buckets, ref_buckets):
            errors.append(f"{where}: histogram_bucket_settings differ from envoy/envoy.yaml (entries or their order)")
        for names in EXTRA_STAT_TAGS.findall(body) if yaml is None else []:  # with PyYAML: istio_wiring_errors
            got = {unquote(n) for n in names.split(",") if n.strip()}
            if got != set(istio_names):
                errors.append(f"{where}: extraStatTags differ from envoy/envoy.yaml's stats_tags with Istio's regex (missing "
                              f"{sorted(set(istio_names) - got)}, extra {sorted(got - set(istio_names))})")

    if yaml is None:
        notes.append("structural check, PyYAML not importable" if not structural else "structural check")
        if schemas is not None:
            errors.append("--schemas needs PyYAML (the manifests are parsed with it)")
        return errors, notes
    notes.append("PyYAML")
    errors.extend(semantic_errors(yaml, parsed, ref_tags, ref_buckets))
    errors.extend(self_test_semantics(yaml, parsed, ref_tags, ref_buckets, notes))
    if schemas is not None:
        errors.extend(check_schemas(yaml, parsed, schemas, notes))
    return errors, notes


# ---------------------------------------------------------------------------------------------
# What Istio and Envoy Gateway do with the manifests (with PyYAML)

def meta(d: dict) -> tuple[str, str]:
    m = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
    return str(m.get("name", "?")), str(m.get("namespace", ""))


def buckets_of(settings: object, where: str, errors: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for s in settings if isinstance(settings, list) else []:
        match = s.get("match") if isinstance(s, dict) else None
        if (not isinstance(match, dict) or set(s) != {"match", "buckets"} or set(match) != {"suffix"}
                or not isinstance(match["suffix"], str) or not isinstance(s["buckets"], list)):
            errors.append(f"{where}: a histogram_bucket_settings entry is not {{match: {{suffix: ...}}, buckets: [...]}}")
            continue
        out[match["suffix"]] = [float(b) for b in s["buckets"]]
    return out


def semantic_errors(yaml, parsed: list[Parsed], ref_tags: dict[str, str], ref_buckets: dict[str, list[float]]) -> list[str]:
    errors: list[str] = []
    objects = [(w, d) for w, docs, p in parsed if not p for d in docs if isinstance(d, dict)]
    patches = [(w, d) for w, docs, p in parsed if p for d in docs if isinstance(d, dict)]
    for where, d in objects:
        kind = d.get("kind")
        name, _ = meta(d)
        spec = d.get("spec") if isinstance(d.get("spec"), dict) else {}
        if kind == "EnvoyFilter":
            for i, patch in enumerate(spec.get("configPatches") or []):
                if isinstance(patch, dict) and patch.get("applyTo") == "BOOTSTRAP":
                    errors.append(
                        f"{where}: EnvoyFilter {name}: configPatches[{i}] applyTo BOOTSTRAP: Istio 1.21 and later never apply "
                        "BOOTSTRAP patches (istio/istio f6337a9d, release note bds-removal), though the API server accepts them; "
                        f"use the {ISTIO_PROXY_CONFIG} extraStatTags and {ISTIO_BOOTSTRAP_OVERRIDE} pod annotations "
                        "(envoy/k8s/istio-workload.patch.yaml)")
        elif kind == "WasmPlugin":
            # x-kubernetes-validations of Istio's WasmPlugin CRD, restated (the schema package has no CEL rules).
            if sum(k in spec for k in ("selector", "targetRef", "targetRefs")) > 1:
                errors.append(f"{where}: WasmPlugin {name}: only one of targetRefs or selector can be set")
            url = spec.get("url")
            scheme = url.split("://", 1)[0] if isinstance(url, str) and "://" in url else ""
            if scheme not in ("", "http", "https", "oci", "file"):
                errors.append(f"{where}: WasmPlugin {name}: url must have schema one of [http, https, file, oci]")
            errors.extend(istio_wiring_errors(yaml, where, d, objects, patches, ref_tags, ref_buckets))
        elif kind == "EnvoyExtensionPolicy":
            # x-kubernetes-validations of Envoy Gateway's EnvoyExtensionPolicy CRD, restated.
            has_ref, has_refs = "targetRef" in spec, "targetRefs" in spec
            if has_ref == has_refs and not spec.get("targetSelectors"):
                errors.append(f"{where}: EnvoyExtensionPolicy {name}: either targetRef or targetRefs must be used")
            refs = ([spec["targetRef"]] if has_ref else []) + list(spec.get("targetRefs") or [])
            for ref in refs:
                if not isinstance(ref, dict) or ref.get("group") != "gateway.networking.k8s.io" or ref.get("kind") not in EEP_TARGET_KINDS:
                    errors.append(f"{where}: EnvoyExtensionPolicy {name}: a target must be a gateway.networking.k8s.io "
                                  f"{'/'.join(sorted(EEP_TARGET_KINDS))}")
            for i, w in enumerate(spec.get("wasm") or []):
                code = w.get("code") if isinstance(w, dict) and isinstance(w.get("code"), dict) else {}
                for typ, field in (("HTTP", "http"), ("Image", "image")):
                    if (code.get("type") == typ) != (field in code):
                        errors.append(f"{where}: EnvoyExtensionPolicy {name}: spec.wasm[{i}].code: "
                                      f"if type is {typ}, {field} field needs to be set (and only then)")
        elif kind == "EnvoyProxy":
            boot = spec.get("bootstrap") if isinstance(spec.get("bootstrap"), dict) else {}
            try:
                value = yaml.safe_load(boot.get("value") or "") if isinstance(boot.get("value"), str) else None
            except yaml.YAMLError as e:
                errors.append(f"{where}: EnvoyProxy {name}: spec.bootstrap.value is not YAML: {e}")
                continue
            stats = value.get("stats_config") if isinstance(value, dict) else None
            if not isinstance(stats, dict):
                errors.append(f"{where}: EnvoyProxy {name}: no stats_config in spec.bootstrap.value")
                continue
            got = {t.get("tag_name"): t.get("regex") for t in stats.get("stats_tags") or [] if isinstance(t, dict)}
            if got != ref_tags:
                errors.append(f"{where}: EnvoyProxy {name}: bootstrap stats_config.stats_tags differ from envoy/envoy.yaml")
            if not same_buckets(buckets_of(stats.get("histogram_bucket_settings"), where, errors), ref_buckets):
                errors.append(f"{where}: EnvoyProxy {name}: bootstrap histogram_bucket_settings differ from envoy/envoy.yaml "
                              "(entries or their order)")
    return errors


def istio_wiring_errors(yaml, where: str, plugin: dict, objects: list[tuple[str, dict]], patches: list[tuple[str, dict]],
                        ref_tags: dict[str, str], ref_buckets: dict[str, list[float]]) -> list[str]:
    """A WasmPlugin's metrics get their labels and buckets only through the pod annotations: the
    tags Istio can render from extraStatTags there, the others (istio_split) and the buckets in the
    bootstrap override ConfigMap."""
    errors: list[str] = []
    name, ns = meta(plugin)
    istio_names, override_tags = istio_split(ref_tags)
    annotated = []
    for pw, pd in patches:
        template = (pd.get("spec") or {}).get("template") if isinstance(pd.get("spec"), dict) else None
        md = template.get("metadata") if isinstance(template, dict) else None
        ann = md.get("annotations") if isinstance(md, dict) else None
        if isinstance(ann, dict) and (ISTIO_PROXY_CONFIG in ann or ISTIO_BOOTSTRAP_OVERRIDE in ann):
            annotated.append((pw, ann))
    if not annotated:
        return errors + [
            f"{where}: WasmPlugin {name}: no workload patch ({PATCH_SUFFIX}) sets the pod annotations {ISTIO_PROXY_CONFIG} "
            f"(extraStatTags) and {ISTIO_BOOTSTRAP_OVERRIDE}: without them Istio's proxies keep llm-meter's labels inside "
            "the metric names and use Envoy's default buckets"]
    for pw, ann in annotated:
        pc = ann.get(ISTIO_PROXY_CONFIG)
        try:
            proxy_config = yaml.safe_load(pc) if isinstance(pc, str) else None
        except yaml.YAMLError as e:
            errors.append(f"{pw}: annotation {ISTIO_PROXY_CONFIG} is not YAML: {e}")
            proxy_config = None
        tags = proxy_config.get("extraStatTags") if isinstance(proxy_config, dict) else None
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            errors.append(f"{pw}: annotation {ISTIO_PROXY_CONFIG} has no extraStatTags list: llm-meter's labels stay in the metric names")
        elif set(tags) != set(istio_names) or len(tags) != len(set(tags)):
            wrong = sorted(set(tags) & set(override_tags))
            errors.append(f"{pw}: {ISTIO_PROXY_CONFIG} extraStatTags differ from envoy/envoy.yaml's stats_tags (missing "
                          f"{sorted(set(istio_names) - set(tags))}, extra {sorted(set(tags) - set(istio_names))}"
                          + (f"; for {wrong} istio-agent would render {istio_tag_regex(wrong[0])}, not envoy.yaml's "
                             f"{override_tags[wrong[0]]}: they belong in {CUSTOM_BOOTSTRAP}'s stats_tags" if wrong else "")
                          + ")")
        cm_name = ann.get(ISTIO_BOOTSTRAP_OVERRIDE)
        if not isinstance(cm_name, str) or not cm_name:
            errors.append(f"{pw}: no {ISTIO_BOOTSTRAP_OVERRIDE} annotation: llm-meter's histograms keep Envoy's default buckets")
            continue
        cms = [(w, d) for w, d in objects if d.get("kind") == "ConfigMap" and meta(d)[0] == cm_name]
        if not cms:
            errors.append(f"{pw}: {ISTIO_BOOTSTRAP_OVERRIDE} names ConfigMap {cm_name}, which no manifest defines")
        for cw, cm in cms:
            if meta(cm)[1] != ns:
                errors.append(f"{cw}: ConfigMap {cm_name} is not in the namespace of WasmPlugin {name} ({ns}), "
                              "where the annotated pods are")
            data = cm.get("data") if isinstance(cm.get("data"), dict) else {}
            raw = data.get(CUSTOM_BOOTSTRAP)
            if not isinstance(raw, str):
                errors.append(f"{cw}: ConfigMap {cm_name} has no data.{CUSTOM_BOOTSTRAP} (the file Istio mounts and merges)")
                continue
            try:
                boot = json.loads(raw)
            except ValueError as e:
                errors.append(f"{cw}: ConfigMap {cm_name}: {CUSTOM_BOOTSTRAP} is not JSON: {e}")
                continue
            stats = boot.get("stats_config") if isinstance(boot, dict) else None
            keys = {"histogram_bucket_settings"} | ({"stats_tags"} if override_tags else set())
            if not isinstance(stats, dict) or set(boot) != {"stats_config"} or set(stats) != keys:
                errors.append(f"{cw}: ConfigMap {cm_name}: {CUSTOM_BOOTSTRAP} must hold stats_config with "
                              f"{' and '.join(sorted(keys))} and nothing else (Envoy merges it into Istio's bootstrap: "
                              "lists are appended, single values replace Istio's)")
                continue
            if not same_buckets(buckets_of(stats["histogram_bucket_settings"], cw, errors), ref_buckets):
                errors.append(f"{cw}: ConfigMap {cm_name}: histogram_bucket_settings differ from envoy/envoy.yaml "
                              "(entries or their order)")
            entries = stats.get("stats_tags") or []
            if not isinstance(entries, list) or not all(isinstance(t, dict) and set(t) == {"tag_name", "regex"} for t in entries):
                errors.append(f"{cw}: ConfigMap {cm_name}: a stats_tags entry is not {{tag_name, regex}}")
                continue
            got = {t["tag_name"]: t["regex"] for t in entries}
            if got != override_tags or len(entries) != len(got):
                twice = sorted(set(got) & set(istio_names))
                errors.append(f"{cw}: ConfigMap {cm_name}: stats_tags must be envoy/envoy.yaml's stats_tags that "
                              f"extraStatTags cannot express, {sorted(override_tags)}, with its regexes (missing "
                              f"{sorted(set(override_tags) - set(got))}, extra {sorted(set(got) - set(override_tags))}, "
                              f"different regex {sorted(k for k in set(got) & set(override_tags) if got[k] != override_tags[k])})"
                              + (f"; {twice} come from extraStatTags already: specified twice" if twice else ""))
    return errors


def _first(parsed: list[Parsed], kind: str | None) -> dict | None:
    """The first object of a kind (kind None: the first patch document)."""
    for _, docs, is_patch in parsed:
        for d in docs:
            if isinstance(d, dict) and is_patch == (kind is None) and (kind is None or d.get("kind") == kind):
                return d
    return None


def _changed(doc: dict, change) -> dict | None:
    """A changed copy of a document, or None if the document no longer has the shape `change` expects."""
    d = copy.deepcopy(doc)
    try:
        change(d)
    except Exception:  # noqa: BLE001 - any shape mismatch
        return None
    return d


def _unbuildable(what: str) -> str:
    return f"self-test: cannot make the wrong copy {what!r} (the manifest's shape changed): update tools/check_ops.py"


def self_test_semantics(yaml, parsed: list[Parsed], ref_tags: dict[str, str], ref_buckets: dict[str, list[float]],
                        notes: list[str]) -> list[str]:
    """Wrong copies of the shipped manifests that the rules above must reject."""
    plugin, patch, eep = _first(parsed, "WasmPlugin"), _first(parsed, None), _first(parsed, "EnvoyExtensionPolicy")
    proxy = _first(parsed, "EnvoyProxy")
    istio_names, override_tags = istio_split(ref_tags)
    cm = next((d for _, docs, p in parsed if not p for d in docs
               if isinstance(d, dict) and d.get("kind") == "ConfigMap" and CUSTOM_BOOTSTRAP in (d.get("data") or {})), None)
    cases: list[tuple[str, list[Parsed], str]] = []
    if plugin is not None:
        # The approach Istio 1.21 stopped applying: the stats settings in an EnvoyFilter BOOTSTRAP patch.
        old = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
               "metadata": {"name": "llm-meter-stats", "namespace": meta(plugin)[1]},
               "spec": {"workloadSelector": {"labels": {"app": "llm-gateway"}}, "configPatches": [
                   {"applyTo": "BOOTSTRAP", "patch": {"operation": "MERGE", "value": {"stats_config": {
                       "stats_tags": [{"tag_name": t, "regex": r} for t, r in ref_tags.items()],
                       "histogram_bucket_settings": [{"match": {"suffix": s}, "buckets": b} for s, b in ref_buckets.items()],
                   }}}}]}}
        cases.append(("WasmPlugin + EnvoyFilter BOOTSTRAP patch (before Istio 1.21)", [("old", [plugin, old], False)],
                      "applyTo BOOTSTRAP"))
        cases.append(("WasmPlugin without the pod annotations", [("old", [plugin, old], False)], "no workload patch"))
    if plugin is not None and patch is not None and cm is not None:
        def extra_stat_tags(names):
            def change(d):
                ann = d["spec"]["template"]["metadata"]["annotations"]
                ann[ISTIO_PROXY_CONFIG] = "extraStatTags: [" + ", ".join(names) + "]\n"
            return change
        def other_cm(d):
            d["spec"]["template"]["metadata"]["annotations"][ISTIO_BOOTSTRAP_OVERRIDE] = "llm-meter-bootstrap-typo"
        def custom_bootstrap(change_boot):
            def change(d):
                boot = json.loads(d["data"][CUSTOM_BOOTSTRAP])
                change_boot(boot)
                d["data"][CUSTOM_BOOTSTRAP] = json.dumps(boot)
            return change
        def every_tag(boot):
            boot["stats_config"]["stats_tags"] = [{"tag_name": t, "regex": r} for t, r in ref_tags.items()]
        def no_tags(boot):
            boot["stats_config"].pop("stats_tags", None)
        def flush_interval(boot):
            boot["stats_flush_interval"] = "1s"
        def first_bucket_last(boot):
            settings = boot["stats_config"]["histogram_bucket_settings"]
            settings.append(settings.pop(0))
        base = [("m", [plugin, cm], False)]
        with_cm = lambda change: [("m", [plugin, _changed(cm, custom_bootstrap(change))], False), ("p", [patch], True)]
        cases.append(("extraStatTags without `rule`",
                      base + [("p", [_changed(patch, extra_stat_tags([t for t in istio_names if t != "rule"]))], True)],
                      "extraStatTags differ"))
        cases.append(("bootstrapOverride naming a missing ConfigMap", base + [("p", [_changed(patch, other_cm)], True)],
                      "which no manifest defines"))
        cases.append(("custom_bootstrap.json with stats_flush_interval", with_cm(flush_interval), "nothing else"))
        cases.append(("custom_bootstrap.json with the first bucket setting moved last", with_cm(first_bucket_last), "their order"))
        if override_tags:
            # The GenAI tags: not in extraStatTags (Istio would render a regex that never matches the filter's
            # `gen_ai_request_model_=.=` keys), but in custom_bootstrap.json, and only they.
            cases.append(("extraStatTags with the GenAI tags",
                          base + [("p", [_changed(patch, extra_stat_tags(list(ref_tags)))], True)], "belong in"))
            cases.append(("custom_bootstrap.json without stats_tags", with_cm(no_tags), "nothing else"))
            cases.append(("custom_bootstrap.json with every stats_tags entry", with_cm(every_tag), "specified twice"))
    if proxy is not None:
        def envoy_proxy(change_stats):
            def change(d):
                value = yaml.safe_load(d["spec"]["bootstrap"]["value"])
                change_stats(value["stats_config"])
                d["spec"]["bootstrap"]["value"] = yaml.safe_dump(value)
            return change
        def drop_override_tags(stats):
            stats["stats_tags"] = [t for t in stats["stats_tags"] if t["tag_name"] not in override_tags]
        def first_setting_last(stats):
            stats["histogram_bucket_settings"].append(stats["histogram_bucket_settings"].pop(0))
        if override_tags:
            cases.append(("EnvoyProxy bootstrap without the GenAI stats_tags",
                          [("e", [_changed(proxy, envoy_proxy(drop_override_tags))], False)], "stats_tags differ"))
        cases.append(("EnvoyProxy bootstrap with the first bucket setting moved last",
                      [("e", [_changed(proxy, envoy_proxy(first_setting_last))], False)], "their order"))
    if eep is not None:
        def http_with_image(d):
            d["spec"]["wasm"][0]["code"]["type"] = "HTTP"
        cases.append(("EnvoyExtensionPolicy code type HTTP with an image", [("e", [_changed(eep, http_with_image)], False)],
                      "if type is HTTP"))
    errors = []
    for what, files, expect in cases:
        if any(d is None for _, docs, _ in files for d in docs):
            errors.append(_unbuildable(what))
            continue
        got = semantic_errors(yaml, files, ref_tags, ref_buckets)
        if not any(expect in e for e in got):
            errors.append(f"self-test: {what} was not rejected (expected a problem containing {expect!r}; got {got})")
    notes.append(f"{len(cases)} wrong copies rejected by the Istio / Envoy Gateway rules")
    return errors


# ---------------------------------------------------------------------------------------------
# Schemas: the API server's view (tools/k8s_schema.mjs, npm packages pinned in tools/ops-schemas)

K8S_SCHEMA = ROOT / "tools" / "k8s_schema.mjs"


def run_schemas(schemas: Path, documents: list[dict]) -> tuple[dict, dict[str, list[str]], str | None]:
    if not (schemas / "node_modules").is_dir():
        return {}, {}, f"{schemas}/node_modules is missing: run `just ops-schemas`"
    try:
        out = subprocess.run(["node", str(K8S_SCHEMA), str(schemas)], input=json.dumps({"documents": documents}),
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {}, {}, f"cannot run node {K8S_SCHEMA}: {e}"
    if out.returncode != 0:
        return {}, {}, f"node {K8S_SCHEMA} failed: {out.stderr.strip()[-2000:]}"
    result = json.loads(out.stdout)
    return result["packages"], {r["id"]: r["errors"] for r in result["results"]}, None


def schema_negative_cases(yaml, parsed: list[Parsed]) -> list[tuple[str, dict, bool, str]]:
    """Wrong copies of the shipped manifests that the schemas must reject: (what, document, is patch, expected)."""
    cases = []
    plugin = _first(parsed, "WasmPlugin")
    if plugin is not None:
        def mode_typo(d):
            d["spec"]["match"] = [{"mode": "SERVER", "modes": "SERVER"}]
        cases += [
            ("WasmPlugin with envoy.yaml's failure_policy as spec.failurePolicy",
             _changed(plugin, lambda d: d["spec"].update(failurePolicy="FAIL_OPEN")), False, "unknown field spec.failurePolicy"),
            ("WasmPlugin with an unknown field in a match entry",
             _changed(plugin, mode_typo), False, "unknown field spec.match[0].modes"),
            ("WasmPlugin with the bootstrap's stats_config pasted into spec",
             _changed(plugin, lambda d: d["spec"].update(stats_config={"stats_tags": []})), False, "unknown field spec.stats_config"),
            ("WasmPlugin with metadata.label", _changed(plugin, lambda d: d["metadata"].update(label={"app": "x"})),
             False, "unknown field metadata.label"),
            ("WasmPlugin with a failStrategy the CRD does not have",
             _changed(plugin, lambda d: d["spec"].update(failStrategy="FAIL_OPEN_ALWAYS")), False, "spec.failStrategy: must be one of"),
            ("WasmPlugin with a string priority", _changed(plugin, lambda d: d["spec"].update(priority="high")),
             False, "spec.priority: must be of type integer"),
        ]
    eep = _first(parsed, "EnvoyExtensionPolicy")
    if eep is not None:
        def fail_open_string(d):
            d["spec"]["wasm"][0]["failOpen"] = "true"
        def image_typo(d):
            d["spec"]["wasm"][0]["code"] = {"type": "Image", "image": {"url": "ghcr.io/x/y:1", "digest": "sha256:0"}}
        cases += [
            ("EnvoyExtensionPolicy with failOpen as a string",
             _changed(eep, fail_open_string), False, "spec.wasm[0].failOpen: must be of type boolean"),
            ("EnvoyExtensionPolicy with image.digest for image.sha256",
             _changed(eep, image_typo), False, "unknown field spec.wasm[0].code.image.digest"),
        ]
    proxy = _first(parsed, "EnvoyProxy")
    if proxy is not None:
        def value_mapping(d):
            d["spec"]["bootstrap"]["value"] = yaml.safe_load(d["spec"]["bootstrap"]["value"])
        cases += [
            ("EnvoyProxy with the bootstrap as a mapping, not a string",
             _changed(proxy, value_mapping), False, "spec.bootstrap.value: must be of type string"),
            ("EnvoyProxy with bootstrap type Merged", _changed(proxy, lambda d: d["spec"]["bootstrap"].update(type="Merged")),
             False, "spec.bootstrap.type: must be one of"),
        ]
    cm = _first(parsed, "ConfigMap")
    if cm is not None:
        def data_mapping(d):
            d["data"] = {k: yaml.safe_load(v) for k, v in d["data"].items()}
        def datas(d):
            d["datas"] = d.pop("data")
        cases += [
            ("ConfigMap with custom_bootstrap.json as a mapping, not a string",
             _changed(cm, data_mapping), False, 'data["custom_bootstrap.json"]: must be of type string'),
            ("ConfigMap with datas for data", _changed(cm, datas), False, "unknown field datas"),
        ]
    patch = _first(parsed, None)
    if patch is not None:
        def config_mapping(d):
            ann = d["spec"]["template"]["metadata"]["annotations"]
            ann[ISTIO_PROXY_CONFIG] = yaml.safe_load(ann[ISTIO_PROXY_CONFIG])
        def annotations_too_high(d):
            d["spec"]["template"]["annotations"] = d["spec"]["template"].pop("metadata")["annotations"]
        cases += [
            ("workload patch with proxy.istio.io/config as a mapping, not a string", _changed(patch, config_mapping),
             True, 'annotations["proxy.istio.io/config"]: must be of type string'),
            ("workload patch with the annotations under spec.template", _changed(patch, annotations_too_high),
             True, "unknown field spec.template.annotations"),
        ]
    cases.append(("a kind without a schema", {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilters",
                                              "metadata": {"name": "x"}}, False, "no schema for"))
    return cases


def check_schemas(yaml, parsed: list[Parsed], schemas: Path, notes: list[str]) -> list[str]:
    documents, where_of = [], {}
    for where, docs, is_patch in parsed:
        for i, d in enumerate(docs):
            if isinstance(d, dict):
                doc_id = f"{where}#{i}"
                where_of[doc_id] = f"{where}: {'patch' if is_patch else d.get('kind', '?') + ' ' + meta(d)[0]}"
                documents.append({"id": doc_id, "doc": d, "patch": is_patch})
    errors = []
    cases = []
    for case in schema_negative_cases(yaml, parsed):
        if case[1] is None:
            errors.append(_unbuildable(case[0]))
        else:
            cases.append(case)
    for n, (what, doc, is_patch, _) in enumerate(cases):
        documents.append({"id": f"negative#{n}", "doc": doc, "patch": is_patch})
    packages, results, err = run_schemas(schemas, json.loads(json.dumps(documents, default=str)))
    if err:
        return errors + [err]
    for doc_id, where in where_of.items():
        errors.extend(f"{where}: {e}" for e in results.get(doc_id, ["not validated"]))
    for n, (what, _, _, expect) in enumerate(cases):
        got = results.get(f"negative#{n}", [])
        if not any(expect in e for e in got):
            errors.append(f"self-test: {what} passed the schema check (expected a problem containing {expect!r}; got {got})")
    notes.append("schemas " + ", ".join(f"{k} {v}" for k, v in packages.items()))
    notes.append(f"{len(cases)} wrong copies rejected by the schemas")
    return errors


# ---------------------------------------------------------------------------------------------

def fail(errors: list[str]) -> None:
    for e in errors:
        print(f"check_ops.py: {e}", file=sys.stderr)
    print(f"check_ops.py: {len(errors)} problem(s)", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dashboard", metavar="FILE", type=Path, help="validate a Grafana dashboard")
    mode.add_argument("--exprs", metavar="FILE", type=Path, help="validate a dashboard and print its PromQL expressions as JSON lines")
    mode.add_argument("--yaml", metavar="FILE", type=Path, nargs="+", help="validate Kubernetes manifests")
    ap.add_argument("--structural", action="store_true", help="with --yaml: do not use PyYAML even if it is importable")
    ap.add_argument("--schemas", metavar="DIR", type=Path,
                    help="with --yaml: also validate against the schemas installed in DIR (`just ops-schemas`: target/ops-schemas)")
    args = ap.parse_args()

    if args.yaml:
        errors, notes = check_yaml(args.yaml, structural=args.structural, schemas=args.schemas)
        if errors:
            fail(errors)
        print(f"check_ops.py: {len(args.yaml)} manifest file(s) OK ({'; '.join(notes)})", file=sys.stderr)
        return
    path = args.dashboard or args.exprs
    exprs, errors = check_dashboard(path)
    if errors:
        fail([f"{path}: {e}" for e in errors])
    if args.exprs:
        for e in exprs:
            line = {"source": e["source"], "expr": e["expr"]}
            if e["may_be_empty"]:
                line["may_be_empty"] = True
            print(json.dumps(line))
    else:
        print(f"check_ops.py: {path}: {len(exprs)} expressions OK", file=sys.stderr)


if __name__ == "__main__":
    main()
