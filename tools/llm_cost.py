#!/usr/bin/env python3
"""llm_cost.py: cost and usage summary of llm-meter's per-request records in an Envoy access log.

The shipped envoy/envoy.yaml writes one JSON line per request to stdout, with the filter's
record of a metered request in its `llm` field (`%FILTER_STATE(wasm.llm_meter:TYPED)%`). This
tool reads such a log and prints, per UTC day (from the line's `time`), per app and per served
model (the record's `model`):

    requests, errors (error_type != "none"), input, output and cached input tokens, cost in USD
    (the sum of the records' cost_microusd / 1e6, 6 decimals)

Usage:

    python3 tools/llm_cost.py [--by FIELD[,FIELD...]] [--format table|csv|json] [FILE ...]
    just cost envoy.log --by key_hash

    FILE            access log files; none, or "-", reads standard input
    --by FIELDS     the record fields to group by next to the day and model, comma-separated
                    (default: app). `--by key_hash` is a chargeback per API key (the record's
                    12-digit hash of the key), `--by app,key_hash` both; any record field works
                    (operation, provider, error_type, request_model, ...). A record without the
                    field is grouped under "-".
    --format        table (default: aligned columns and a TOTAL line), csv (a header line, then
                    one line per group), json ({"rows": [...], "total": {...}}; rows and total
                    also carry cost_microusd, the exact sum)

Examples:

    .venv/bin/envoy -c envoy/envoy.yaml | tee envoy.log     # then, any time:
    python3 tools/llm_cost.py envoy.log
    python3 tools/llm_cost.py --by key_hash --format csv envoy.log > chargeback.csv
    kubectl logs deploy/gateway -c envoy | python3 tools/llm_cost.py --by app,key_hash

What is read: lines that are JSON objects with a non-null `llm`; everything else (Envoy's own
log lines when stdout and stderr share a file, unmetered requests with `"llm": null`) is skipped.
`llm` may be what the shipped configuration prints ({"@type": ".../google.protobuf.Struct",
"value": {...}}), a bare object, or the record as a JSON string (what `:PLAIN` prints when the
filter could not declare its property; also a base64 BytesValue). Records without usage (a
rejected, failed or cancelled request) count as requests with no tokens; records without
cost_microusd (no usage, or no price for the model) add no cost. Costs are summed exactly
(decimal), so a group's cost_microusd rounded down is what llm_cost_microusd_total{model,app}
moved by for the same requests, when they were served by one Envoy worker.

Standard library only (Python 3.8+).
"""

import argparse
import base64
import binascii
import csv
import datetime
import json
import os
import re
import sys
from decimal import ROUND_HALF_UP, Decimal

TOKEN_COLUMNS = (
    ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"),
    ("cached_input_tokens", "cached_input_tokens"),
)
MICRO = Decimal(1_000_000)
SIX_PLACES = Decimal("0.000001")
ABSENT = "-"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="llm_cost.py",
        description="Per-day, per-app (or --by field), per-model cost and usage from llm-meter's "
        "access log records.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help='access log files (default, or "-": standard input)')
    p.add_argument(
        "--by",
        default="app",
        metavar="FIELD[,FIELD...]",
        help="record fields to group by, next to the day and the model (default: app; e.g. key_hash, app,key_hash)",
    )
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)")
    args = p.parse_args(argv)
    args.by = [f.strip() for f in args.by.split(",") if f.strip()]
    if not args.by:
        p.error("--by needs at least one field name")
    return args


def unwrap(llm):
    """The record dict inside an access log line's `llm` value, or None."""
    for _ in range(3):  # a string holding a wrapper holding an object, at most
        if isinstance(llm, dict):
            if "value" in llm and "@type" in llm:
                llm = llm["value"]
                continue
            return llm
        if isinstance(llm, str):
            text = llm.strip()
            if not text:
                return None
            try:
                llm = json.loads(text, parse_float=Decimal)
                continue
            except ValueError:
                pass
            try:  # a BytesValue's base64 (filter state set as bytes, printed :TYPED)
                llm = json.loads(base64.b64decode(text, validate=True).decode("utf-8"), parse_float=Decimal)
                continue
            except (ValueError, binascii.Error, UnicodeDecodeError):
                return None
        return None
    return llm if isinstance(llm, dict) else None


def utc_day(value):
    """The UTC date (YYYY-MM-DD) of an access log `time` (%START_TIME%, RFC 3339)."""
    if not isinstance(value, str) or len(value) < 10:
        return ABSENT
    text = value.strip()
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        # Python < 3.11 takes at most 6 fractional digits; Envoy's default prints 3.
        return value[:10]
    if t.tzinfo is not None:
        t = t.astimezone(datetime.timezone.utc)
    return t.date().isoformat()


