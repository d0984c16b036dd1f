"""`tailbridge monitor report`: the monitor's reports as one self-contained HTML file (charts as
inline PNG), for offline review."""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime

METHOD = (
    "Each test compares a sliding window of stream time with the monitor's reference (the first "
    "{reference_s:.0f} s after a {warmup_s:.0f} s warm-up that fixed the bins). Thresholds are calibrated on that "
    "no-drift reference: a block bootstrap over its {bucket_s:.0f} s buckets (window and reference both resampled) "
    "gives each statistic's no-drift distribution, and the threshold is the 1 - alpha quantile of a scaled "
    "chi-square matched to it, never below the largest draw or the textbook quantile. alpha is the per-window "
    "false-alarm rate {alpha_window:g} divided by the number of tests x window lengths ({tests}) (Bonferroni): "
    "{alpha_test:.3g} per test."
)
OUTCOMES = ("ctr", "cart_rate", "purchase_rate", "mrr", "degraded_rate", "click_calibration_error",
            "cart_calibration_error", "purchase_calibration_error")
HEADS = ("click", "cart", "purchase")
FEATURE_PREFIX = "f."  # tests of the Feast feature rows: a chart of their own


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _minutes(report: dict, start_ms: int) -> float:
    return (report["end_ms"] - start_ms) / 60_000


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.subplots_adjust(hspace=0.7, wspace=0.3)
    figure.savefig(buffer, format="png", dpi=72)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def score_chart(reports: list[dict], features: bool = False) -> str:
    """One panel per test: score / threshold over time for each window (1 is the alert line);
    the tests of feature rows (``features``) or all the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = sorted({t for r in reports for t, windows in r["scores"].items()
                    if any(thr is not None for _, thr in windows.values()) and t.startswith(FEATURE_PREFIX) == features})
    if not tests:
        return "<p>No scored windows yet.</p>"
    cols = 4
    rows = (len(tests) + cols - 1) // cols
    start = reports[0]["end_ms"]
    figure, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.2 * rows), squeeze=False)
    for ax, test in zip(axes.flat, tests):
        for window in sorted({w for r in reports for w in r["scores"].get(test, {})}, key=lambda w: int(w[:-1])):
            points = [(_minutes(r, start), r["scores"][test][window]) for r in reports
                      if window in r["scores"].get(test, {})]
            ax.plot([t for t, _ in points], [s / thr if thr else 0 for t, (s, thr) in points], label=window, lw=1)
        ax.axhline(1.0, color="red", lw=0.8, ls="--")
        ax.set_title(test, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tests):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"drift score / calibrated threshold (alert above 1), minutes since {_time(start):%Y-%m-%d %H:%M} UTC",
                    fontsize=10)
    out = _png(figure)
    plt.close(figure)
    return out


def outcome_chart(reports: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = sorted({v for r in reports for v in r["outcomes"]})
    if not versions:
        return "<p>No outcomes yet.</p>"
    start = reports[0]["end_ms"]
    cols = 4
    figure, axes = plt.subplots(len(OUTCOMES) // cols, cols, figsize=(4 * cols, 2.6 * len(OUTCOMES) // cols),
                                squeeze=False)
    for ax, metric in zip(axes.flat, OUTCOMES):
        for version in versions:
            points = [(_minutes(r, start), r["outcomes"][version][metric]) for r in reports
                      if r["outcomes"].get(version, {}).get(metric) is not None]
            if points:
                ax.plot([t for t, _ in points], [v for _, v in points], label=version, lw=1)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"outcomes per model version, minutes since {_time(start):%Y-%m-%d %H:%M} UTC", fontsize=10)
    out = _png(figure)
    plt.close(figure)
    return out


def latest_predictions(reports: list[dict]) -> dict[str, dict]:
    """Per model version, its outcomes in the newest report (longest window) that holds impressions
    with a ranker prediction: a version that stopped serving keeps its last numbers."""
    latest = {}
    for report in reports:
        for version, rates in report["outcomes"].items():
            if any(rates.get(f"{head}_predicted") is not None for head in HEADS):
                latest[version] = rates
    return latest


def calibration_table(reports: list[dict]) -> str:
    """Per model version and ranker head: mean predicted probability, observed rate and
    calibration error per impression with a prediction (``latest_predictions``)."""
    outcomes = latest_predictions(reports)
    rows = "".join(
        f"<tr data-version='{html.escape(version)}' data-head='{head}'><td>{html.escape(version)}</td><td>{head}</td>"
        f"<td>{rates[f'{head}_predicted']:.4f}</td><td>{rates[f'{head}_observed']:.4f}</td>"
        f"<td>{rates[f'{head}_calibration_error']:.4f}</td></tr>"
        for version, rates in sorted(outcomes.items()) for head in HEADS
        if rates.get(f"{head}_predicted") is not None)
    if not rows:
        return "<p>No served page with ranker probabilities in these reports.</p>"
    return ("<table id='calibration'><tr><th>model version</th><th>head</th><th>predicted</th><th>observed</th>"
            f"<th>calibration error</th></tr>{rows}</table>")


def method_text(status: dict | None) -> str:
    if not status or status.get("alpha_test") is None:
        return "The monitor has not pinned its reference yet: no thresholds."
    c = status["config"]
    return METHOD.format(reference_s=c["reference_s"], warmup_s=c["warmup_s"], bucket_s=c["bucket_s"],
                         alpha_window=c["alpha_window"], tests=len(status["thresholds"]), alpha_test=status["alpha_test"])


def render(data: dict, since: datetime | None) -> str:
    reports, alerts, status = data["reports"], data["alerts"], data["status"]
    rows = "".join(
        f"<tr><td>{_time(a['start_ms']):%Y-%m-%d %H:%M:%S}</td><td>{_time(a['end_ms']):%H:%M:%S}</td>"
        f"<td>{html.escape(a['metric'])}</td><td>{html.escape(a['window'])}</td><td>{a['score']:.4g}</td>"
        f"<td>{a['threshold']:.4g}</td><td class='{html.escape(a['severity'])}'>{html.escape(a['severity'])}</td></tr>"
        for a in alerts)
    counts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted((status or {}).get("counts", {}).items()))
    span = (f"{_time(reports[0]['end_ms']):%Y-%m-%d %H:%M:%S} to {_time(reports[-1]['end_ms']):%Y-%m-%d %H:%M:%S} UTC"
            if reports else "no reports")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tailbridge drift report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}} .critical{{color:#b00;font-weight:bold}}
.warning{{color:#b60}} img{{max-width:100%}}</style></head><body>
<h1>tailbridge drift report</h1>
<p>Windows {span}{f' (since {since:%Y-%m-%d %H:%M:%S} UTC)' if since else ''}: {len(reports)} evaluations,
{len(alerts)} alerts. Monitor phase: {html.escape(str((status or {}).get('phase', 'unknown')))}.</p>
<h2>How the thresholds were set</h2><p id="method">{html.escape(method_text(status))}</p>
<h2>Alerts</h2>
<table id="alerts"><tr><th>window start</th><th>end</th><th>metric</th><th>window</th><th>score</th><th>threshold</th>
<th>severity</th></tr>{rows}</table>
<h2>Drift scores</h2>{score_chart(reports) if reports else '<p>No reports.</p>'}
<h2>Feature rows (Feast user_context, item_stats)</h2>{score_chart(reports, features=True) if reports else '<p>No reports.</p>'}
<h2>Outcomes per model version</h2>{outcome_chart(reports) if reports else '<p>No reports.</p>'}
<h2>Ranker calibration per model version (its newest window with predictions)</h2>
<p>Head probabilities are position-free (were the item examined) and outcomes are per impression, so observed
is below predicted further down the page for any model; the drift test compares each window's observed /
predicted per probability bin with the reference's.</p>{calibration_table(reports)}
<h2>Events seen and odd input (counted, never fatal)</h2><table>{counts}</table>
</body></html>
"""
