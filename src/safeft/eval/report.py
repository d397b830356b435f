"""``safeft report``: one page comparing runs on safety, utility and their per-epoch curves.

Input, per run directory (a training run, or a ``safeft eval`` output directory):

- ``config.yaml`` (optional): the run's config, for the method, model and seed;
- ``metrics.jsonl`` (optional): training logs (``loss``) and epoch-end evaluation records
  (``eval/<suite>/<metric>``), for the per-epoch curves;
- ``eval/results.json`` (or ``results.json`` in an eval output dir): the final evaluation,
  every number with its 95% interval and n;
- ``eval/generations/<suite>.jsonl``: prompts, responses and judge verdicts, for samples.

Output: a single self-contained HTML file (plots embedded as base64 PNG, inline CSS, no
script, a Content-Security-Policy that forbids scripts and remote loads) or a Markdown file
with its PNGs written beside it.

Every string that comes from a file -- above all, model generations, which are hostile text
by design -- is neutralised before it reaches the page: control characters (ANSI escapes,
C1 codes, bidirectional overrides, lone surrogates) are shown as visible ``\\xNN`` escapes by
:func:`clean`, then the text is HTML-escaped (HTML) or Markdown-escaped / fenced (Markdown).
A missing file or number is shown as "—"; only input with nothing to report is an error.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError

DASH = "—"
DEFAULT_SAMPLES = 3
MAX_TEXT = 2000  # characters of a prompt or response shown in the samples
MAX_CURVE_PANELS = 12

KIND_ORDER = {"harmful": 0, "toxicity": 1, "benign": 2}
SUITE_METRIC_ORDER = ["refusal_rate", "asr/", "parse_failure_rate/", "mean_toxicity", "expected_max_toxicity",
                      "toxicity_probability", "over_refusal_rate"]
TOXICITY_METRIC_ORDER = ["mean_toxicity", "expected_max_toxicity", "toxicity_probability", "refusal_rate", "asr/",
                         "parse_failure_rate/"]
UTILITY_ORDER = ["pubmedqa_acc_loglik", "pubmedqa_acc_gen", "gsm8k_em", "perplexity"]
# The metric shown per category and on the safety axis, by suite kind.
PRIMARY_BY_KIND = {"harmful": "refusal_rate", "toxicity": "mean_toxicity", "benign": "over_refusal_rate"}
METRIC_NAMES = {
    "refusal_rate": "refusal",
    "mean_toxicity": "mean toxicity",
    "expected_max_toxicity": "exp. max toxicity",
    "toxicity_probability": "toxicity prob.",
    "over_refusal_rate": "over-refusal",
    "perplexity": "perplexity",
    "pubmedqa_acc_loglik": "PubMedQA acc (loglik)",
    "pubmedqa_acc_gen": "PubMedQA acc (gen)",
    "gsm8k_em": "GSM8K EM",
}

# ---------------------------------------------------------------------------------------
# Text neutralisation

_UNSAFE_CHARS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]"
)


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(text: object) -> str:
    """``text`` as a string with every control / bidi-override / surrogate character replaced
    by a visible escape (``\\x1b``, ``\\u202e``); newlines and tabs are kept, CR and the
    Unicode line/paragraph separators become newlines. Safe to print to a terminal."""
    s = "" if text is None else str(text)
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    return _UNSAFE_CHARS.sub(_visible, s)


def _h(text: object) -> str:
    """Clean and HTML-escape (quotes included, so the result is safe in attributes too)."""
    return html.escape(clean(text), quote=True)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#!^$])")
_MD_LEADING = re.compile(r"^(\d*)([-+=.)])")


def _md(text: object) -> str:
    """Clean and escape for inline Markdown (table cells, headings, list items): HTML
    characters become entities, the punctuation that opens emphasis, code, links, tables,
    strikethrough or math is backslash-escaped, as is a leading list/quote/heading marker;
    newlines become spaces (a table cell is one line)."""
    s = " ".join(clean(text).split())
    s = html.escape(s, quote=False)  # & < > -> entities, so raw HTML cannot appear
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return _MD_LEADING.sub(r"\1\\\2", s)


def _md_block(text: str, info: str = "text") -> str:
    """A fenced code block whose fence is longer than any backtick run inside ``text``."""
    body = clean(text)
    longest = max((len(r) for r in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{body}\n{fence}"


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f" … [truncated, {len(text)} chars]"


# ---------------------------------------------------------------------------------------
# Loading runs


@dataclass
class Metric:
    value: float | None
    lo: float | None = None
    hi: float | None = None
    n: int | None = None


@dataclass
class Suite:
    kind: str | None
    n: int | None
    metrics: dict[str, Metric] = field(default_factory=dict)
    by_category: dict[str, dict[str, Metric]] = field(default_factory=dict)


@dataclass
class RunData:
    """One run as the report sees it; every part may be empty."""

    path: Path
    label: str
    method: str | None = None
    model: str | None = None
    seed: int | None = None
    decoding: str | None = None
    suites: dict[str, Suite] = field(default_factory=dict)
    utility: dict[str, Metric] = field(default_factory=dict)
    agreement: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    curves: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    loss: list[tuple[float, float]] = field(default_factory=list)
    generations: dict[str, dict[str, dict]] = field(default_factory=dict)  # suite -> prompt -> record
    generation_order: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _int(x) -> int | None:
    v = _num(x)
    return int(v) if v is not None else None


def _metric(obj) -> Metric | None:
    if isinstance(obj, dict):
        return Metric(_num(obj.get("value")), _num(obj.get("lo")), _num(obj.get("hi")), _int(obj.get("n")))
    v = _num(obj)
    return Metric(v) if v is not None else None


def _metrics(obj) -> dict[str, Metric]:
    if not isinstance(obj, dict):
        return {}
    out = {}
    for name, m in obj.items():
        parsed = _metric(m)
        if parsed is not None:
            out[str(name)] = parsed
    return out


def _str(x) -> str | None:
    return None if x is None or isinstance(x, (dict, list)) else str(x)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", field=f"{path}:{e.lineno}") from None
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror})", field=str(path)) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", field=str(path))
    return data


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """Records of a JSONL file; unparsable lines (e.g. the half-written last line of a live
    run) are skipped and counted in ``notes``."""
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        notes.append(f"{path.name}: cannot read ({e.strerror})")
        return rows
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            rows.append(rec)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: skipped {bad} unreadable line(s)")
    return rows


def _read_config(run_dir: Path, notes: list[str]) -> dict:
    import yaml

    candidates = [run_dir / "config.yaml"]
    if run_dir.name == "eval":
        candidates.append(run_dir.parent / "config.yaml")
    for p in candidates:
        if p.is_file():
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8", errors="replace"))
            except yaml.YAMLError:
                notes.append(f"{p.name}: not valid YAML, ignored")
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def _results_path(run_dir: Path) -> Path | None:
    for p in (run_dir / "eval" / "results.json", run_dir / "results.json"):
        if p.is_file():
            return p
    return None


def _load_generations(run: RunData, gen_dir: Path) -> None:
    if not gen_dir.is_dir():
        return
    for path in sorted(gen_dir.glob("*.jsonl")):
        by_prompt: dict[str, dict] = {}
        order: list[str] = []
        for rec in _read_jsonl(path, run.notes):
            prompt = clean(rec.get("prompt", ""))
            if prompt not in by_prompt:
                order.append(prompt)
                by_prompt[prompt] = rec
            elif rec.get("sample") == 0 and by_prompt[prompt].get("sample") != 0:
                by_prompt[prompt] = rec  # prefer the first sample of a prompt
        if order:
            run.generations[path.stem] = by_prompt
            run.generation_order[path.stem] = order


def _apply_results(run: RunData, res: dict) -> None:
    run.model = run.model or _str(res.get("model"))
    run.method = run.method or _str(res.get("method"))
    run.decoding = _str(res.get("decoding"))
    suites = res.get("suites")
    if isinstance(suites, dict):
        for name, s in suites.items():
            if not isinstance(s, dict):
                continue
            by_cat = s.get("by_category") if isinstance(s.get("by_category"), dict) else {}
            run.suites[str(name)] = Suite(
                kind=_str(s.get("kind")),
                n=_int(s.get("n")),
                metrics=_metrics(s.get("metrics")),
                by_category={str(c): _metrics(ms) for c, ms in by_cat.items() if _metrics(ms)},
            )
    run.utility = _metrics(res.get("utility"))
    agreement = res.get("judge_agreement")
    if isinstance(agreement, dict):
        for pair, a in agreement.items():
            if isinstance(a, dict):
                run.agreement[str(pair)] = {k: _num(a.get(k)) for k in ("agreement", "cohen_kappa", "n")}


def _apply_metrics(run: RunData, records: list[dict]) -> None:
    for rec in records:
        epoch = _num(rec.get("epoch"))
        if epoch is None:
            continue
        loss = _num(rec.get("loss"))
        if loss is not None:
            run.loss.append((epoch, loss))
        for key, value in rec.items():
            if not (isinstance(key, str) and key.startswith("eval/")):
                continue
            parts = key.split("/", 2)
            v = _num(value)
            if len(parts) == 3 and v is not None:
                run.curves.setdefault((parts[1], parts[2]), []).append((epoch, v))


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read one run directory (see the module docstring); raise :class:`DataError` when it
    does not exist or holds nothing to report."""
    d = Path(run_dir)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory", field="run_dirs")
    notes: list[str] = []
    cfg = _read_config(d, notes)
    method_cfg = cfg.get("method")
    model_cfg = cfg.get("model")
    training_cfg = cfg.get("training")
    name = d.resolve().parent.name if d.name == "eval" else d.resolve().name
    run = RunData(
        path=d,
        label=name,
        method=_str(method_cfg.get("name")) if isinstance(method_cfg, dict) else None,
        model=_str(model_cfg.get("name_or_path")) if isinstance(model_cfg, dict) else None,
        seed=_int(training_cfg.get("seed")) if isinstance(training_cfg, dict) else None,
        notes=notes,
    )
    results = _results_path(d)
    if results is not None:
        _apply_results(run, _read_json(results))
        _load_generations(run, results.parent / "generations")
    else:
        notes.append("no results.json (eval/results.json): final metrics shown as —")
    metrics_path = d / "metrics.jsonl"
    if metrics_path.is_file():
        _apply_metrics(run, _read_jsonl(metrics_path, notes))
    if results is None and not run.loss and not run.curves:
        raise DataError(f"{d}: no eval/results.json, results.json or metrics.jsonl records to report",
                        field="run_dirs")
    if run.method and run.method not in name:
        run.label = f"{run.method} · {name}"
    return run


