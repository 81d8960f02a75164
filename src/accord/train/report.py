"""``accord report RUN_DIR``: one HTML page of a training run, from what the run wrote into its output_dir.

    accord report runs/clip/                 # -> runs/clip/report.html
    accord report runs/clip/ --out clip.html

Read: ``metrics.jsonl`` (losses per pair, learning rate, throughput and data wait per rank, evaluations),
``config.json``, ``ranks.json``, ``data_rank*.json`` (each rank's samples read and skipped by reason, written at the
end of the run) and ``profile/rank*.stages.json`` (``log.profile_start``). Sections: the run, the loss per pair,
evaluations over steps (retrieval R@1, zero-shot, compositional: tables, the last evaluation in full), throughput
and data wait per rank, skipped samples by reason, the profile table. Figures are tables and plots, never raw JSON.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from accord.errors import InputError, command
from accord.evaluation.plots import pyplot


def png_data(fig: Any) -> str:
    """A matplotlib figure as a ``data:`` URL (the page is one self-contained file); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: which pairs a logged step happened to sample makes single points jump."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def table(header: list[str], rows: list[list[object]]) -> str:
    """An HTML table (cells escaped; floats to 4 significant digits)."""

    def cell(c: object) -> str:
        return f"{c:.4g}" if isinstance(c, float) else ("" if c is None else str(c))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def loss_plot(metrics: list[dict[str, Any]]) -> str:
    """The loss per pair and in total over steps (faint: as logged; bold: moving mean), as a data URL."""
    plt = pyplot()
    rows = [r for r in metrics if "loss" in r]
    window = max(1, len(rows) // 25)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
        have = [r for r in rows if key in r]  # a pair is logged only when the window had samples for it
        steps, values = [r["step"] for r in have], [r[key] for r in have]
        (line,) = ax.plot(steps, values, alpha=0.2, lw=0.8)
        ax.plot(steps, smooth(values, window), color=line.get_color(), lw=1.6, label=key[5:])
    ax.plot([r["step"] for r in rows], smooth([r["loss"] for r in rows], window), "k", lw=2, label="total")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (moving mean of {window} logs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_data(fig)


def _per_rank_plot(rows: list[dict[str, Any]], key: str, label: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ranks = max(len(r[key]) for r in rows)
    for rank in range(ranks):
        have = [r for r in rows if len(r[key]) > rank]
        ax.plot([r["step"] for r in have], [r[key][rank] for r in have], lw=1.2, label=f"rank {rank}")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.legend(fontsize=7, ncol=min(ranks, 8))
    ax.grid(alpha=0.3)
    return png_data(fig)


def _run_section(run: Path, metrics: list[dict[str, Any]]) -> str:
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    ranks = json.loads((run / "ranks.json").read_text()) if (run / "ranks.json").is_file() else []
    towers = cfg.get("model", {}).get("towers", {})
    steps = max((r["step"] for r in metrics), default=0)
    rows: list[list[object]] = [
        ["steps logged", steps],
        ["towers", ", ".join(f"{m}: {t.get('kind')}" for m, t in towers.items())],
        ["ranks", f"{len(ranks)} on {len({r['node_rank'] for r in ranks})} node(s)" if ranks else None],
        ["batch per rank", cfg.get("data", {}).get("batch_size")],
        [
            "ZeRO stage, precision",
            f"{cfg.get('deepspeed', {}).get('zero_stage')}, {cfg.get('deepspeed', {}).get('precision')}",
        ],  # fmt: skip
        ["loss", cfg.get("loss", {}).get("kind")],
        ["data.train", cfg.get("data", {}).get("train")],
    ]
    return "<h2>Run</h2>" + table(["setting", "value"], [r for r in rows if r[1] is not None])


def _eval_section(metrics: list[dict[str, Any]]) -> str:
    evals = [r for r in metrics if any(k.startswith("eval/") for k in r)]
    if not evals:
        return "<h2>Evaluations</h2><p>No evaluation was logged (set data.val, eval.every).</p>"
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    groups = {
        "Retrieval R@1": [k for k in keys if k.endswith("/R@1") and not k.startswith("eval/zeroshot/")],
        "Zero-shot classification": [k for k in keys if k.startswith("eval/zeroshot/")],
        "Compositional (share of samples whose caption beats its one-edit negative)": [
            k for k in keys if k.startswith("eval/compositional/")
        ],
    }
    out = "<h2>Evaluations over steps</h2>"
    for title, group in groups.items():
        if not group:
            continue
        short = [k[len("eval/") :] for k in group]
        if len(group) <= 12:  # over steps
            rows = [[r["step"], *(r.get(k) for k in group)] for r in evals]
            out += f"<h3>{html.escape(title)}</h3>" + table(["step", *short], rows)
        else:  # many categories: the last evaluation, one row each
            last = evals[-1]
            rows = [
                [s, last.get(k), evals[0].get(k) if len(evals) > 1 else None] for s, k in zip(short, group, strict=True)
            ]
            out += f"<h3>{html.escape(title)}</h3>" + table(
                ["metric", f"step {last['step']}", f"step {evals[0]['step']}" if len(evals) > 1 else ""], rows
            )
    return out


def _throughput_section(metrics: list[dict[str, Any]]) -> str:
    rows = [r for r in metrics if "samples_per_s_per_rank" in r]
    if not rows:
        return ""
    ranks = max(len(r["samples_per_s_per_rank"]) for r in rows)

    def mean(key: str, rank: int) -> float | None:
        vals = [r[key][rank] for r in rows[1:] or rows if key in r and len(r[key]) > rank]  # the first: start-up
        return sum(vals) / len(vals) if vals else None

    summary = [
        [
            rank,
            mean("samples_per_s_per_rank", rank),
            mean("data_wait_s_per_rank", rank),
            max(
                (r["peak_rss_mib_per_rank"][rank] for r in rows if len(r.get("peak_rss_mib_per_rank", [])) > rank),
                default=None,
            ),
        ]  # fmt: skip
        for rank in range(ranks)
    ]
    head = ["rank", "samples/s (mean of logs after the first)", "data wait s per log window", "peak RSS MiB"]
    return (
        "<h2>Throughput and data wait per rank</h2>"
        + table(head, summary)
        + f'<img src="{_per_rank_plot(rows, "samples_per_s_per_rank", "samples/s")}">'
        + (
            f'<img src="{_per_rank_plot(rows, "data_wait_s_per_rank", "data wait (s per window)")}">'
            if all("data_wait_s_per_rank" in r for r in rows)
            else ""
        )
    )


def _skipped_section(run: Path, metrics: list[dict[str, Any]]) -> str:
    files = sorted(run.glob("data_rank*.json"))
    if not files:
        logged = max((r.get("skipped_samples", 0) for r in metrics), default=0)
        return f"<h2>Skipped samples</h2><p>{logged} skipped (the run wrote no data_rank*.json with the reasons).</p>"
    reasons: Counter[str] = Counter()
    read = 0
    for f in files:
        data = json.loads(f.read_text())
        read += data["read"]
        reasons.update(data["skipped"])
    rows: list[list[object]] = [[k, v] for k, v in sorted(reasons.items())] or [["(none)", 0]]
    return f"<h2>Skipped samples</h2><p>{read} samples read by {len(files)} rank(s).</p>" + table(
        ["reason", "samples"], rows
    )


def _profile_section(run: Path) -> str:
    files = sorted((run / "profile").glob("rank*.stages.json"))
    if not files:
        return ""
    per_rank = [json.loads(f.read_text()) for f in files]
    stages = list(per_rank[0]["ms_per_step"])
    rows = [[s, *(p["ms_per_step"].get(s) for p in per_rank)] for s in stages]
    first, last = per_rank[0]["steps"]
    return f"<h2>Profile (ms per step, steps {first}-{last})</h2>" + table(
        ["stage", *(f.name.split(".")[0] for f in files)], rows
    )


def write_run_report(run: Path, out: Path | None = None) -> Path:
    """Render ``run``'s report (default ``run/report.html``) and return its path."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{run}: no metrics.jsonl (not the output_dir of an accord train run)")
    metrics = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            metrics.append(json.loads(line))
        except ValueError:
            raise InputError(f"{path}:{n}: not a JSON line") from None
    if not any("loss" in r for r in metrics):
        raise InputError(f"{path}: no step was logged yet")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>accord run {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:center}}</style></head><body>
<h1>accord run: {html.escape(str(run))}</h1>
{_run_section(run, metrics)}
<h2>Loss per pair</h2><img src="{loss_plot(metrics)}">
{_eval_section(metrics)}
{_throughput_section(metrics)}
{_skipped_section(run, metrics)}
{_profile_section(run)}
</body></html>"""
    out = out or run / "report.html"
    out.write_text(page)
    return out


@command("accord report")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accord report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training run's output_dir")
    p.add_argument("--out", default=None, help="the HTML file (default RUN/report.html)")
    args = p.parse_args(argv)
    path = write_run_report(Path(args.run), Path(args.out) if args.out else None)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
