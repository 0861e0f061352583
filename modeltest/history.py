"""Run history: every finished run recorded in one SQLite file, its trend plotted and reported.

    modeltest ... --history runs.db                 (or MODELTEST_HISTORY=runs.db): record the run
    modeltest history --db runs.db [--task T] [--model M] [--last N] [--plot trend.png] [--html report.html]
    modeltest compare --history runs.db CANDIDATE   baseline: the latest PASS (else the first) run of
                                                    the same task, model, data and evaluator; the
                                                    verdict is kept

A run's row: when it finished, task, model, backend, device, dtype, tp / dp, git commit, package
versions, the data's fingerprint, n, metric, evaluator, score, its standard error, errors, duration, output
folder and result JSON, and the verdict of the last comparison it was the candidate of. A
comparison's row: both runs, the verdict, the difference and its p-value, the whole compare.json.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

from .errors import ModelTestError
from .metrics import evaluator_of
from .stats import Z95

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    finished_at TEXT NOT NULL,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    backend TEXT,
    device TEXT,
    dtype TEXT,
    tp INTEGER,
    dp INTEGER,
    git_commit TEXT,
    versions TEXT,
    dataset_fingerprint TEXT,
    n INTEGER,
    metric TEXT,
    evaluator TEXT,
    score REAL,
    stderr REAL,
    errors INTEGER,
    duration_s REAL,
    output_dir TEXT,
    result_json TEXT UNIQUE,
    verdict TEXT
);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    task TEXT NOT NULL,
    model TEXT,
    baseline_run INTEGER REFERENCES runs(id),
    candidate_run INTEGER REFERENCES runs(id),
    verdict TEXT NOT NULL,
    diff REAL,
    p_value REAL,
    result TEXT
);
"""
COLUMNS = ("id", "finished_at", "task", "model", "backend", "device", "dtype", "tp", "dp", "git_commit", "versions",
           "dataset_fingerprint", "n", "metric", "evaluator", "score", "stderr", "errors", "duration_s", "output_dir",
           "result_json", "verdict")  # fmt: skip


def default_db() -> str | None:
    return os.environ.get("MODELTEST_HISTORY") or None


def connect(db: str | Path) -> sqlite3.Connection:
    path = Path(db)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=60)
        con.executescript(SCHEMA)
        have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
        for column in ("evaluator",):  # added after the first histories were written
            if column not in have:
                con.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
    except (OSError, sqlite3.DatabaseError) as e:
        raise ModelTestError(f"{path}: cannot open the history database: {e}") from None
    con.row_factory = sqlite3.Row
    return con


def record_run(db: str | Path, summary: dict, result_json: Path, output_dir: str | Path) -> int:
    """Add (or refresh) a finished run's row; its id."""
    cfg = summary.get("config") or {}
    model_cfg = cfg.get("model") or {}
    row = {
        "finished_at": summary.get("finished_at") or datetime.now().isoformat(timespec="seconds"),
        "task": summary["task"],
        "model": summary.get("model"),
        "backend": cfg.get("backend"),
        "device": summary.get("device"),
        "dtype": summary.get("dtype") or model_cfg.get("data_type"),
        "tp": summary.get("tp"),
        "dp": summary.get("dp"),
        "git_commit": summary.get("git_commit"),
        "versions": json.dumps(summary.get("versions") or {}),
        "dataset_fingerprint": summary.get("dataset_fingerprint"),
        "n": summary.get("total"),
        "metric": summary.get("metric"),
        "evaluator": evaluator_of(summary),
        "score": summary.get("value"),
        "stderr": summary.get("stderr"),
        "errors": summary.get("errors"),
        "duration_s": (summary.get("timings") or {}).get("wall_s"),
        "output_dir": str(Path(output_dir).resolve()),
        "result_json": str(Path(result_json).resolve()),
    }
    names = ", ".join(row)
    marks = ", ".join(f":{k}" for k in row)
    updates = ", ".join(f"{k} = excluded.{k}" for k in row if k != "result_json")
    try:
        with connect(db) as con:
            con.execute(f"INSERT INTO runs ({names}) VALUES ({marks}) ON CONFLICT(result_json) DO UPDATE SET {updates}",
                        row)  # fmt: skip
            return con.execute("SELECT id FROM runs WHERE result_json = ?", (row["result_json"],)).fetchone()[0]
    except sqlite3.Error as e:  # read-only, locked past the timeout, full disk
        raise ModelTestError(f"{db}: cannot record the run in the history database: {e}") from None


