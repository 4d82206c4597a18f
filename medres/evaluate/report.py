"""Self-contained HTML report rendered from a ``metrics.json`` dict.

Choices: the report is a pure function of the metrics dict (``render_report(metrics)``),
so it can be regenerated from ``metrics.json`` alone. Figures are drawn with matplotlib's
object API on the Agg canvas (no pyplot global state, no display needed) and embedded as
base64 PNG ``<img>`` elements; the page has a small inline stylesheet and no scripts,
fonts or URLs, so it opens offline and in locked-down viewers. Every user-provided string
is HTML-escaped. Nothing identifying is shown: only aggregates, class names, score column
names and subgroup values.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Iterable
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;
background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.5rem;margin:0 0 4px}h2{font-size:1.15rem;margin:28px 0 8px;
border-bottom:1px solid #d5dae1;padding-bottom:4px}
.sub{color:#5b6878;font-size:.9rem}
.headline{display:flex;gap:16px;flex-wrap:wrap;margin:16px 0}
.card{background:#fff;border:1px solid #d5dae1;border-radius:8px;padding:12px 16px;min-width:200px}
.card .big{font-size:2rem;font-weight:650}.card .ci{color:#5b6878}
.figs{display:flex;flex-wrap:wrap;gap:12px}
.figs figure{margin:0;background:#fff;border:1px solid #d5dae1;border-radius:8px;padding:8px}
.figs img{display:block;width:100%;max-width:520px;height:auto}
figcaption{font-size:.8rem;color:#5b6878;max-width:520px}
table{border-collapse:collapse;background:#fff;font-size:.85rem;margin:6px 0 12px}
th,td{border:1px solid #d5dae1;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef1f5}
.note{font-size:.85rem;color:#5b6878;max-width:900px}
"""

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


# ---------------------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return _e(x)


def _ci(ci: Any, digits: int = 3) -> str:
    if not ci:
        return "–"
    if ci[0] < 0:  # a dash range would read as a minus sign
        return f"{ci[0]:.{digits}f} to {ci[1]:.{digits}f}".replace("-", "−")
    return f"{ci[0]:.{digits}f}–{ci[1]:.{digits}f}"


def _p(p: Any) -> str:
    if p is None:
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig: Figure, alt: str, caption: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # layout="constrained": one draw, no bbox pass
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _fig(w: float = 5.2, h: float = 4.4) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, alpha=0.3)
    return fig, ax


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------
def _roc_fig(curves: dict[str, Any], aucs: dict[str, Any], title: str) -> str:
    fig, ax = _fig()
    for k, (name, roc) in enumerate(curves.get("roc", {}).items()):
        color = _COLORS[k % len(_COLORS)]
        band = curves.get("roc_band", {}).get(name)
        if band:
            ax.fill_between(
                band["fpr"], band["tpr_lo"], band["tpr_hi"], color=color, alpha=0.15, step="post"
            )
        a = aucs.get(name)
        label = f"{name} (AUC {a:.3f})" if isinstance(a, float) else str(name)
        ax.plot(roc["fpr"], roc["tpr"], color=color, lw=1.8, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="#888", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity", ylabel="sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _png(
        fig,
        "ROC curve",
        "ROC curve(s); shaded: pointwise bootstrap CI of sensitivity at each 1 − specificity.",
    )


def _pr_fig(curves: dict[str, Any], aps: dict[str, Any], prevalence: float | None) -> str:
    fig, ax = _fig()
    for k, (name, pr) in enumerate(curves.get("pr", {}).items()):
        ap = aps.get(name)
        label = f"{name} (AP {ap:.3f})" if isinstance(ap, float) else str(name)
        ax.step(
            [0.0, *pr["recall"]],
            [pr["precision"][0] if pr["precision"] else 1.0, *pr["precision"]],
            where="post",
            color=_COLORS[k % len(_COLORS)],
            lw=1.8,
            label=label,
        )
    if prevalence is not None:
        ax.axhline(prevalence, ls="--", color="#888", lw=1, label=f"prevalence {prevalence:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)")
    ax.set_title("Precision-recall")
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig, "Precision-recall curve", "Precision-recall curve(s) at every unique score.")