def load_runs(run_dirs) -> list[RunData]:
    """Load every run; labels are made unique (parent directory, then a counter)."""
    dirs = [Path(d) for d in (run_dirs or [])]
    if not dirs:
        raise ConfigError("no run directories given", field="run_dirs")
    runs = [load_run(d) for d in dirs]
    counts = Counter(r.label for r in runs)
    for r in runs:
        if counts[r.label] > 1:
            base = r.path.resolve().parent if r.path.name != "eval" else r.path.resolve().parent.parent
            r.label = f"{base.name}/{r.label}"
    seen: Counter = Counter()
    for r in runs:
        seen[r.label] += 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"
    return runs


# ---------------------------------------------------------------------------------------
# Columns and number formatting


def metric_name(metric: str) -> str:
    if metric.startswith("asr/"):
        return f"ASR ({metric[4:]})"
    if metric.startswith("parse_failure_rate/"):
        return f"parse failures ({metric.split('/', 1)[1]})"
    return METRIC_NAMES.get(metric, metric.replace("_", " "))


def is_rate(metric: str) -> bool:
    return (metric.startswith(("asr/", "parse_failure_rate/")) or metric.endswith(("_rate", "_em", "accuracy", "_acc"))
            or "_acc_" in metric or metric == "toxicity_probability")


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when unknown."""
    if metric in ("refusal_rate",) or metric.endswith(("_em", "accuracy", "_acc")) or "_acc_" in metric:
        return 1
    if (metric.startswith(("asr/", "parse_failure_rate/")) or "toxicity" in metric
            or metric in ("over_refusal_rate", "perplexity")):
        return -1
    return 0


def _fmt(metric: str, v: float | None, pct_sign: bool = True) -> str:
    if v is None:
        return DASH
    if is_rate(metric):
        return f"{100 * v:.1f}" + ("%" if pct_sign else "")
    if metric == "perplexity" or abs(v) >= 100:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_metric(metric: str, m: Metric | None, with_n: bool = False) -> str:
    """``"85.0% [78.0, 90.0]"`` (rates in percent), ``"—"`` when missing."""
    if m is None or m.value is None:
        return DASH
    s = _fmt(metric, m.value)
    if m.lo is not None and m.hi is not None:
        s += f" [{_fmt(metric, m.lo, False)}, {_fmt(metric, m.hi, False)}]"
    if with_n and m.n is not None:
        s += f" (n={m.n})"
    return s


@dataclass(frozen=True)
class Column:
    group: str  # suite name, or "" for utility
    kind: str | None
    metric: str

    def get(self, run: RunData) -> Metric | None:
        if not self.group:
            return run.utility.get(self.metric)
        s = run.suites.get(self.group)
        return s.metrics.get(self.metric) if s else None

    @property
    def title(self) -> str:
        arrow = {1: " ↑", -1: " ↓"}.get(direction(self.metric), "")
        return metric_name(self.metric) + arrow

    @property
    def group_title(self) -> str:
        return f"{self.group} ({self.kind})" if self.group and self.kind else (self.group or "utility")


def _metric_rank(metric: str, order: list[str]) -> tuple:
    for i, prefix in enumerate(order):
        if metric == prefix or (prefix.endswith("/") and metric.startswith(prefix)):
            return (i, metric)
    return (len(order), metric)


def suite_kinds(runs: list[RunData]) -> dict[str, str | None]:
    kinds: dict[str, str | None] = {}
    for r in runs:
        for name, s in r.suites.items():
            if kinds.get(name) is None:
                kinds[name] = s.kind
    return dict(sorted(kinds.items(), key=lambda kv: (KIND_ORDER.get(kv[1] or "", 9), kv[0])))


def columns(runs: list[RunData]) -> list[Column]:
    """Suites (harmful, toxicity, benign, other; by name), their metrics in a fixed order,
    then the utility metrics; only what at least one run has."""
    cols = []
    for suite, kind in suite_kinds(runs).items():
        names = {m for r in runs if suite in r.suites for m in r.suites[suite].metrics}
        order = TOXICITY_METRIC_ORDER if kind == "toxicity" else SUITE_METRIC_ORDER
        cols += [Column(suite, kind, m) for m in sorted(names, key=lambda m: _metric_rank(m, order))]
    util = {m for r in runs for m in r.utility}
    cols += [Column("", None, m) for m in sorted(util, key=lambda m: _metric_rank(m, UTILITY_ORDER))]
    return cols


def _best(col: Column, runs: list[RunData]) -> set[int]:
    """Indices of the runs holding the best value of a column (when it has a direction and
    at least two runs have a value)."""
    d = direction(col.metric)
    vals = [(i, m.value) for i, r in enumerate(runs) if (m := col.get(r)) and m.value is not None]
    if not d or len(vals) < 2:
        return set()
    best = max(v * d for _, v in vals)
    return {i for i, v in vals if v * d == best}


# ---------------------------------------------------------------------------------------
# Figures


def _scatter_panels(runs: list[RunData]):
    from .plots import Point, ScatterPanel

    util_names = {m for r in runs for m in r.utility}
    if not util_names:
        return []
    y_metric = sorted(util_names, key=lambda m: _metric_rank(m, UTILITY_ORDER))[0]
    kinds = suite_kinds(runs)
    axes = []
    for kind in ("harmful", "toxicity", "benign"):
        for suite, k in kinds.items():
            if k == kind and any(PRIMARY_BY_KIND[kind] in r.suites.get(suite, Suite(None, None)).metrics for r in runs):
                axes.append((suite, PRIMARY_BY_KIND[kind]))
    if not axes:  # no primary metric anywhere: take any suite metric there is
        axes = [(c.group, c.metric) for c in columns(runs) if c.group][:1]
    panels = []
    for suite, x_metric in axes[:3]:
        arrow = {1: "higher is safer", -1: "lower is safer"}.get(direction(x_metric), "")
        y_dir = {1: "higher is better", -1: "lower is better"}.get(direction(y_metric), "")
        panel = ScatterPanel(
            title=f"{suite}: {metric_name(x_metric)} vs {metric_name(y_metric)}",
            x_label=f"{metric_name(x_metric)} on {suite}" + (f" ({arrow})" if arrow else ""),
            y_label=metric_name(y_metric) + (f" ({y_dir})" if y_dir else ""),
        )
        scale_x = 100.0 if is_rate(x_metric) else 1.0
        scale_y = 100.0 if is_rate(y_metric) else 1.0
        for r in runs:
            xm = r.suites[suite].metrics.get(x_metric) if suite in r.suites else None
            ym = r.utility.get(y_metric)
            if not (xm and ym and xm.value is not None and ym.value is not None):
                continue

            def err(m, s):
                return (m.lo * s, m.hi * s) if m.lo is not None and m.hi is not None else None

            panel.points.append(Point(r.label, xm.value * scale_x, ym.value * scale_y,
                                      err(xm, scale_x), err(ym, scale_y)))
        if scale_x != 1.0:
            panel.x_label += " [%]"
        if scale_y != 1.0:
            panel.y_label += " [%]"
        if panel.points:
            panels.append(panel)
    return panels


def _curve_panels(runs: list[RunData]):
    from .plots import CurvePanel

    kinds = suite_kinds(runs)
    keys = sorted({k for r in runs for k in r.curves},
                  key=lambda k: (KIND_ORDER.get(kinds.get(k[0]) or "", 9), k[0],
                                 _metric_rank(k[1], SUITE_METRIC_ORDER + UTILITY_ORDER)))
    panels = []
    if any(r.loss for r in runs):
        panels.append(CurvePanel("training loss", "epoch", {r.label: r.loss for r in runs if r.loss}))
    for suite, metric in keys[: MAX_CURVE_PANELS - len(panels)]:
        scale = 100.0 if is_rate(metric) else 1.0
        series = {r.label: [(x, y * scale) for x, y in r.curves[(suite, metric)]]
                  for r in runs if (suite, metric) in r.curves}
        panels.append(CurvePanel(f"{suite}: {metric_name(metric)}", "epoch", series,
                                 "%" if scale != 1.0 else ""))
    return panels, max(0, len(keys) - (MAX_CURVE_PANELS - (1 if any(r.loss for r in runs) else 0)))


@dataclass
class Figures:
    scatter: bytes | None
    scatter_caption: str
    curves: bytes | None
    curves_caption: str


def make_figures(runs: list[RunData]) -> Figures:
    from .plots import curves_png, run_styles, scatter_png

    labels = [r.label for r in runs]
    styles = run_styles(labels, [r.method or r.label for r in runs])
    panels = _scatter_panels(runs)
    if panels:
        plotted = {p.label for panel in panels for p in panel.points}
        missing = [r.label for r in runs if r.label not in plotted]
        cap = ("Safety (x) against utility (y), one point per run; bars are 95% intervals.")
        if missing:
            cap += " Not plotted (a number is missing): " + ", ".join(missing) + "."
        scatter = scatter_png(panels, labels, styles)
    else:
        scatter, cap = None, "No run has both a safety and a utility number; nothing to plot."
    cpanels, dropped = _curve_panels(runs)
    if cpanels:
        ccap = "Training loss and the epoch-end evaluation records of metrics.jsonl, by epoch."
        if dropped:
            ccap += f" {dropped} more metric(s) not drawn."
        curves = curves_png(cpanels, labels, styles)
    else:
        curves, ccap = None, "No run has per-epoch records (metrics.jsonl); nothing to plot."
    return Figures(scatter, cap, curves, ccap)


# ---------------------------------------------------------------------------------------
# Samples


def select_prompts(runs: list[RunData], suite: str, k: int) -> list[str]:
    """Up to ``k`` prompts of ``suite``: those answered by the most runs first, then in the
    order the runs list them, so that the same prompts are compared across runs."""
    counts: Counter = Counter()
    first: dict[str, tuple[int, int]] = {}
    for ri, r in enumerate(runs):
        for j, p in enumerate(r.generation_order.get(suite, [])):
            counts[p] += 1
            first.setdefault(p, (ri, j))
    ranked = sorted(counts, key=lambda p: (-counts[p], first[p]))
    return ranked[: max(0, k)]


def _verdicts(rec: dict) -> list[tuple[str, str, str]]:
    """(judge, class, text) per judge verdict of a generation record."""
    out = []
    verdicts = rec.get("verdicts")
    if not isinstance(verdicts, dict):
        return out
    for judge, v in verdicts.items():
        if not isinstance(v, dict):
            continue
        unsafe = v.get("unsafe")
        cls, word = ("unsafe", "unsafe") if unsafe is True else ("safe", "safe") if unsafe is False \
            else ("unknown", "no verdict")
        extra = []
        if (score := _num(v.get("score"))) is not None:
            extra.append(f"score {score:.3f}")
        if v.get("label") not in (None, ""):
            extra.append(f"label {clean(v.get('label'))}")
        text = word + (f" ({', '.join(extra)})" if extra else "")
        out.append((clean(judge), cls, text))
    return out


def _gen_suites(runs: list[RunData]) -> list[str]:
    names = {s for r in runs for s in r.generations}
    kinds = suite_kinds(runs)
    return sorted(names, key=lambda s: (KIND_ORDER.get(kinds.get(s) or "", 9), s))


# ---------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;max-width:1400px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{margin-top:20px} .muted{color:#666;font-size:.9em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d0d0;padding:4px 8px;vertical-align:top}
th{background:#f3f4f6;text-align:center} td.num{text-align:right;white-space:nowrap}
td.run{font-weight:600;white-space:nowrap}
table.results td.run,table.results th.run{position:sticky;left:0;background:#fff;z-index:1}
table.results th.run{background:#f3f4f6} .ci{color:#555;font-size:.9em} .n{color:#888;font-size:.85em}
td.best .v{font-weight:700;color:#0a5d2a}
pre.gen{white-space:pre-wrap;word-break:break-word;overflow-wrap:anywhere;background:#f7f7f9;border:1px solid #e3e3e8;
 padding:6px 8px;margin:0;max-height:18em;overflow:auto;font-size:12.5px;
 font-family:ui-monospace,Menlo,Consolas,monospace}
table.samples{width:100%;table-layout:fixed} table.samples .run{width:13em;white-space:normal;text-align:left}
table.samples .verdicts{width:19em;text-align:left}
.unsafe{color:#b00020;font-weight:600} .safe{color:#0a5d2a} .unknown{color:#8a6d00}
img.plot{max-width:100%;height:auto;border:1px solid #eee}
ul.notes li{font-size:.9em;color:#555}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _html_metric_cell(col: Column, m: Metric | None, best: bool) -> str:
    cls = "num best" if best else "num"
    if m is None or m.value is None:
        return f'<td class="{cls}">{DASH}</td>'
    ci = ""
    if m.lo is not None and m.hi is not None:
        ci = f'<span class="ci">[{_h(_fmt(col.metric, m.lo, False))}, {_h(_fmt(col.metric, m.hi, False))}]</span>'
    n = f' <span class="n">n={m.n}</span>' if m.n is not None else ""
    return f'<td class="{cls}"><span class="v">{_h(_fmt(col.metric, m.value))}</span><br>{ci}{n}</td>'


def _html_results_table(runs: list[RunData], cols: list[Column]) -> str:
    groups: list[tuple[str, int]] = []
    for c in cols:
        if groups and groups[-1][0] == c.group_title:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((c.group_title, 1))
    head1 = ['<th class="run" rowspan="2">run</th><th rowspan="2">method</th>']
    head1 += [f'<th colspan="{span}">{_h(title)}</th>' for title, span in groups]
    head2 = [f"<th>{_h(c.title)}</th>" for c in cols]
    best = {c: _best(c, runs) for c in cols}
    rows = []
    for i, r in enumerate(runs):
        cells = [f'<td class="run">{_h(r.label)}</td><td>{_h(r.method or DASH)}</td>']
        cells += [_html_metric_cell(c, c.get(r), i in best[c]) for c in cols]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<div class="scroll"><table class="results"><thead><tr>' + "".join(head1) + "</tr><tr>"
            + "".join(head2) + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _html_runs_table(runs: list[RunData]) -> str:
    rows = []
    for r in runs:
        seed = DASH if r.seed is None else str(r.seed)
        rows.append("<tr>" + "".join(f"<td>{_h(x)}</td>" for x in (
            r.label, r.method or DASH, r.model or DASH, seed, r.decoding or DASH, str(r.path))) + "</tr>")
    return ('<div class="scroll"><table><thead><tr><th>run</th><th>method</th><th>model</th><th>seed</th>'
            "<th>decoding</th><th>directory</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _category_tables(runs: list[RunData]) -> list[tuple[str, str, list[str], list[list[Metric | None]]]]:
    """(suite, metric, categories, rows[category][run]) for every suite with categories."""
    out = []
    for suite, kind in suite_kinds(runs).items():
        cats = sorted({c for r in runs if suite in r.suites for c in r.suites[suite].by_category})
        if not cats:
            continue
        names = {m for r in runs if suite in r.suites for ms in r.suites[suite].by_category.values() for m in ms}
        primary = PRIMARY_BY_KIND.get(kind or "")
        metric = primary if primary in names else sorted(names, key=lambda m: _metric_rank(m, SUITE_METRIC_ORDER))[0]
        table = [[(r.suites[suite].by_category.get(c, {}).get(metric) if suite in r.suites else None)
                  for r in runs] for c in cats]
        out.append((suite, metric, cats, table))
    return out


def _html_categories(runs: list[RunData]) -> str:
    parts = []
    for suite, metric, cats, table in _category_tables(runs):
        head = "<th>category</th>" + "".join(f"<th>{_h(r.label)}</th>" for r in runs)
        col = Column(suite, None, metric)
        body = "".join("<tr><td>" + _h(c) + "</td>" + "".join(_html_metric_cell(col, m, False) for m in row) + "</tr>"
                       for c, row in zip(cats, table))
        parts.append(f"<h3>{_h(suite)}: {_h(metric_name(metric))}</h3>"
                     f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
    return "".join(parts) or '<p class="muted">No per-category numbers in any run.</p>'


def _html_agreement(runs: list[RunData]) -> str:
    pairs = sorted({p for r in runs for p in r.agreement})
    if not pairs:
        return '<p class="muted">No run was judged by more than one judge.</p>'
    head = "<th>run</th>" + "".join(f"<th>{_h(p)}</th>" for p in pairs)
    rows = []
    for r in runs:
        cells = [f'<td class="run">{_h(r.label)}</td>']
        for p in pairs:
            a = r.agreement.get(p)
            if not a or a.get("agreement") is None:
                cells.append(f'<td class="num">{DASH}</td>')
                continue
            kappa = a.get("cohen_kappa")
            text = f"{100 * a['agreement']:.1f}% agree, κ " + (DASH if kappa is None else f"{kappa:.2f}")
            n = f' <span class="n">n={int(a["n"])}</span>' if a.get("n") is not None else ""
            cells.append(f'<td class="num">{_h(text)}{n}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _html_samples(runs: list[RunData], samples: int) -> str:
    suites = _gen_suites(runs)
    if samples <= 0:
        return '<p class="muted">None requested (--samples 0).</p>'
    if not suites:
        return '<p class="muted">No saved generations (eval/generations/*.jsonl) in any run.</p>'
    parts = []
    for suite in suites:
        parts.append(f"<h3>{_h(suite)}</h3>")
        for k, prompt in enumerate(select_prompts(runs, suite, samples), 1):
            category = next((r.generations[suite][prompt].get("category") for r in runs
                             if prompt in r.generations.get(suite, {})), None)
            cat = f' <span class="muted">category: {_h(category)}</span>' if category not in (None, "") else ""
            rows = []
            for r in runs:
                rec = r.generations.get(suite, {}).get(prompt)
                if rec is None:
                    continue
                verdicts = "<br>".join(f'{_h(j)}: <span class="{cls}">{_h(t)}</span>'
                                       for j, cls, t in _verdicts(rec)) or DASH
                rows.append(f'<tr><td class="run">{_h(r.label)}</td>'
                            f'<td><pre class="gen">{_h(_clip(clean(rec.get("response", ""))))}</pre></td>'
                            f'<td class="verdicts">{verdicts}</td></tr>')
            parts.append(f"<h4>prompt {k}{cat}</h4><pre class=\"gen\">{_h(_clip(prompt))}</pre>"
                         '<table class="samples"><thead><tr><th class="run">run</th><th>response</th>'
                         f'<th class="verdicts">verdicts</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return "".join(parts)


def _html_figure(png: bytes | None, alt: str, caption: str) -> str:
    img = ""
    if png:
        data = base64.b64encode(png).decode("ascii")
        img = f'<img class="plot" alt="{_h(alt)}" src="data:image/png;base64,{data}">'
    return f'{img}<p class="muted">{_h(caption)}</p>'


def render_html(runs: list[RunData], samples: int = DEFAULT_SAMPLES, figures: Figures | None = None) -> str:
    figures = figures or make_figures(runs)
    cols = columns(runs)
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes]
    results = (_html_results_table(runs, cols) if cols else
               '<p class="muted">No run has final evaluation results (results.json).</p>')
    notes_html = ("<h2>Notes</h2><ul class=\"notes\">" + "".join(f"<li>{_h(n)}</li>" for n in notes) + "</ul>"
                  if notes else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>safeft report</title><style>{_CSS}</style></head>
<body>
<h1>safeft report</h1>
<p class="muted">{len(runs)} run(s). Every number: value [95% interval], n. Rates in percent;
↑ higher is better, ↓ lower is better; the best value of a column is in bold green; — = not available.</p>
<h2>Runs</h2>{_html_runs_table(runs)}
<h2>Results</h2>{results}
<h2>Safety vs utility</h2>{_html_figure(figures.scatter, "safety vs utility scatter", figures.scatter_caption)}
<h2>Per-epoch curves</h2>{_html_figure(figures.curves, "per-epoch curves", figures.curves_caption)}
<h2>Per category</h2>{_html_categories(runs)}
<h2>Judge agreement</h2>{_html_agreement(runs)}
<h2>Sample generations</h2>{_html_samples(runs, samples)}
{notes_html}
</body></html>
"""