def find_run(con: sqlite3.Connection, result_json: Path) -> sqlite3.Row | None:
    return con.execute("SELECT * FROM runs WHERE result_json = ?", (str(Path(result_json).resolve()),)).fetchone()


def baseline_for(con: sqlite3.Connection, run: sqlite3.Row) -> sqlite3.Row | None:
    """The latest run that PASSed (else the first run) with the same task, model, data, metric and
    evaluator, among the runs recorded before `run`."""
    where = "task = ? AND model = ? AND dataset_fingerprint IS ? AND metric IS ? AND evaluator IS ? AND id < ?"
    args = (run["task"], run["model"], run["dataset_fingerprint"], run["metric"], run["evaluator"], run["id"])
    passed = con.execute(f"SELECT * FROM runs WHERE {where} AND verdict = 'PASS' ORDER BY finished_at DESC, id DESC "
                         "LIMIT 1", args).fetchone()  # fmt: skip
    return passed or con.execute(f"SELECT * FROM runs WHERE {where} ORDER BY finished_at, id LIMIT 1", args).fetchone()


def record_comparison(con: sqlite3.Connection, task: dict, baseline_id: int | None, candidate_id: int, model) -> None:
    with con:
        con.execute(
            "INSERT INTO comparisons (at, task, model, baseline_run, candidate_run, verdict, diff, p_value, result) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (datetime.now().isoformat(timespec="seconds"), task["task"], model, baseline_id, candidate_id,
             task["verdict"], task.get("diff"), task.get("p_value"), json.dumps(task, default=str)),
        )  # fmt: skip
        con.execute("UPDATE runs SET verdict = ? WHERE id = ?", (task["verdict"], candidate_id))