def _calibration_fig(rel: dict[str, list[dict[str, Any]]]) -> str:
    fig = Figure(figsize=(5.2, 5.4))
    ax = fig.add_axes((0.12, 0.32, 0.83, 0.62))
    hx = fig.add_axes((0.12, 0.08, 0.83, 0.16), sharex=ax)
    ax.grid(True, alpha=0.3)
    ax.plot([0, 1], [0, 1], ls="--", color="#888", lw=1, label="perfect calibration")
    width = None
    for k, (name, bins) in enumerate(rel.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [b for b in bins if b["n"]]
        xs = [b["mean_predicted"] for b in pts]
        ys = [b["observed"] for b in pts]
        lo = [max(0.0, b["observed"] - b["observed_ci"][0]) for b in pts]
        hi = [max(0.0, b["observed_ci"][1] - b["observed"]) for b in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, color=color, lw=1.4, label=name)
        width = bins[0]["hi"] - bins[0]["lo"]
        hx.bar(
            [b["lo"] + width / 2 for b in bins],
            [b["n"] for b in bins],
            width=width * 0.9 / max(len(rel), 1),
            color=color,
            alpha=0.6,
        )
    ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="observed frequency")
    ax.set_title("Reliability (equal-width bins, Wilson CIs)")
    ax.legend(loc="upper left", fontsize=8)
    hx.set(xlabel="predicted probability", ylabel="n")
    return _png(
        fig,
        "Reliability diagram",
        "Observed rate vs mean predicted probability per bin; bottom: cases per bin.",
    )


