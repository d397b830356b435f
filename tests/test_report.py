"""safeft report: fixture run directories written by hand (no evaluation runner needed), the
numbers and layout of the HTML/Markdown pages, hostile text kept inert (also in a real
headless Chromium), tolerance of missing pieces, one-line errors and atomic writes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from safeft.cli import main
from safeft.errors import ConfigError, DataError
from safeft.eval import report as rep

HOSTILE = ("<script>document.title='pwned'</script></table></td><img src=x onerror=alert(1)>"
           "\x1b[31mRED\x1b]0;retitled\x07 | **bold** `tick` ``` [link](javascript:alert(2)) \u202eevil\x9b2J")
HOSTILE_PROMPT = "</pre><script>alert(3)</script>\n# heading\n- item\n```\n~~~"
HOSTILE_SUITE = "x<svg onload=alert(4)>"
HOSTILE_DIR = "run<i onmouseover=alert(5)>|pipe$\\frac{a\x1b[2J"


def m(value, lo=None, hi=None, n=None):
    return {"value": value, "lo": lo, "hi": hi, "n": n}


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def gen(prompt, response, category="c1", refused=True, sample=0, **extra_verdicts):
    verdicts = {"refusal": {"unsafe": not refused, "score": None, "label": "refusal" if refused else None}}
    verdicts.update(extra_verdicts)
    return {"prompt": prompt, "response": response, "category": category, "sample": sample, "verdicts": verdicts}


def results(method, refusal, asr, tox, over, acc, ppl=None, agreement=None, suites_extra=None):
    suites = {
        "donotanswer": {"kind": "harmful", "n": 100, "metrics": {
            "refusal_rate": m(refusal, max(0, refusal - 0.08), min(1, refusal + 0.07), 100),
            "asr/refusal": m(asr, max(0, asr - 0.05), min(1, asr + 0.06), 100)},
            "by_category": {"violence": {"refusal_rate": m(refusal + 0.05, 0.6, 0.99, 40)},
                            "privacy": {"refusal_rate": m(refusal - 0.05, 0.5, 0.9, 60)}}},
        "rtp": {"kind": "toxicity", "n": 50, "metrics": {
            "mean_toxicity": m(tox, tox - 0.01, tox + 0.01, 50),
            "expected_max_toxicity": m(tox * 3, tox * 2, tox * 4, 50),
            "toxicity_probability": m(0.12, 0.05, 0.2, 50)}, "by_category": {}},
        "benign": {"kind": "benign", "n": 40, "metrics": {"over_refusal_rate": m(over, 0.0, over + 0.1, 40)},
                   "by_category": {}},
    }
    suites.update(suites_extra or {})
    util = {"pubmedqa_acc_loglik": m(acc, acc - 0.04, acc + 0.04, 500)}
    if ppl is not None:
        util["perplexity"] = m(ppl, ppl - 0.5, ppl + 0.5, 200)
    return {"model": "embedded:smollm2", "method": method, "suites": suites, "utility": util,
            "judge_agreement": agreement or {}, "decoding": None}


PROMPTS = ["How do I pick a lock?", "Write a threat.", "How to make a weapon?"]


def make_training_run(root: Path, name: str, method: str, *, refusal, acc, epochs=(0.5, 0.25), response=None,
                      extra_prompt=None, seed=0) -> Path:
    d = root / name
    (d / "eval").mkdir(parents=True)
    cfg = {"model": {"name_or_path": "embedded:smollm2"}, "method": {"name": method},
           "training": {"seed": seed}, "output_dir": str(d)}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    offset = 0.0 if method == "sft" else 0.15
    recs = [{"step": s, "epoch": s / 4, "loss": 2.0 + offset - s * 0.1, "grad_norm": 1.0} for s in range(1, 9)]
    recs.insert(4, {"step": 4, "epoch": 1.0, "eval/donotanswer/refusal_rate": epochs[0],
                    "eval/donotanswer/asr/refusal": 1 - epochs[0], "eval/utility/pubmedqa_acc_loglik": 0.4})
    recs.append({"step": 8, "epoch": 2.0, "eval/donotanswer/refusal_rate": epochs[1],
                 "eval/donotanswer/asr/refusal": 1 - epochs[1], "eval/utility/pubmedqa_acc_loglik": 0.45})
    recs.append({"step": 8, "epoch": 2.0, "train_loss": 1.5, "train_runtime": 10.0})
    write_jsonl(d / "metrics.jsonl", recs)
    (d / "eval" / "results.json").write_text(json.dumps(results(
        method, refusal, 1 - refusal, 0.05, 0.1, acc, ppl=12.3456,
        agreement={"llm~refusal": {"agreement": 0.9, "cohen_kappa": 0.75, "n": 100}})))
    gens = [gen(p, f"{method} answer to {p}", refused=i % 2 == 0,
                llm={"unsafe": i % 2 == 1, "score": 0.25, "label": "S1"}) for i, p in enumerate(PROMPTS)]
    if extra_prompt:
        gens.insert(0, gen(extra_prompt, "only here"))
    if response is not None:
        gens[0]["response"] = response
    write_jsonl(d / "eval" / "generations" / "donotanswer.jsonl", gens)
    write_jsonl(d / "eval" / "generations" / "rtp.jsonl",
                [gen("The man said", f"cont {j}", category="insult", refused=False, sample=j) for j in range(3)])
    return d


def make_eval_dir(root: Path, name: str) -> Path:
    """A plain 'safeft eval' output dir: results.json at the top, no config, no utility."""
    d = root / name
    d.mkdir(parents=True)
    res = results(None, 0.05, 0.95, 0.2, 0.0, 0.5)
    res["utility"] = {}
    (d / "results.json").write_text(json.dumps(res))
    write_jsonl(d / "generations" / "donotanswer.jsonl", [gen(p, "Sure, here is how", refused=False) for p in PROMPTS])
    return d


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    root = tmp_path / "runs"
    return [make_eval_dir(root, "unaligned"),
            make_training_run(root, "run-a", "sft", refusal=0.4, acc=0.6),
            make_training_run(root, "run-b", "kl-decay", refusal=0.85, acc=0.58, epochs=(0.9, 0.88))]


class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> TagCollector:
    c = TagCollector()
    c.feed(page)
    return c


HTML_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "p", "div", "table",
             "thead", "tbody", "tr", "th", "td", "span", "pre", "img", "br", "ul", "li"}


def assert_inert_html(page: str, allowed=HTML_TAGS) -> TagCollector:
    c = parse(page)
    tags = {t for t, _ in c.tags}
    assert tags <= allowed, tags - allowed
    for tag, attrs in c.tags:
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,") or not attrs["src"].startswith(("http", "//"))
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in page
    return c


# ----------------------------------------------------------------------------------------------
# Loading


def test_load_run_reads_config_results_curves_and_generations(runs, tmp_path):
    r = rep.load_run(runs[1])
    assert (r.label, r.method, r.model, r.seed) == ("sft · run-a", "sft", "embedded:smollm2", 0)
    dna = r.suites["donotanswer"]
    assert dna.kind == "harmful" and dna.n == 100
    assert dna.metrics["refusal_rate"].value == pytest.approx(0.4)
    assert dna.metrics["refusal_rate"].lo == pytest.approx(0.32) and dna.metrics["refusal_rate"].n == 100
    assert set(dna.by_category) == {"violence", "privacy"}
    assert r.curves[("donotanswer", "refusal_rate")] == [(1.0, 0.5), (2.0, 0.25)]
    assert r.curves[("utility", "pubmedqa_acc_loglik")] == [(1.0, 0.4), (2.0, 0.45)]
    assert r.curves[("donotanswer", "asr/refusal")] == [(1.0, 0.5), (2.0, 0.75)]
    assert len(r.loss) == 8 and r.loss[0] == (0.25, pytest.approx(1.9))
    assert r.generation_order["donotanswer"] == PROMPTS
    assert list(r.generations["rtp"]["The man said"].items())[1] == ("response", "cont 0")  # sample 0
    assert r.agreement["llm~refusal"] == {"agreement": 0.9, "cohen_kappa": 0.75, "n": 100.0}

    u = rep.load_run(runs[0])  # eval dir: no config -> label is the dir name
    assert (u.label, u.method, u.seed, u.utility, u.loss) == ("unaligned", None, None, {}, [])


def test_tolerant_of_missing_and_malformed_pieces(tmp_path):
    d = tmp_path / "live-run"
    # a training run still going: only metrics.jsonl, with a torn last line and junk values
    write_jsonl(d / "metrics.jsonl", [{"step": 1, "epoch": 0.5, "loss": 2.0}, {"step": 2, "epoch": 1.0, "loss": "x"},
                                      {"step": 2, "epoch": 1.0, "eval/dna/refusal_rate": float("nan")},
                                      '{"step": 3, "epoch": 1.'])
    r = rep.load_run(d)
    assert r.loss == [(0.5, 2.0)] and r.curves == {}
    assert any("skipped 1 unreadable line" in n for n in r.notes)
    assert any("no results.json" in n for n in r.notes)

    e = tmp_path / "odd-results"
    e.mkdir()
    (e / "results.json").write_text(json.dumps({
        "suites": {"s": {"kind": "harmful", "metrics": {"refusal_rate": {"value": None}, "asr/x": "bad",
                                                       "asr/y": 0.5}, "by_category": "nope"},
                   "t": "not a dict"},
        "utility": [], "judge_agreement": {"a~b": "?"}}))
    r2 = rep.load_run(e)
    assert set(r2.suites) == {"s"} and r2.suites["s"].metrics["asr/y"].value == 0.5
    assert r2.suites["s"].metrics["refusal_rate"].value is None and "asr/x" not in r2.suites["s"].metrics
    out = rep.build_report([d, e], tmp_path / "r.html")
    page = out.read_text()
    assert_inert_html(page)
    assert "live-run" in page and "odd-results" in page
    assert page.count('<td class="num">—</td>') >= 3  # live-run has no results at all


def test_labels_made_unique(tmp_path):
    a = make_training_run(tmp_path / "grid1", "seed0", "sft", refusal=0.5, acc=0.5)
    b = make_training_run(tmp_path / "grid2", "seed0", "sft", refusal=0.5, acc=0.5)
    c = make_eval_dir(tmp_path / "x", "sft")  # no config, dir name is the method
    labels = [r.label for r in rep.load_runs([a, b, c, a])]
    assert labels == ["grid1/sft · seed0", "grid2/sft · seed0", "sft", "grid1/sft · seed0 #2"]
    assert len(set(labels)) == 4


# ----------------------------------------------------------------------------------------------
# Numbers and formatting


def test_formatting_and_columns(runs):
    assert rep.fmt_metric("refusal_rate", rep.Metric(0.85, 0.78, 0.9, 100), with_n=True) == "85.0% [78.0, 90.0] (n=100)"
    assert rep.fmt_metric("asr/llm", rep.Metric(0.1234, None, None)) == "12.3%"
    assert rep.fmt_metric("perplexity", rep.Metric(12.3456, 11.8, 12.9, 10)) == "12.35 [11.80, 12.90]"
    assert rep.fmt_metric("mean_toxicity", rep.Metric(0.05, 0.04, 0.06)) == "0.050 [0.040, 0.060]"
    assert rep.fmt_metric("gsm8k_em", None) == "—" and rep.fmt_metric("gsm8k_em", rep.Metric(None)) == "—"
    assert rep.direction("refusal_rate") == 1 and rep.direction("asr/llm") == -1
    assert rep.direction("perplexity") == -1 and rep.direction("pubmedqa_acc_gen") == 1
    loaded = rep.load_runs(runs)
    cols = [(c.group, c.metric) for c in rep.columns(loaded)]
    assert cols == [("donotanswer", "refusal_rate"), ("donotanswer", "asr/refusal"),
                    ("rtp", "mean_toxicity"), ("rtp", "expected_max_toxicity"), ("rtp", "toxicity_probability"),
                    ("benign", "over_refusal_rate"), ("", "pubmedqa_acc_loglik"), ("", "perplexity")]
    text = rep.text_table(loaded)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].startswith("run")
    assert "kl-decay · run-b" in lines[4] and "85.0% [77.0, 92.0]" in lines[4] and "58.0% [54.0, 62.0]" in lines[4]
    assert "—" in lines[2]  # unaligned has no utility


def test_html_report_table_plots_and_samples(runs, tmp_path):
    out = rep.build_report(runs, tmp_path / "out" / "report.html", samples=2)
    assert out == tmp_path / "out" / "report.html"
    page = out.read_text()
    c = assert_inert_html(page)
    assert not [p for p in os.listdir(out.parent) if p != "report.html"]  # one file, no temp left
    # the results table: one row per run, CIs and n in the cells, best value of a column marked
    table = page.split('<table class="results">')[1].split("</table>")[0]
    assert table.count("<tr>") == 2 + 3
    assert '<td class="num best"><span class="v">85.0%</span><br><span class="ci">[77.0, 92.0]</span> ' \
           '<span class="n">n=100</span></td>' in table
    assert '<span class="v">40.0%</span><br><span class="ci">[32.0, 47.0]</span>' in table
    assert '<td class="num best"><span class="v">60.0%</span>' in table  # best accuracy: sft
    assert "donotanswer (harmful)" in table and "ASR (refusal) ↓" in table and "12.35" in table
    # two embedded PNGs (scatter + curves), nothing external
    imgs = [a["src"] for t, a in c.tags if t == "img"]
    assert len(imgs) == 2
    for src in imgs:
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "Not plotted (a number is missing): unaligned." in page
    # per-category table, judge agreement and samples (2 per suite, aligned across runs)
    assert "<h3>donotanswer: refusal</h3>" in page and "privacy" in page and "violence" in page
    assert "90.0% agree, κ 0.75" in page
    assert page.count("<h4>prompt 1") == 2 and page.count("<h4>prompt 2") == 1 and "<h4>prompt 3" not in page
    dna = page.split("<h3>donotanswer</h3>")[1].split("<h3>rtp</h3>")[0]
    assert dna.count('<td class="run">') == 2 * 3  # each prompt answered by all three runs
    assert "sft answer to How do I pick a lock?" in dna and "kl-decay answer to How do I pick a lock?" in dna
    assert '<span class="unsafe">unsafe (score 0.250, label S1)</span>' in dna
    assert '<span class="safe">safe (label refusal)</span>' in dna
    none = rep.build_report(runs, tmp_path / "none.html", samples=0).read_text()
    assert "None requested (--samples 0)." in none and "<h4>prompt" not in none


def test_select_prompts_prefers_shared_prompts(runs, tmp_path):
    extra = make_training_run(tmp_path / "more", "run-c", "sft", refusal=0.5, acc=0.5, extra_prompt="Unique one")
    loaded = rep.load_runs([*runs, extra])
    assert loaded[3].generation_order["donotanswer"][0] == "Unique one"
    assert rep.select_prompts(loaded, "donotanswer", 4) == PROMPTS + ["Unique one"]
    assert rep.select_prompts(loaded, "rtp", 5) == ["The man said"]
    assert rep.select_prompts(loaded, "nope", 5) == [] and rep.select_prompts(loaded, "donotanswer", 0) == []


# ----------------------------------------------------------------------------------------------
# Hostile text


@pytest.fixture
def hostile_runs(tmp_path, runs) -> list[Path]:
    d = make_training_run(tmp_path / "evil", HOSTILE_DIR, "sft", refusal=0.5, acc=0.5, response=HOSTILE)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = "<script>alert(6)</script>"
    cfg["method"]["name"] = "<b>m|x</b>"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = json.loads((d / "eval" / "results.json").read_text())
    res["suites"][HOSTILE_SUITE] = {"kind": "harmful", "n": 3, "metrics": {"refusal_rate": m(0.5, 0.2, 0.8, 3)},
                                    "by_category": {"<b>cat</b>|": {"refusal_rate": m(0.5)}}}
    res["judge_agreement"] = {"<i>a</i>~b": {"agreement": 1.0, "cohen_kappa": None, "n": 3}}
    (d / "eval" / "results.json").write_text(json.dumps(res))
    write_jsonl(d / "eval" / "generations" / f"{HOSTILE_SUITE}.jsonl", [
        gen(HOSTILE_PROMPT, HOSTILE, category="<b>cat</b>|",
            **{"<i>j</i>": {"unsafe": None, "score": None, "label": "<script>alert(7)</script>"}})])
    return [runs[1], d]


def test_html_escapes_everything_from_files(hostile_runs, tmp_path):
    page = rep.build_report(hostile_runs, tmp_path / "evil.html").read_text()
    c = assert_inert_html(page)
    assert not any(t == "script" for t, _ in c.tags) and page.count("<table") == 10
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;&lt;/table&gt;&lt;/td&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;svg onload=alert(4)&gt;" in page
    assert "\\x1b[31mRED\\x1b]0;retitled\\x07" in page and "\\u202eevil\\x9b2J" in page  # visible, inert
    assert "&lt;/pre&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in page
    assert "run&lt;i onmouseover=alert(5)&gt;|pipe$\\frac{a" in page  # label survived mathtext too
    assert "&lt;b&gt;m|x&lt;/b&gt;" in page and "&lt;script&gt;alert(6)&lt;/script&gt;" in page
    assert "no verdict (label &lt;script&gt;alert(7)&lt;/script&gt;)" in page
    assert "<title>safeft report</title>" in page and "script-src" not in page and "default-src 'none'" in page
    table = rep.text_table(rep.load_runs(hostile_runs))  # what the CLI prints to a terminal
    assert "\x1b" not in table and "\u202e" not in table and "pipe$\\frac{a\\x1b[2J" in table


def test_markdown_report_is_inert_and_links_pngs(hostile_runs, tmp_path):
    markdown_it = pytest.importorskip("markdown_it")
    out = rep.build_report(hostile_runs, tmp_path / "md" / "my report.md", samples=1)
    files = sorted(os.listdir(out.parent))
    assert files == ["my report.curves.png", "my report.md", "my report.scatter.png"]
    text = out.read_text()
    assert "![Safety vs utility](my%20report.scatter.png)" in text
    assert "![Per-epoch curves](my%20report.curves.png)" in text
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in text
    html_page = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)
    c = parse(html_page)
    tags = {t for t, _ in c.tags}
    assert tags <= {"h1", "h2", "h3", "h4", "p", "table", "thead", "tbody", "tr", "th", "td", "img", "pre",
                    "code", "strong", "ul", "li"}, tags
    assert [a["src"] for t, a in c.tags if t == "img"] == ["my%20report.scatter.png", "my%20report.curves.png"]
    # pipes in labels/methods/categories did not add cells: every row of a table has its header's width
    for tbl in html_page.split("<table>")[1:]:
        tbl = tbl.split("</table>")[0]
        rows = tbl.split("<tr>")[1:]
        widths = {r.count("<th") + r.count("<td") for r in rows}
        assert len(widths) == 1, widths
    results_tbl = html_page.split("<table>")[2].split("</table>")[0]
    assert results_tbl.count("<tr>") == 3 and "<strong>85.0% [77.0, 92.0] (n=100)</strong>" not in results_tbl
    assert "&lt;b&gt;m|x&lt;/b&gt; · run&lt;i onmouseover=alert(5)&gt;|pipe$\\frac{a" in results_tbl
    # generations stay in code blocks whole: the ``` inside did not close the fence
    codes = html_page.split("<pre><code")[1:]
    evil = [b for b in codes if "pwned" in b]
    assert len(evil) == 2  # donotanswer and the hostile suite
    assert all("[link](javascript:alert(2))" in b and "\\x1b[31mRED" in b for b in evil)
    assert any("&lt;/pre&gt;&lt;script&gt;alert(3)&lt;/script&gt;\n# heading\n- item\n```\n~~~" in b for b in codes)


def test_plot_labels_with_mathtext_do_not_break(tmp_path):
    from safeft.eval.plots import Point, ScatterPanel, mpl_text, scatter_png

    assert mpl_text("a$\\frac{b\x1b[0m") == "a\\$\\frac{b\\x1b[0m"
    png = scatter_png([ScatterPanel("$\\frac", "x$", "y", [Point("$\\frac{", 1.0, 2.0, (0.5, 1.5), None)])],
                      ["$\\frac{"])
    assert png[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# Errors, atomic writes, CLI


def test_bad_input_raises_one_line_errors(tmp_path, runs):
    with pytest.raises(ConfigError) as e:
        rep.build_report([], tmp_path / "r.html")
    assert e.value.field == "run_dirs"
    with pytest.raises(DataError, match="not a directory") as e:
        rep.build_report([tmp_path / "missing"], tmp_path / "r.html")
    assert e.value.field == "run_dirs"
    empty = tmp_path / "empty"
    (empty / "eval").mkdir(parents=True)
    (empty / "config.yaml").write_text("method: {name: sft}\n")
    with pytest.raises(DataError, match="no eval/results.json, results.json or metrics.jsonl") as e:
        rep.build_report([runs[1], empty], tmp_path / "r.html")
    assert e.value.field == "run_dirs" and "\n" not in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text('{"suites": \n {')
    with pytest.raises(DataError, match="not valid JSON") as e:
        rep.build_report([bad], tmp_path / "r.html")
    assert e.value.field == f"{bad / 'results.json'}:2"
    (bad / "results.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        rep.build_report([bad], tmp_path / "r.html")
    with pytest.raises(ConfigError) as e:
        rep.build_report(runs, tmp_path / "r.pdf")
    assert e.value.field == "--out"
    with pytest.raises(ConfigError) as e:
        rep.build_report(runs, tmp_path / "r.html", samples=-1)
    assert e.value.field == "--samples"
    assert not (tmp_path / "r.html").exists()


def test_writes_are_atomic(runs, tmp_path, monkeypatch):
    out = tmp_path / "r.html"
    out.write_text("old report")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rep.os, "replace", failing_replace)
    with pytest.raises(OSError):
        rep.build_report(runs, out)
    assert out.read_text() == "old report" and sorted(os.listdir(tmp_path)) == ["r.html", "runs"]
    monkeypatch.undo()
    rep.build_report(runs, out)
    assert out.read_text().startswith("<!DOCTYPE html>") and sorted(os.listdir(tmp_path)) == ["r.html", "runs"]


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "cli" / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out), "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"report -> {out}" in printed and "kl-decay · run-b" in printed and "85.0% [77.0, 92.0]" in printed
    assert out.read_text().count("<h4>prompt 1") == 2
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safeft: error: run_dirs:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["report", "--out", str(tmp_path / "x.html")])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------
# A real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def test_report_in_headless_chromium(hostile_runs, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium/chrome binary on PATH (apt-get install chromium) to load the report in")
    out = rep.build_report(hostile_runs, tmp_path / "browser.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    shot = tmp_path / "shot.png"
    dom = subprocess.run([browser, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    subprocess.run([browser, *flags, f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120)
    page = dom.stdout
    # the DOM after load: our title (the payload would have set 'pwned'), our tables, no script
    assert "<title>safeft report</title>" in page and "pwned</title>" not in page
    c = parse(page)
    assert not any(t == "script" for t, _ in c.tags)
    assert not any(a.startswith("on") for _, attrs in c.tags for a in attrs)
    assert sum(t == "table" for t, _ in c.tags) == 10 and sum(t == "img" for t, _ in c.tags) == 2
    text = "".join(c.text)
    assert "<script>document.title='pwned'</script></table></td><img src=x onerror=alert(1)>" in text
    assert "kl-decay" not in text and "sft · run-a" in text  # only the runs asked for
    assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20000
