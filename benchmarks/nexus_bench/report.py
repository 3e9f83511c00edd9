"""Ratios, the performance goals as pass or fail, and the printed tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = dict[str, Any]

NGINX = "nginx-proxy"
DIRECT = "direct"
NEXUS = "nexus-proxy"
NEXUS_2W = "nexus-proxy-2w"
PEERS = ("asgiproxy", "fastapi-proxy-lib")

# Metrics that get a ratio column, and whether the direct row has them (it has no proxy).
RATIO_METRICS = {"rps": True, "mean_ms": True, "p99_ms": True,
                 "cpu_us_per_request": False, "peak_rss_mib": False}
TRANSFER_RATIO_METRICS = {"mib_per_s": True, "cpu_s": False, "peak_rss_mib": False,
                          "rss_rise_mib": False}


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def add_ratios(rows: list[Row], group_key: str, metrics: dict[str, bool]) -> None:
    """Set row["ratios"][metric] = {"nginx": x, "direct": y} against the rows of the same group."""
    for row in rows:
        peers = {other["target"]: other for other in rows
                 if other[group_key] == row[group_key] and other["status"] == "ok"}
        ratios = {}
        for metric, has_direct in metrics.items():
            entry = {"nginx": _ratio(row.get(metric), peers.get(NGINX, {}).get(metric))}
            if has_direct:
                entry["direct"] = _ratio(row.get(metric), peers.get(DIRECT, {}).get(metric))
            ratios[metric] = entry
        row["ratios"] = ratios


def _find(rows: list[Row], workload: str, target: str) -> Row | None:
    for row in rows:
        if row["workload"] == workload and row["target"] == target:
            return row
    return None


def _usable(row: Row | None) -> bool:
    return row is not None and row["status"] == "ok"


def _goal(name: str, passed: bool | None, detail: str) -> dict[str, str]:
    status = {None: "not measured", True: "pass", False: "fail"}[passed]
    return {"goal": name, "status": status, "detail": detail}


def _why_missing(*rows: Row | None) -> str:
    for row in rows:
        if row is None:
            return "row not run"
        if row["status"] != "ok":
            return f"{row['target_label']}: {row['status']} {row.get('reason', '')}".strip()
    return ""


def _relative_goal(rows: list[Row], name: str, workload: str, metric: str,
                   check: Callable[[float, float], bool], describe: Callable[[float, float], str],
                   target: str = NEXUS, reference: str = NGINX) -> dict[str, str]:
    row, ref = _find(rows, workload, target), _find(rows, workload, reference)
    if not (_usable(row) and _usable(ref)):
        return _goal(name, None, _why_missing(row, ref))
    assert row is not None and ref is not None
    value, base = row[metric], ref[metric]
    return _goal(name, check(value, base), describe(value, base))


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, str]]:
    """Return each performance goal with pass, fail or not measured."""
    rows: list[Row] = result["rows"]
    goals = [
        _relative_goal(
            rows, "small GET, 50 conns: req/s >= 0.15 x nginx", "small_get_c50", "rps",
            lambda v, b: v >= 0.15 * b, lambda v, b: f"{v / b:.2f} x nginx"),
        _relative_goal(
            rows, "small GET, 50 conns: p99 <= 8 x nginx p99", "small_get_c50", "p99_ms",
            lambda v, b: v <= 8 * b, lambda v, b: f"{v:.2f} ms = {v / b:.1f} x nginx"),
        _relative_goal(
            rows, "small GET, 1 conn: mean <= nginx mean + 0.35 ms", "small_get_c1", "mean_ms",
            lambda v, b: v <= b + 0.35, lambda v, b: f"{v:.3f} ms = nginx {v - b:+.3f} ms"),
        _relative_goal(
            rows, "1 MiB GET, 50 conns: req/s >= 0.3 x nginx", "get_1mib_c50", "rps",
            lambda v, b: v >= 0.3 * b, lambda v, b: f"{v / b:.2f} x nginx"),
        _relative_goal(
            rows, "16 KiB POST, 50 conns: req/s >= 0.12 x nginx", "post_16kib_c50", "rps",
            lambda v, b: v >= 0.12 * b, lambda v, b: f"{v / b:.2f} x nginx"),
        _peers_goal(rows, result["workloads"]),
        _relative_goal(
            rows, "2 workers: small GET, 50 conns req/s >= 1.3 x 1 worker", "small_get_c50",
            "rps", lambda v, b: v >= 1.3 * b, lambda v, b: f"{v / b:.2f} x 1 worker",
            target=NEXUS_2W, reference=NEXUS),
    ]

    idle = result.get("idle_rss_mib")
    goals.append(_goal("idle RSS <= 60 MiB", None if idle is None else idle <= 60,
                       "not measured" if idle is None else f"{idle:.1f} MiB"))
    for direction in ("upload", "download"):
        row = next((t for t in result["transfers"]
                    if t["direction"] == direction and t["target"] == NEXUS), None)
        name = f"{result['transfer_label']} {direction}: peak RSS rise <= 16 MiB"
        if row is not None and row["status"] != "ok":
            goals.append(_goal(name, False, f"{row['status']}: {row.get('reason', '')}"))
        elif row is None or row.get("rss_rise_mib") is None:
            goals.append(_goal(name, None, "not measured"))
        else:
            rise = row["rss_rise_mib"]
            goals.append(_goal(name, rise <= 16, f"+{rise:.1f} MiB"))
    return goals


def _peers_goal(rows: list[Row], workloads: list[dict[str, Any]]) -> dict[str, str]:
    name = "req/s ahead of asgiproxy and fastapi-proxy-lib on every workload"
    behind, missing = [], []
    for workload in workloads:
        ours = _find(rows, workload["key"], NEXUS)
        for peer in PEERS:
            theirs = _find(rows, workload["key"], peer)
            if not (_usable(ours) and _usable(theirs)):
                missing.append(f"{workload['label']} / {peer}")
                continue
            assert ours is not None and theirs is not None
            if ours["rps"] <= theirs["rps"]:
                behind.append(
                    f"{workload['label']}: {peer} {theirs['rps']:.0f} >= {ours['rps']:.0f}")
    if behind:
        return _goal(name, False, "; ".join(behind))
    if missing:
        return _goal(name, None, f"peers not measured ({len(missing)} rows missing)")
    return _goal(name, True, "ahead on all rows")


def _number(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is not None:
        return f"{value:.{digits}f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _render(headers: list[str], lines: list[list[str]], left: int) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *lines, strict=True)]

    def render_line(cells: list[str]) -> str:
        parts = [cell.ljust(width) if index < left else cell.rjust(width)
                 for index, (cell, width) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "-" * len(render_line(headers))
    return "\n".join([render_line(headers), rule, *(render_line(line) for line in lines)])


def load_table(result: dict[str, Any]) -> str:
    """Return the wrk rows as a text table, one block per workload."""
    headers = ["workload", "target", "req/s", "/ngx", "/dir", "mean ms", "/ngx", "/dir",
               "p99 ms", "/ngx", "/dir", "CPU us/req", "/ngx", "peak RSS MiB", "/ngx"]
    lines = []
    previous = None
    for row in result["rows"]:
        workload = row["workload_label"] if row["workload"] != previous else ""
        previous = row["workload"]
        if row["status"] != "ok":
            lines.append([workload, row["target_label"], row["status"], *[""] * 12])
            continue
        ratios = row["ratios"]
        label = row["target_label"] + (" *" if row.get("busy") else "")
        cells = [workload, label, _number(row["rps"], 0)]
        for metric in ("rps", "mean_ms", "p99_ms"):
            if metric != "rps":
                cells.append(_number(row[metric]))
            cells += [_number(ratios[metric]["nginx"], 2), _number(ratios[metric]["direct"], 2)]
        cells += [_number(row["cpu_us_per_request"], 0),
                  _number(ratios["cpu_us_per_request"]["nginx"], 2),
                  _number(row["peak_rss_mib"], 1), _number(ratios["peak_rss_mib"]["nginx"], 2)]
        lines.append(cells)
    return _render(headers, lines, left=2)


def transfer_table(result: dict[str, Any]) -> str:
    """Return the upload and download rows as a text table."""
    headers = ["transfer", "target", "MiB/s", "/ngx", "/dir", "seconds", "CPU s", "/ngx",
               "RSS before MiB", "peak RSS MiB", "rise MiB", "/ngx"]
    lines = []
    for row in result["transfers"]:
        label = f"{result['transfer_label']} {row['direction']}"
        if row["status"] != "ok":
            lines.append([label, row["target_label"], row["status"], *[""] * 9])
            continue
        ratios = row["ratios"]
        lines.append([
            label, row["target_label"], _number(row["mib_per_s"], 0),
            _number(ratios["mib_per_s"]["nginx"], 2), _number(ratios["mib_per_s"]["direct"], 2),
            _number(row["seconds"], 2), _number(row["cpu_s"], 2),
            _number(ratios["cpu_s"]["nginx"], 2), _number(row["rss_before_mib"], 1),
            _number(row["peak_rss_mib"], 1), _number(row["rss_rise_mib"], 1),
            _number(ratios["rss_rise_mib"]["nginx"], 2),
        ])
    return _render(headers, lines, left=2)


def format_report(result: dict[str, Any]) -> str:
    """Return the whole printed report: tables, idle RSS, goals and notes."""
    mode = "quick" if result["quick"] else "full"
    settings = result["settings"]
    parts = [
        f"nexus-proxy benchmark, {mode} run, {result['date']}: wrk 1 thread, "
        f"{settings['duration_s']} s per row after {settings['warmup_s']} s warm-up.",
        "/ngx and /dir are ratios to the nginx proxy and direct rows of the same workload.",
        "",
        load_table(result),
    ]
    if any(row.get("busy") for row in result["rows"]):
        parts.append(f"* measured while other processes used more than "
                     f"{settings['busy_cores_limit']} cores")
    parts += [
        "",
        transfer_table(result),
        "",
        "idle RSS of nexus-proxy (1 worker): "
        + ("-" if result.get("idle_rss_mib") is None else f"{result['idle_rss_mib']:.1f} MiB"),
        "",
        "Goals (nexus-proxy 1 worker unless named):",
    ]
    for goal in result["goals"]:
        parts.append(f"  {goal['status'].upper():<12} {goal['goal']}: {goal['detail']}")
    if result["notes"]:
        parts += ["", "Notes:"]
        parts += [f"  - {note}" for note in result["notes"]]
    parts += ["", f"elapsed: {result['elapsed_s']:.0f} s"]
    return "\n".join(parts)
