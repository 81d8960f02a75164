"""The demo's report: loss curves, held-out retrieval vs chance, score histograms, examples (one HTML file)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from accord.data.decode import decode_video
from accord.evaluation.compositional import write as write_compositional
from accord.evaluation.plots import pyplot
from accord.shards.read import shard_items
from accord.train.report import loss_plot, png_data, table, write_run_report

plt = pyplot()


def _histograms(scores: dict[str, Any]) -> str:
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3), squeeze=False)
    for ax, (medium, s) in zip(axes[0], scores.items(), strict=True):
        bins = 20
        ax.hist(s["matched_scores"], bins=bins, alpha=0.6, label="matched caption")
        ax.hist(s["mismatched_scores"], bins=bins, alpha=0.6, label="one word swapped")
        ax.set_title(f"{medium}-text CLIP-S (held out)")
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    return png_data(fig)


def _media(medium: str, data: bytes) -> str:
    """An example as the reader should meet it: an image, a video as an animation, a sound as a player."""
    if medium == "audio":  # the shard's FLAC, playable in the page
        return f'<audio controls preload="none" src="data:audio/flac;base64,{base64.b64encode(data).decode()}"></audio>'
    if medium == "image":
        frames = [Image.open(io.BytesIO(data)).convert("RGB")]
    else:
        frames = [Image.fromarray(f.numpy()) for f in decode_video(data, 8, "pyav")]
    frames = [f.resize((96, 96)) for f in frames]
    buf = io.BytesIO()
    if len(frames) == 1:
        frames[0].save(buf, format="PNG")
        return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" width=96>'
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=150, loop=0)
    return f'<img src="data:image/gif;base64,{base64.b64encode(buf.getvalue()).decode()}" width=96>'


def _chance(val_dir: Path, pairs: list[str]) -> dict[str, float]:
    """R@1 of a random model for medium->text: 1 / number of distinct captions among the pair's samples."""
    items = list(shard_items(str(val_dir)))
    out = {}
    for pair in pairs:
        medium = pair.split("-")[1]
        captions = {i["text"].strip() for i in items if medium in i and i.get("text")}
        out[pair] = 1.0 / len(captions) if captions else float("nan")
    return out


def _compositional_section(out: Path, result: dict[str, Any] | None) -> str:
    """Per medium: each category's preference for the true caption over its one-edit negative, beside a blind
    text-only model and the text tower's own view of the two captions (accord.evaluation.compositional)."""
    if not result:
        return ""
    write_compositional(result, out / "compositional")
    plot = base64.b64encode((out / "compositional" / "compositional.png").read_bytes()).decode()
    tables = ""
    for medium, res in result["media"].items():
        rows = "".join(
            f"<tr><td>{html.escape(c)}{' (biased)' if v['biased'] else ''}</td><td>{v['n']}</td>"
            f"<td>{v['scores']['cosine']['all']:.3f}</td>"
            + "".join(f"<td>{x:.3f}</td>" for x in v["blind"].values())
            + f"<td>{v.get('text_probe_cos', {}).get('mean', float('nan')):.3f}</td>"
            f"<td>{html.escape(v['example'][0])} / {html.escape(v['example'][1])}</td></tr>"
            for c, v in res["categories"].items()
        )
        blind = "".join(f"<th>blind: {html.escape(b)}</th>" for b in next(iter(res["categories"].values()))["blind"])
        tables += (
            f"<h3>{medium} ({res['n']} held-out samples)</h3><table><tr><th>negative</th><th>n</th>"
            f"<th>cosine prefers the caption</th>{blind}<th>text tower cos(caption, negative)</th>"
            f"<th>example</th></tr>{rows}</table>"
        )
    return (
        "<h2>Compositional: each caption against its one-edit negatives</h2><p>The share of held-out samples whose "
        "own caption scores above the same caption with one thing made false (0.5: the score cannot tell). Blind "
        "models see only the text (trained on the training captions); '(biased)': the text alone solves it. The text "
        "tower column is the cosine of the two captions' features before the projection: near 1, the projection "
        f'has nothing to separate.</p><img src="data:image/png;base64,{plot}" width=900>{tables}'
    )


def _data_section(
    counts: dict[str, int], train_stats: dict[str, Any], val_stats: dict[str, Any], timings: dict[str, float]
) -> str:
    """What the demo rendered, what the shard builder made of it, and where the time went: three tables."""
    keys = ("inputs", "written", "rejected", "shards")
    return (
        "<h3>Rendered samples</h3>"
        + table(["kind", "samples"], [[k, v] for k, v in counts.items()])
        + "<h3>Shards</h3>"
        + table(
            ["split", *keys],
            [[name, *(st[k] for k in keys)] for name, st in (("train", train_stats), ("val", val_stats))],
        )
        + "<h3>Time</h3>"
        + table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])
    )