# ---------------------------------------------------------------------------------------
# Markdown and plain text


def _md_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(runs: list[RunData], samples: int = DEFAULT_SAMPLES, figures: Figures | None = None,
                    image_names: tuple[str, str] = ("report.scatter.png", "report.curves.png")) -> str:
    """The Markdown page; the figures are linked as ``image_names`` (written by the caller)."""
    figures = figures or make_figures(runs)
    cols = columns(runs)
    out = ["# safeft report", "",
           f"{len(runs)} run(s). Every number: value \\[95% interval\\] (n). Rates in percent; "
           "↑ higher is better, ↓ lower is better; — = not available.", "", "## Runs", ""]
    out.append(_md_table(["run", "method", "model", "seed", "decoding", "directory"],
                         [[_md(x) for x in (r.label, r.method or DASH, r.model or DASH,
                                            DASH if r.seed is None else r.seed, r.decoding or DASH, r.path)]
                          for r in runs]))
    out += ["", "## Results", ""]
    if cols:
        header = ["run", "method"] + [_md(f"{c.group_title}: {c.title}") for c in cols]
        best = {c: _best(c, runs) for c in cols}
        rows = []
        for i, r in enumerate(runs):
            cells = [_md(r.label), _md(r.method or DASH)]
            for c in cols:
                cell = fmt_metric(c.metric, c.get(r), with_n=True)  # digits and punctuation of ours
                cells.append(f"**{cell}**" if i in best[c] else cell)
            rows.append(cells)
        out.append(_md_table(header, rows, right=set(range(2, len(header)))))
    else:
        out.append("No run has final evaluation results (results.json).")
    for title, png, name, caption in (("Safety vs utility", figures.scatter, image_names[0], figures.scatter_caption),
                                      ("Per-epoch curves", figures.curves, image_names[1], figures.curves_caption)):
        out += ["", f"## {title}", ""]
        if png:
            out += [f"![{title}]({urllib.parse.quote(name)})", ""]
        out.append(_md(caption))
    out += ["", "## Per category", ""]
    tables = _category_tables(runs)
    for suite, metric, cats, table in tables:
        out += [f"### {_md(suite)}: {_md(metric_name(metric))}", ""]
        out.append(_md_table(["category"] + [_md(r.label) for r in runs],
                             [[_md(c)] + [fmt_metric(metric, m, with_n=True) for m in row]
                              for c, row in zip(cats, table)], right=set(range(1, len(runs) + 1))))
        out.append("")
    if not tables:
        out.append("No per-category numbers in any run.")
    out += ["", "## Judge agreement", ""]
    pairs = sorted({p for r in runs for p in r.agreement})
    if pairs:
        rows = []
        for r in runs:
            cells = [_md(r.label)]
            for p in pairs:
                a = r.agreement.get(p)
                if not a or a.get("agreement") is None:
                    cells.append(DASH)
                    continue
                kappa = a.get("cohen_kappa")
                n = f" (n={int(a['n'])})" if a.get("n") is not None else ""
                cells.append(f"{100 * a['agreement']:.1f}% agree, κ "  # numbers of ours, no escaping
                             + (DASH if kappa is None else f"{kappa:.2f}") + n)
            rows.append(cells)
        out.append(_md_table(["run"] + [_md(p) for p in pairs], rows))
    else:
        out.append("No run was judged by more than one judge.")
    out += ["", "## Sample generations", ""]
    suites = _gen_suites(runs) if samples > 0 else []
    if samples <= 0:
        out.append("None requested (--samples 0).")
    elif not suites:
        out.append("No saved generations (eval/generations/\\*.jsonl) in any run.")
    for suite in suites:
        out += [f"### {_md(suite)}", ""]
        for k, prompt in enumerate(select_prompts(runs, suite, samples), 1):
            category = next((r.generations[suite][prompt].get("category") for r in runs
                             if prompt in r.generations.get(suite, {})), None)
            cat = f" (category: {_md(category)})" if category not in (None, "") else ""
            out += [f"#### Prompt {k}{cat}", "", _md_block(_clip(prompt)), ""]
            for r in runs:
                rec = r.generations.get(suite, {}).get(prompt)
                if rec is None:
                    continue
                verdicts = "; ".join(f"{j}: {t}" for j, _, t in _verdicts(rec)) or DASH
                out += [f"**{_md(r.label)}**: {_md(verdicts)}", "",
                        _md_block(_clip(clean(rec.get("response", "")))), ""]
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes]
    if notes:
        out += ["", "## Notes", ""] + [f"- {_md(n)}" for n in notes]
    return "\n".join(out).rstrip() + "\n"