def runs(con: sqlite3.Connection, task: str | None = None, model: str | None = None, last: int | None = None) -> list:
    where, args = [], []
    for column, value in (("task", task), ("model", model)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY finished_at, id"
    rows = con.execute(sql, args).fetchall()
    return rows[-last:] if last else rows


# ---- plot and report ----------------------------------------------------------------------------------


def plot(rows: list, path: Path | None = None) -> bytes:
    """Score over time per task / model / device, with 95% error bars and FAIL verdicts marked; PNG bytes
    (also written to `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    series: dict[tuple, list] = {}
    for r in rows:
        if r["score"] is not None:  # (a run with no figure: a performance_maxbs case with no answer)
            series.setdefault((r["task"], r["model"], r["device"]), []).append(r)
    for (task, model, device), points in series.items():
        x = [datetime.fromisoformat(p["finished_at"]) for p in points]
        y = [p["score"] for p in points]
        err = [Z95 * (p["stderr"] or 0.0) for p in points]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{task} · {model} · {device}")
        failed = [(xi, yi) for xi, yi, p in zip(x, y, points, strict=True) if p["verdict"] == "FAIL"]
        if failed:
            ax.scatter(*zip(*failed, strict=True), marker="x", s=120, color="red", zorder=5,
                       label="FAIL" if "FAIL" not in ax.get_legend_handles_labels()[1] else None)  # fmt: skip
    ax.set_xlabel("finished")
    ax.set_ylabel("score (± 95% CI)")
    ax.set_title("modeltest history")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def html_report(con: sqlite3.Connection, rows: list, path: Path) -> None:
    """One self-contained page: the plot, the runs, the latest comparison and its top regressions."""
    png = base64.b64encode(plot(rows)).decode()
    latest = con.execute("SELECT * FROM comparisons ORDER BY id DESC LIMIT 1").fetchone()
    runs_html = "".join(
        f"<tr><td>{r['id']}</td><td>{_e(r['finished_at'])}</td><td>{_e(r['task'])}</td><td>{_e(r['model'])}</td>"
        f"<td>{_e(r['device'])}</td><td>{_e(r['dtype'])}</td><td>{r['tp']}/{r['dp']}</td><td>{r['n']}</td>"
        f"<td>{_num(r['score'])} ± {_num(r['stderr'])}</td><td>{r['errors']}</td>"
        f"<td class='{(r['verdict'] or '').lower()}'>{_e(r['verdict'] or '')}</td><td>{_e((r['git_commit'] or '')[:10])}</td></tr>"
        for r in reversed(rows)
    )  # fmt: skip
    cmp_html = "<p>No comparison yet.</p>"
    if latest is not None:
        task = json.loads(latest["result"])
        top = "".join(
            f"<tr><td>{_e(t['id'])}</td><td>{_e(t.get('question'))}</td><td>{_e(t['baseline_prediction'])}</td>"
            f"<td>{_e(t['candidate_prediction'])}</td><td>{t['gain']:+.3f}</td><td>{_e(', '.join(map(str, t['references'][:5])))}</td></tr>"
            for t in task.get("top_regressed", [])
        )  # fmt: skip
        cmp_html = (
            f"<p>{_e(latest['at'])}: <b>{_e(latest['task'])}</b>, run {latest['candidate_run']} against run "
            f"{latest['baseline_run']}: diff {_num(task.get('diff'), '+.4f')} (95% CI {_e(task.get('ci95'))}), "
            f"p = {_num(task.get('p_value'), '.3g')}, <span class='{latest['verdict'].lower()}'>{_e(latest['verdict'])}</span>"
            f"</p><table><tr><th>id</th><th>question</th><th>baseline</th><th>candidate</th><th>score</th>"
            f"<th>references</th></tr>{top}</table>"
        )  # fmt: skip
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>modeltest history</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:2px 6px;font-size:13px}}.fail{{color:#b00;font-weight:bold}}.pass{{color:#070}}</style></head><body>
<h1>modeltest history</h1>
<img alt="score over time" src="data:image/png;base64,{png}">
<h2>Latest comparison</h2>{cmp_html}
<h2>Runs</h2><table><tr><th>id</th><th>finished</th><th>task</th><th>model</th><th>device</th><th>dtype</th>
<th>tp/dp</th><th>n</th><th>score</th><th>errors</th><th>verdict</th><th>commit</th></tr>{runs_html}</table>
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, fmt: str = ".4f") -> str:
    return "" if value is None else format(value, fmt)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modeltest history", description="The runs recorded in a history database.",
                                epilog="exit codes:\n  0    the runs were listed (and --plot / --html written)\n"
                                "  2    bad input or usage: no or unreadable database, bad --last, an unwritable "
                                "output (an error line on stderr)\n  130  interrupted",
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # the epilog's lines  # fmt: skip
    p.add_argument("--db", default=default_db(), help="the SQLite file (default: $MODELTEST_HISTORY)")
    p.add_argument("--task")
    p.add_argument("--model")
    p.add_argument("--last", type=int, help="only the last N runs")
    p.add_argument("--plot", help="write score over time to this PNG")
    p.add_argument("--html", help="write a self-contained report page to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    from tabulate import tabulate

    args = build_parser().parse_args(argv)
    if not args.db:
        raise ModelTestError("no history database: pass --db FILE or set MODELTEST_HISTORY")
    if not Path(args.db).is_file():
        raise ModelTestError(f"{args.db}: no such history database")
    if args.last is not None and args.last < 1:
        raise ModelTestError(f"--last must be >= 1, got {args.last}")
    con = connect(args.db)
    rows = runs(con, args.task, args.model, args.last)
    table = [[r["id"], r["finished_at"], r["task"], r["model"], r["device"], r["dtype"], f"{r['tp']}/{r['dp']}",
              r["n"], f"{_num(r['score'])} ± {_num(r['stderr'])}", r["errors"], r["verdict"] or "",
              (r["git_commit"] or "")[:10]] for r in rows]  # fmt: skip
    print(tabulate(table, headers=["id", "finished", "task", "model", "device", "dtype", "tp/dp", "n", "score",
                                   "errors", "verdict", "commit"], tablefmt="github"))  # fmt: skip
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.html:
        html_report(con, rows, Path(args.html))
        print(f"report: {args.html}")
    return 0