def write_report(
    out: Path,
    counts: dict[str, int],
    train_stats: dict,
    val_stats: dict,
    retrieval: dict[str, float],
    scores: dict[str, Any],
    timings: dict[str, float],
    compositional: dict[str, Any] | None = None,
) -> dict[str, Any]:
    write_run_report(out / "run")
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in metrics if "loss" in r]
    pairs = sorted({k.split("/")[0] for k in retrieval if k.endswith("/n")})
    chance = _chance(out / "shards" / "val", pairs)
    heldout = {}
    for pair in pairs:
        a, b = pair.split("-")
        # R@5 is left out: captions repeat across samples, so a wrong caption pushes the match down by all its
        # copies at once and R@k (k > 1) says little more than R@1 here.
        heldout[pair] = {
            "n": retrieval[f"{pair}/n"],
            f"{b}->{a} R@1": retrieval.get(f"{pair}/{b}->{a}/R@1"),
            "chance R@1": chance[pair],
            f"{a}->{b} R@1": retrieval.get(f"{pair}/{a}->{b}/R@1"),
        }
    score_summary = {
        m: {
            "matched_mean": sum(s["matched_scores"]) / len(s["matched_scores"]),
            "mismatched_mean": sum(s["mismatched_scores"]) / len(s["mismatched_scores"]),
            "matched_wins": s["wins"],
            "n": len(s["matched_scores"]),
        }
        for m, s in scores.items()
    }
    lines = [f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {metrics[-1]['step']} steps"]
    for pair, h in heldout.items():
        a, b = pair.split("-")
        lines.append(f"held-out {b}->{a} R@1 {h[f'{b}->{a} R@1']:.3f} (chance {h['chance R@1']:.3f}, n={h['n']})")
    for m, s in score_summary.items():
        lines.append(
            f"{m}-text CLIP-S matched {s['matched_mean']:.3f} vs one word swapped "
            f"{s['mismatched_mean']:.3f}; matched higher for {100 * s['matched_wins']:.0f}% of samples"
        )
    text = "\n".join(lines)

    rows = "".join(
        f"<tr><td>{p}</td><td>{h['n']}</td>" + "".join(f"<td>{v:.3f}</td>" for k, v in h.items() if k != "n") + "</tr>"
        for p, h in heldout.items()
    )
    head = "".join(f"<th>{html.escape(k)}</th>" for k in next(iter(heldout.values())) if k != "n") if heldout else ""
    examples = ""
    for medium, s in scores.items():
        for k, data in enumerate(s["media"][:4]):
            examples += (
                f"<tr><td>{_media(medium, data)}</td><td>{html.escape(s['captions'][k])}</td>"
                f"<td>{s['matched_scores'][k]:.3f}</td><td>{html.escape(s['mismatched'][k])}</td>"
                f"<td>{s['mismatched_scores'][k]:.3f}</td></tr>"
            )
    sim = ""
    if (out / "similarity.png").exists():
        sim = "data:image/png;base64," + base64.b64encode((out / "similarity.png").read_bytes()).decode()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>accord demo</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:center}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body><h1>accord demo</h1>
<p>Tiny image, video and audio towers trained from scratch against the pretrained all-MiniLM-L6-v2 (its bottom 4
layers frozen and computed once per distinct caption, its top 2 tuned; hard negatives of each caption) for {
        metrics[-1]["step"]
    } steps with the deepspeed launcher on 2 CPU ranks (ZeRO-2), on a rendered world of coloured
shapes, moving shapes and tones plus real photos, clips and speech. Validation holds only
<b>combinations never seen in training</b>
(e.g. "a red square" while training saw red things and squares, never a red square).</p>
<pre>{html.escape(text)}</pre>
<h2>Training loss</h2><img src="{loss_plot(metrics)}">
<p>The training run's own report (throughput and data wait per rank, evaluations over steps, skipped samples):
<a href="run/report.html">run/report.html</a> (<code>accord report {html.escape(str(out / "run"))}</code>).</p>
<h2>Zero-shot retrieval on held-out combinations</h2>
<p>medium→text R@1 ranks all distinct held-out captions for each sample (chance = 1 / distinct captions);
text→medium ranks individual samples, several of which share the caption, so its ceiling is below 1.</p>
<table><tr><th>pair</th><th>n</th>{head}</tr>{rows}</table>
{f'<h3>Similarity matrix</h3><img src="{sim}">' if sim else ""}
<h2>Consistency score: matched vs one-word-swapped captions</h2><img src="{_histograms(scores)}">
<table><tr><th>medium</th><th>caption</th><th>CLIP-S</th><th>swapped caption</th><th>CLIP-S</th></tr>{examples}</table>
{_compositional_section(out, compositional)}
<h2>Data</h2>{_data_section(counts, train_stats, val_stats, timings)}
</body></html>"""
    (out / "report.html").write_text(page)
    return {
        "text": text,
        "heldout": heldout,
        "scores": score_summary,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": metrics[-1]["step"],
        "compositional": {
            medium: {c: v["scores"]["cosine"]["all"] for c, v in res["categories"].items()}
            for medium, res in (compositional or {}).get("media", {}).items()
        },
    }
