"""How the `vdsmconn` client shows replies: pure functions from results to text, and the
live table of `vdsmconn watch`."""

from __future__ import annotations

import collections
import json
import time
from typing import Any

ERROR_WIDTH = 60
WATCH_RECENT = 5  # events shown under the live table


def text(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or "-"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_error(error: Any) -> str:
    if not isinstance(error, dict):
        return "" if error is None else text(error)
    return f"{error.get('code', '?')} {error.get('message', '')}".strip()


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    table = [headers, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table)
    return "\n".join(line.rstrip() for line in lines)


def format_list(result: dict[str, Any]) -> str:
    rows = []
    for cid in sorted(result):
        status = result[cid] if isinstance(result[cid], dict) else {}
        conn = status.get("connection")
        rows.append([
            cid,
            text(conn.get("type") if isinstance(conn, dict) else None),
            text(status.get("state")),
            text(status.get("refs")),
            text(status.get("path")),
            _shorten(format_error(status.get("lastError")), ERROR_WIDTH),
        ])
    return format_table(["CID", "TYPE", "STATE", "REFS", "PATH", "ERROR"], rows)


def format_test(result: dict[str, Any]) -> str:
    rows = []
    for step in result.get("steps") or []:
        step = step if isinstance(step, dict) else {}
        seconds = step.get("seconds")
        rows.append([
            text(step.get("step")),
            "ok" if step.get("ok") else "FAILED",
            f"{seconds:.3f}" if isinstance(seconds, int | float) else "-",
            text(step.get("detail")) if step.get("detail") is not None else "",
        ])
    table = format_table(["STEP", "RESULT", "SECONDS", "DETAIL"], rows)
    return f"{table}\n{'ok' if result.get('ok') else 'FAILED'}"


def format_targets(result: list[dict[str, Any]]) -> str:
    targets = [t for t in result if isinstance(t, dict)]
    rows = [[text(t.get("portal")), text(t.get("tpgt")), text(t.get("iqn"))] for t in targets]
    return format_table(["PORTAL", "TPGT", "IQN"], rows)


def format_mapping(value: dict[str, Any], indent: int = 0) -> str:
    lines = []
    pad = "  " * indent
    for name, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{name}:")
            lines.append(format_mapping(item, indent + 1))
        elif isinstance(item, list) and any(isinstance(i, dict | list) for i in item):
            lines.append(f"{pad}{name}:")
            lines.extend(f"{pad}  - {text(i)}" for i in item)
        elif isinstance(item, list):
            lines.append(f"{pad}{name}: {', '.join(text(i) for i in item)}")
        else:
            lines.append(f"{pad}{name}: {text(item)}")
    return "\n".join(lines)


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    if value < 1024:
        return f"{value} B"
    size = float(value)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def _problems(result: dict[str, Any]) -> list[str]:
    return [f"error: {','.join(p.get('connectionIDs') or []) or '-'}: "
            f"{format_error(p.get('error'))}" for p in result.get("errors") or []
            if isinstance(p, dict)]


def format_devices(result: dict[str, Any]) -> str:
    rows = []
    for d in result.get("devices") or []:
        if not isinstance(d, dict):
            continue
        sessions = [s for s in d.get("sessions") or [] if isinstance(s, dict)]
        paths = ", ".join(f"{s.get('iface')}:{s.get('portal')}" for s in sessions) or "-"
        rows.append([
            text(d.get("path")), text(d.get("wwid")),
            " ".join(x for x in (d.get("vendor"), d.get("product")) if isinstance(x, str))
            or "-",
            _size(d.get("size")),
            f"{d.get('logicalBlockSize', '-')}/{d.get('physicalBlockSize', '-')}",
            paths, ",".join(d.get("connectionIDs") or []) or "-",
            _shorten(format_error(d.get("error")), ERROR_WIDTH),
        ])
    table = format_table(["PATH", "WWID", "MODEL", "SIZE", "BLOCKS", "SESSIONS", "CIDS",
                          "ERROR"], rows)
    return "\n".join([table, *_problems(result)])


def format_domains(result: dict[str, Any]) -> str:
    rows = []
    for d in result.get("domains") or []:
        if not isinstance(d, dict):
            continue
        meta = d["metadata"] if isinstance(d.get("metadata"), dict) else {}
        rows.append([
            text(d.get("sdUUID")), text(d.get("type")),
            text(d.get("path") if d.get("type") == "file" else d.get("vgName")),
            text(meta.get("CLASS")), text(meta.get("VERSION")),
            _shorten(text(meta.get("DESCRIPTION")), 30),
            ",".join(d.get("connectionIDs") or []) or "-",
        ])
    table = format_table(["SDUUID", "TYPE", "PATH/VG", "CLASS", "VERSION", "DESCRIPTION",
                          "CIDS"], rows)
    skipped = [f"skipped: {s.get('path')}: {s.get('reason')}"
               for s in result.get("skipped") or [] if isinstance(s, dict)]
    return "\n".join([table, *skipped, *_problems(result)])


def format_unmanaged(result: dict[str, Any]) -> str:
    cids = result.get("connectionIDs") or []
    return "\n".join(f"unmanaged {cid}" for cid in cids) or "no connection ID matched"


def format_time(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def format_event(params: dict[str, Any]) -> str:
    cids = params.get("connectionIDs") or []
    line = (
        f"{format_time(params.get('time'))}  {','.join(map(str, cids)) or '-'}  "
        f"{text(params.get('oldState'))} -> {text(params.get('newState'))}  "
        f"key={text(params.get('key'))}"
    )
    error = params.get("lastError")
    return f"{line}  error={format_error(error)}" if error else line


class WatchTable:
    """The connections `vdsmconn watch` shows, kept current from state-change events."""

    def __init__(self, statuses: dict[str, Any]) -> None:
        self.rows: dict[str, dict[str, Any]] = {
            cid: dict(st) for cid, st in statuses.items() if isinstance(st, dict)}
        self.recent: collections.deque[str] = collections.deque(maxlen=WATCH_RECENT)

    def apply(self, params: dict[str, Any]) -> list[str]:
        """Apply one event; returns the CIDs the table does not know yet."""
        self.recent.append(format_event(params))
        key, new = params.get("key"), params.get("newState")
        if new is None:
            for cid in [c for c, row in self.rows.items() if row.get("key") == key]:
                del self.rows[cid]
            return []
        unknown = []
        for cid in params.get("connectionIDs") or []:
            row = self.rows.get(cid)
            if row is None:
                unknown.append(cid)
                row = self.rows[cid] = {"key": key}
            row.update(state=new, lastError=params.get("lastError"), since=params.get("time"),
                       key=key, connected=new in ("connected", "degraded"))
        return unknown

    def render(self, title: str) -> str:
        rows = []
        for cid in sorted(self.rows):
            st = self.rows[cid]
            conn = st.get("connection")
            rows.append([
                cid, text(conn.get("type") if isinstance(conn, dict) else None),
                text(st.get("state")), text(st.get("refs")),
                format_time(st.get("since"))[11:19] if st.get("since") else "-",
                text(st.get("path")), _shorten(format_error(st.get("lastError")), ERROR_WIDTH),
            ])
        table = format_table(["CID", "TYPE", "STATE", "REFS", "SINCE", "PATH", "ERROR"], rows)
        recent = "\n".join(self.recent) or "(none yet)"
        return f"{title}\n\n{table}\n\nrecent events:\n{recent}\n"