def _confusion_fig(
    matrix: list[list[int]], labels: list[str], title: str, caption: str | None = None
) -> str:
    k = len(labels)
    size = min(3.2 + 0.45 * k, 9.0)
    fig, ax = _fig(size, size * 0.9)
    ax.grid(False)
    ax.imshow(matrix, cmap="Blues")
    top = max((max(r) for r in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(
                j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black"
            )
    ax.set_xticks(range(k), [str(x) for x in labels], rotation=30 if k > 3 else 0)
    ax.set_yticks(range(k), [str(x) for x in labels])
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=10)
    return _png(fig, "Confusion matrix", caption or title)


def _forest_fig(col: str, rows: list[dict[str, Any]], names: list[str]) -> str:
    n = len(rows)
    step = len(names) + 1 if len(names) > 1 else 1  # a blank line between subgroups
    fig, ax = _fig(5.6, max(2.0, 0.4 * n * step + 1.2))
    ticks, labels = [], []
    for r_i, row in enumerate(rows):
        for m_i, name in enumerate(names):
            res = row["models"].get(name) or {}
            y = -(r_i * step + m_i)
            if res.get("auc") is not None:
                ci = res.get("auc_ci") or [res["auc"], res["auc"]]
                color = _COLORS[m_i % len(_COLORS)]
                ax.errorbar(
                    [res["auc"]],
                    [y],
                    xerr=[[res["auc"] - ci[0]], [ci[1] - res["auc"]]],
                    fmt="o",
                    color=color,
                    capsize=3,
                    label=name if r_i == 0 else None,
                )
        ticks.append(-(r_i * step))
        labels.append(f"{row['value']} (n={row['n']})")
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.margins(y=0.25)
    ax.axvline(0.5, ls="--", color="#888", lw=1)
    ax.set(xlim=(0, 1), xlabel="AUC (DeLong CI)")
    ax.set_title(f"AUC by {col}")
    if len(names) > 1:
        ax.legend(fontsize=8, loc="lower left")
    return _png(fig, f"AUC by {col}", f"AUC with DeLong CI per {col} subgroup.")


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------
def _header(m: dict[str, Any]) -> str:
    title = m.get("title") or "evaluation"
    s = m.get("settings", {})
    sub = (
        f"task {_e(m.get('task'))} · n = {m.get('n')} · medres {_e(m.get('medres_version', ''))} · "
        f"CIs at {100 * s.get('ci_level', 0.95):.0f}%"
    )
    return f"<h1>medres evaluation: {_e(title)}</h1><div class='sub'>{sub}</div>"


def _headline(m: dict[str, Any]) -> str:
    h = m.get("headline", {})
    cards = []
    value = h.get("value")
    cards.append(
        "<div class='card' id='headline'><div>"
        + _e(f"{h.get('metric', 'auc').upper().replace('_', ' ')} · {h.get('name', '')}")
        + f"</div><div class='big'>{_f(value)}</div>"
        + f"<div class='ci'>CI {_ci(h.get('ci'))} ({_e(h.get('ci_method') or 'none')})</div></div>"
    )
    if m.get("task") == "binary":
        first = m["models"].get(h.get("name"), {})
        cards.append(
            "<div class='card'><div>bootstrap CI</div>"
            f"<div class='big'>{_ci(first.get('auc_ci_bootstrap'))}</div>"
            f"<div class='ci'>{m['settings'].get('n_boot')} stratified replicates</div></div>"
        )
        cards.append(
            "<div class='card'><div>cases</div>"
            f"<div class='big'>{m['n']}</div><div class='ci'>{m['n_positive']} positive "
            f"({_e(m.get('positive'))}), prevalence {m['n_positive'] / m['n']:.3f}</div></div>"
        )
    else:
        cards.append(
            "<div class='card'><div>accuracy / micro AUC</div>"
            f"<div class='big'>{_f(m.get('accuracy', m.get('subset_accuracy')))}</div>"
            f"<div class='ci'>micro AUC {_f(m.get('micro_auc'))}</div></div>"
        )
    return f"<div class='headline'>{''.join(cards)}</div>"


def _data_summary(m: dict[str, Any]) -> str:
    d = m.get("data", {})
    rows = [
        ("source", _e(d.get("source", ""))),
        ("cases evaluated", _f(m.get("n"))),
        ("rows dropped (missing values)", _f(d.get("n_dropped", 0))),
    ]
    if m.get("task") == "binary":
        rows.append(("positive class", _e(m.get("positive"))))
        rows.append(("positives / negatives", f"{m['n_positive']} / {m['n'] - m['n_positive']}"))
        rows.append(("prevalence", _f(m["n_positive"] / m["n"])))
    for c, n in (d.get("class_counts") or {}).items():
        if m.get("task") != "binary":
            rows.append((f"class {_e(c)}", _f(n)))
    out = "<h2>Data summary</h2>" + _table(["item", "value"], rows)
    splits = d.get("splits")
    if splits:
        srows = []
        for name, info in splits.items():
            detail = info.get("labels")
            extra = (
                ", ".join(f"{_e(k)}: {v}" for k, v in detail.items())
                if detail
                else f"{info.get('n_positive', '–')} positive"
            )
            srows.append((_e(name), _f(info.get("n")), extra))
        out += _table(["split", "n", "labels"], srows)
    return out


def _binary_sections(m: dict[str, Any]) -> str:
    models = m["models"]
    curves = m.get("curves", {})
    prevalence = m["n_positive"] / m["n"]
    figs = [
        _roc_fig(curves, {k: v["auc"] for k, v in models.items()}, "ROC"),
        _pr_fig(curves, {k: v["average_precision"] for k, v in models.items()}, prevalence),
    ]
    if curves.get("reliability"):
        figs.append(_calibration_fig(_reliability_curves(m)))
    for name, v in models.items():
        cm = v["confusion_matrix"]
        figs.append(
            _confusion_fig(
                cm["matrix"],
                cm["labels"],
                f"{name}: score ≥ {cm['threshold']:.4g}",
                f"{name}: confusion matrix at score ≥ {cm['threshold']:.4g}, {cm['basis']}.",
            )
        )
    out = "<h2>Curves</h2><div class='figs'>" + "".join(figs) + "</div>"
    rows = [
        (
            _e(name),
            _f(v["auc"]),
            _ci(v["auc_ci"]),
            _ci(v["auc_ci_bootstrap"]),
            _f(v["average_precision"]),
            _f(v.get("brier")),
            _f(v.get("ece")),
            _f(v.get("ece_adaptive")),
        )
        for name, v in models.items()
    ]
    out += "<h2>Discrimination and calibration</h2>" + _table(
        ["score", "AUC", "DeLong CI", "bootstrap CI", "AP", "Brier", "ECE", "adaptive ECE"], rows
    )
    notes = {v.get("calibration_note") for v in models.values() if v.get("calibration_note")}
    out += "".join(f"<p class='note'>{_e(n)}</p>" for n in notes)
    out += _calibration_table(models)
    out += _validation_threshold_table(models)
    out += "<h2>Operating points</h2><p class='note'>Chosen on these cases (optimistic): thresholds chosen and measured on these same cases, so they are optimistic; confirm them on independent data. A case is positive when score ≥ threshold. Wilson CIs.</p>"
    for name, v in models.items():
        orows = []
        for op, d in v["operating_points"].items():
            orows.append(
                (
                    _e(op),
                    _f(d["threshold"], 4),
                    f"{_f(d['sensitivity'])} ({_ci(d['sensitivity_ci'])})",
                    f"{_f(d['specificity'])} ({_ci(d['specificity_ci'])})",
                    f"{_f(d['ppv'])} ({_ci(d['ppv_ci'])})",
                    f"{_f(d['npv'])} ({_ci(d['npv_ci'])})",
                    f"{d['tp']}/{d['fp']}/{d['tn']}/{d['fn']}",
                )
            )
        out += f"<h3>{_e(name)}</h3>" + _table(
            ["point", "threshold", "sensitivity", "specificity", "PPV", "NPV", "TP/FP/TN/FN"], orows
        )
    if m.get("comparisons"):
        crows = [
            (
                f"{_e(c['a'])} − {_e(c['b'])}",
                _f(c["auc_diff"]),
                _ci(c["diff_ci"]),
                _ci(c.get("diff_ci_bootstrap")),
                _f(c["z"], 2),
                _p(c["p_value"]),
                _p(c.get("p_value_holm")),
            )
            for c in m["comparisons"]
        ]
        out += "<h2>Comparisons (paired DeLong)</h2>" + _table(
            ["pair", "AUC difference", "DeLong CI", "bootstrap CI", "z", "p", "p (Holm)"], crows
        )
    out += _binary_subgroups(m)
    return out


def _reliability_curves(m: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The reliability curves to plot: before and after temperature scaling when recorded."""
    curves = m.get("curves", {})
    after = curves.get("reliability") or {}
    before = curves.get("reliability_before_scaling") or {}
    if not before:
        return after
    out: dict[str, list[dict[str, Any]]] = {}
    for name, bins in after.items():
        if name in before:
            t = (m["models"].get(name, {}).get("calibration_before") or {}).get("temperature")
            out[f"{name} before scaling"] = before[name]
            out[f"{name} after scaling (T = {_f(t)})"] = bins
        else:
            out[name] = bins
    return out


def _calibration_table(models: dict[str, Any]) -> str:
    """ECE and Brier before and after the validation-fitted temperature (run dirs)."""
    rows = [
        (
            _e(name),
            _f(b.get("temperature")),
            _f(b.get("ece")),
            _f(v.get("ece")),
            _f(b.get("ece_adaptive")),
            _f(v.get("ece_adaptive")),
            _f(b.get("brier")),
            _f(v.get("brier")),
        )
        for name, v in models.items()
        if (b := v.get("calibration_before"))
    ]
    if not rows:
        return ""
    head = ["score", "temperature", "ECE before", "ECE after", "adaptive ECE before"]
    return (
        "<h2>Calibration before and after temperature scaling</h2><p class='note'>The "
        "temperature was fitted on the validation split by medres train; the scores above "
        "are the scaled probabilities.</p>"
        + _table([*head, "adaptive ECE after", "Brier before", "Brier after"], rows)
    )


def _validation_threshold_table(models: dict[str, Any]) -> str:
    """The threshold chosen on validation (model.json) measured on these cases: honest."""
    rows = [
        (
            _e(name),
            _e(d.get("threshold_rule")),
            _f(d["threshold"], 4),
            f"{_f(d['sensitivity'])} ({_ci(d['sensitivity_ci'])})",
            f"{_f(d['specificity'])} ({_ci(d['specificity_ci'])})",
            f"{_f(d['ppv'])} ({_ci(d['ppv_ci'])})",
            f"{_f(d['npv'])} ({_ci(d['npv_ci'])})",
            f"{d['tp']}/{d['fp']}/{d['tn']}/{d['fn']}",
        )
        for name, v in models.items()
        if (d := v.get("validation_threshold"))
    ]
    if not rows:
        return ""
    same = any((v.get("validation_threshold") or {}).get("same_cases") for v in models.values())
    where = (
        "measured here on the validation cases it was chosen on (optimistic)"
        if same
        else "applied here to cases it never saw: the honest estimate"
    )
    return (
        "<h2 id='validation-threshold'>Operating threshold chosen on validation</h2>"
        "<p class='note'>Chosen by medres train on the validation split (stored in "
        f"model.json, used by medres score) and {where}. Wilson CIs.</p>" + _table(_VT_HEAD, rows)
    )


_VT_HEAD = ["score", "rule", "threshold", "sensitivity", "specificity", "PPV", "NPV", "TP/FP/TN/FN"]


def _binary_subgroups(m: dict[str, Any]) -> str:
    subs = m.get("subgroups") or {}
    if not subs:
        return ""
    names = list(m["models"])
    out = "<h2>Subgroups</h2>"
    for col, rows in subs.items():
        trows = []
        for r in rows:
            cells = [_e(r["value"]), _f(r["n"]), _f(r["n_positive"])]
            for name in names:
                res = r["models"].get(name, {})
                cells.append(f"{_f(res.get('auc'))} ({_ci(res.get('auc_ci'))})")
            trows.append(cells)
        out += f"<h3>by {_e(col)}</h3><div class='figs'>{_forest_fig(col, rows, names)}</div>"
        out += _table([col, "n", "positives", *[f"AUC {n}" for n in names]], trows)
    return out


def _multi_sections(m: dict[str, Any]) -> str:
    per = m.get("per_class") or m.get("per_label") or {}
    curves = m.get("curves", {})
    figs = [
        _roc_fig(curves, {k: v.get("auc") for k, v in per.items()}, "One-vs-rest ROC"),
        _pr_fig(curves, {k: v.get("average_precision") for k, v in per.items()}, None),
    ]
    cm = m.get("confusion_matrix")
    if cm:
        figs.append(_confusion_fig(cm["matrix"], cm["labels"], "Confusion matrix (argmax)"))
    out = "<h2>Curves</h2><div class='figs'>" + "".join(figs) + "</div>"
    rows = [
        (
            _e(k),
            _f(v.get("n_positive")),
            _f(v.get("auc")),
            _ci(v.get("auc_ci")),
            _ci(v.get("auc_ci_bootstrap")),
            _f(v.get("average_precision")),
            _f(v.get("recall", (v.get("at_threshold") or {}).get("sensitivity"))),
        )
        for k, v in per.items()
    ]
    kind = "class" if m.get("task") == "multiclass" else "label"
    out += f"<h2>Per {kind} (one-vs-rest)</h2>" + _table(
        [kind, "positives", "AUC", "DeLong CI", "bootstrap CI", "AP", "recall"], rows
    )
    summary = [
        ("macro AUC", f"{_f(m.get('macro_auc'))} ({_ci(m.get('macro_auc_ci_bootstrap'))})"),
        ("micro AUC", _f(m.get("micro_auc"))),
    ]
    for key in ("accuracy", "balanced_accuracy", "subset_accuracy", "hamming_loss"):
        if key in m:
            summary.append((key.replace("_", " "), _f(m[key])))
    out += "<h2>Summary</h2>" + _table(["metric", "value"], summary)
    if m.get("subgroups"):
        out += "<h2>Subgroups</h2>"
    for col, srows in (m.get("subgroups") or {}).items():
        out += f"<h3>by {_e(col)}</h3>" + _table(
            [col, "n", "macro AUC"],
            [(_e(r["value"]), _f(r["n"]), _f(r["macro_auc"])) for r in srows],
        )
    return out


def _methods(m: dict[str, Any]) -> str:
    s = m.get("settings", {})
    return (
        "<h2>Methods</h2><p class='note'>"
        "AUC is the Mann-Whitney statistic (ties count ½). DeLong CIs use the fast midrank "
        f"algorithm (Sun &amp; Xu 2014), transform: {_e(s.get('ci_transform', 'none'))}; "
        "'none' is AUC ± z·SE clipped to [0, 1], as pROC's ci.auc(method='delong'). "
        f"Bootstrap: {_e(s.get('n_boot'))} stratified replicates (seed {_e(s.get('seed'))}), "
        "percentile intervals. Paired comparisons: DeLong z test, two-sided, Holm-adjusted "
        "p-values alongside. Proportions: Wilson score intervals. ECE: "
        f"{_e(s.get('ece_bins'))} equal-width bins; adaptive ECE: equal-mass bins. "
        "Brier/ECE only for scores within [0, 1].</p>"
    )


def render_report(metrics: dict[str, Any]) -> str:
    """The full HTML page for a metrics dict as written to ``metrics.json``."""
    body = _header(metrics) + _headline(metrics) + _data_summary(metrics)
    if metrics.get("task") == "binary":
        body += _binary_sections(metrics)
    else:
        body += _multi_sections(metrics)
    body += _methods(metrics)
    title = _e(f"medres evaluation: {metrics.get('title', '')}")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{title}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