def text_table(runs: list[RunData]) -> str:
    """The results table as aligned plain text (for a terminal; control characters escaped)."""
    cols = columns(runs)
    header = ["run", "method"] + [f"{c.group + ': ' if c.group else ''}{metric_name(c.metric)}" for c in cols]
    rows = [[clean(r.label), clean(r.method or DASH)] + [fmt_metric(c.metric, c.get(r)) for c in cols]
            for r in runs]
    rows = [[" ".join(cell.split()) for cell in row] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_out(out_path, samples: int) -> Path:
    out = Path(out_path)
    if out.suffix.lower() not in (".html", ".htm", ".md", ".markdown"):
        raise ConfigError(f"expected a .html or .md file, got {out.name!r}", field="--out")
    if out.is_dir():
        raise ConfigError(f"{out} is a directory", field="--out")
    if samples < 0:
        raise ConfigError(f"expected 0 or more, got {samples}", field="--samples")
    return out


def write_report(runs: list[RunData], out_path, *, samples: int = DEFAULT_SAMPLES) -> Path:
    """Write the report of already loaded ``runs`` (see :func:`build_report`)."""
    out = _check_out(out_path, samples)
    figures = make_figures(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".html", ".htm"):
        _atomic_write(out, render_html(runs, samples, figures).encode("utf-8"))
        return out
    names = (f"{out.stem}.scatter.png", f"{out.stem}.curves.png")
    for name, png in zip(names, (figures.scatter, figures.curves)):
        if png:
            _atomic_write(out.with_name(name), png)
    _atomic_write(out, render_markdown(runs, samples, figures, names).encode("utf-8"))
    return out


def build_report(run_dirs, out_path, *, samples: int = DEFAULT_SAMPLES) -> Path:
    """Write the report of ``run_dirs`` to ``out_path`` (``.html``: one self-contained file;
    ``.md``: Markdown plus ``<stem>.scatter.png`` / ``<stem>.curves.png`` beside it) and
    return its path. Every file is written atomically (temp file, then ``os.replace``);
    bad input raises :class:`~safeft.errors.SafeftError` before anything is written."""
    _check_out(out_path, samples)
    return write_report(load_runs(run_dirs), out_path, samples=samples)