def number(value):
    """A record's numeric field as Decimal (0 when absent or not a number)."""
    if isinstance(value, bool) or value is None:
        return Decimal(0)
    if isinstance(value, (int, Decimal)):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            return Decimal(value)
        except ArithmeticError:
            return Decimal(0)
    return Decimal(0)


def label(value):
    if value is None or value == "":
        return ABSENT
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return str(int(value))
    return str(value)


def read_lines(files):
    if not files:
        files = ["-"]
    for name in files:
        if name == "-":
            yield from sys.stdin
            continue
        with open(name, encoding="utf-8", errors="replace") as f:
            yield from f


def summarize(lines, by):
    """Groups keyed (day, *by, model) -> totals."""
    fields = [f for f in by if f != "model"]
    groups = {}
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line, parse_float=Decimal)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        record = unwrap(entry.get("llm"))
        if record is None:
            continue
        key = (utc_day(entry.get("time")),) + tuple(label(record.get(f)) for f in fields) + (label(record.get("model")),)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"requests": 0, "errors": 0, "cost_microusd": Decimal(0)}
            for col, _ in TOKEN_COLUMNS:
                g[col] = 0
        g["requests"] += 1
        if record.get("error_type", "none") != "none":
            g["errors"] += 1
        for col, field in TOKEN_COLUMNS:
            g[col] += int(number(record.get(field)))
        g["cost_microusd"] += number(record.get("cost_microusd"))
    return ["day"] + fields + ["model"], groups


def usd(microusd):
    return (microusd / MICRO).quantize(SIX_PLACES, rounding=ROUND_HALF_UP)


def totals(groups):
    t = {"requests": 0, "errors": 0, "cost_microusd": Decimal(0)}
    for col, _ in TOKEN_COLUMNS:
        t[col] = 0
    for g in groups.values():
        for k in t:
            t[k] += g[k]
    return t


VALUE_COLUMNS = ["requests", "errors"] + [c for c, _ in TOKEN_COLUMNS] + ["cost_usd"]


def values(g):
    return [g["requests"], g["errors"]] + [g[c] for c, _ in TOKEN_COLUMNS] + [usd(g["cost_microusd"])]


def plain(x):
    """A Decimal as JSON: an int when whole, else a float."""
    if x == x.to_integral_value():
        return int(x)
    return float(x)


def write_json(out, key_columns, groups):
    rows = []
    for key in sorted(groups):
        g = groups[key]
        row = dict(zip(key_columns, key))
        row.update(zip(VALUE_COLUMNS, values(g)))
        row["cost_usd"] = str(row["cost_usd"])
        row["cost_microusd"] = plain(g["cost_microusd"])
        rows.append(row)
    t = totals(groups)
    total = dict(zip(VALUE_COLUMNS, values(t)))
    total["cost_usd"] = str(total["cost_usd"])
    total["cost_microusd"] = plain(t["cost_microusd"])
    text = json.dumps({"group_by": key_columns, "rows": rows, "total": total}, indent=2)
    # cost_usd with its 6 decimals (0.000003, not 3e-06): written as text, then unquoted.
    out.write(re.sub(r'"cost_usd": "(-?[0-9.]+)"', r'"cost_usd": \1', text) + "\n")


def write_csv(out, key_columns, groups):
    w = csv.writer(out, lineterminator="\n")
    w.writerow(key_columns + VALUE_COLUMNS)
    for key in sorted(groups):
        w.writerow(list(key) + [str(v) for v in values(groups[key])])


def write_table(out, key_columns, groups):
    header = key_columns + VALUE_COLUMNS
    body = [list(key) + [str(v) for v in values(groups[key])] for key in sorted(groups)]
    total = ["TOTAL"] + [""] * (len(key_columns) - 1) + [str(v) for v in values(totals(groups))]
    widths = [max(len(r[i]) for r in [header, total] + body) for i in range(len(header))]
    n_keys = len(key_columns)

    def fmt(row):
        cells = [c.ljust(w) if i < n_keys else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    out.write(fmt(header) + "\n")
    for row in body:
        out.write(fmt(row) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    out.write(fmt(total) + "\n")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        key_columns, groups = summarize(read_lines(args.files), args.by)
    except OSError as e:
        print(f"llm_cost.py: {e}", file=sys.stderr)
        return 2
    writer = {"table": write_table, "csv": write_csv, "json": write_json}[args.format]
    try:
        writer(sys.stdout, key_columns, groups)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
