"""``evaluate``: suites -> generations (saved, resumable) -> verdicts -> metrics with CIs.

Output directory::

    OUT/generations/<suite>.jsonl   one line per generation:
                                    {"prompt", "response", "category", "sample", "verdicts": {judge: {"unsafe", "score", "label"}}}
    OUT/results.json                {"model", "method", "suites": {suite: {"kind", "n", "metrics", "by_category"}},
                                     "utility", "judge_agreement", "decoding", "generation"}

Generations are appended after every chunk of prompts, so an interrupted evaluation resumes
where it stopped; a rerun (same or other judges, larger ``n``) regenerates nothing already
saved and judges only the generations a judge has not seen. To regenerate (other decoding
settings), delete the suite's file.

Protocol per suite kind:

- ``harmful``: one greedy answer per prompt. ``refusal_rate`` (the refusal rules, always
  run), ``asr/<judge>`` = share judged unsafe for every judge.
- ``toxicity``: ``k`` sampled continuations per prompt (nucleus p = 0.9, temperature 1, as in
  RealToxicityPrompts); ``mean_toxicity``, ``expected_max_toxicity``,
  ``toxicity_probability`` from the first judge that gives graded scores (``toxicity`` is
  added when none was asked for), and ``asr/<judge>`` per judge over all samples.
- ``benign``: one greedy answer; ``over_refusal_rate``.

LLM judges also report ``parse_failure_rate/<judge>``; their undecided verdicts are left out
of the ``asr`` denominators and counted there.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

from .decoding import build_logits_processor
from .generate import generate
from .judges import Judge, LLMJudge, get_judge
from .metrics import agreement, expected_max_toxicity, mean_toxicity, proportion, toxicity_probability
from .suites import SuiteItem, load_suite, suite_key

log = logging.getLogger(__name__)

RTP_TOP_P = 0.9


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_generations(path: Path) -> list[dict]:
    """Saved records; a torn last line (a killed run) is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _write_generations(path: Path, records: list[dict]) -> None:
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class _Judges:
    """Judges by name, loaded once, with per-judge options."""

    def __init__(self, judges, judge_opts: dict | None):
        self.opts = judge_opts or {}
        self.loaded: dict[str, Judge] = {}
        self.names: list[str] = []
        for j in judges:
            if isinstance(j, Judge):
                self.loaded[j.name] = j
                self.names.append(j.name)
            else:
                self.names.append(j)

    def get(self, name: str) -> Judge:
        if name not in self.loaded:
            base = name.partition(":")[0]
            self.loaded[name] = get_judge(name, **{**self.opts.get(base, {}), **self.opts.get(name, {})})
        return self.loaded[name]

    def for_kind(self, kind: str, chat: bool = True) -> list[str]:
        names = list(self.names)
        if kind == "toxicity" and not chat:  # a raw continuation cannot refuse
            names = [nm for nm in names if nm != "refusal"]
        if kind in ("harmful", "benign") and "refusal" not in names:
            names.insert(0, "refusal")
        if kind == "toxicity" and not any(self.get(n).scores for n in names):
            names.append("toxicity")
        return names


def _generate_suite(model, tokenizer, items: list[SuiteItem], path: Path, *, k: int, seed: int,
                    max_new_tokens: int, batch_size: int, chunk_size: int, logits_processor, temperature: float,
                    top_p: float, system_prompt: str | None) -> None:
    records = read_generations(path)
    have = defaultdict(set)
    for r in records:
        have[r["prompt"]].add(int(r.get("sample", 0)))
    todo = [it for it in items if len(have[it.prompt] & set(range(k))) < k]
    if not todo:
        return
    kind = items[0].kind
    sample = kind == "toxicity" and k > 0
    log.info("generating %d x %d for %s (%d saved)", len(todo), k, path.stem, len(records))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and not path.read_bytes().endswith(b"\n") and path.stat().st_size:
        _write_generations(path, records)  # drop a torn last line before appending
    for c in range(0, len(todo), chunk_size):
        chunk = todo[c:c + chunk_size]
        outs = generate(model, tokenizer, [it.prompt for it in chunk], chat=chunk[0].chat,
                        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p,
                        num_return_sequences=k, seed=seed + len(records) + c, batch_size=batch_size,
                        logits_processor=logits_processor, system_prompt=system_prompt)
        with path.open("a", encoding="utf-8") as fh:
            for i, it in enumerate(chunk):
                for j in range(k):
                    if j in have[it.prompt]:
                        continue
                    rec = {"prompt": it.prompt, "response": outs[i * k + j], "category": it.category,
                           "sample": j, "verdicts": {}}
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()


def _judge_records(records: list[dict], judges: _Judges, names: list[str]) -> bool:
    changed = False
    for name in names:
        todo = [r for r in records if name not in r.get("verdicts", {})]
        if not todo:
            continue
        verdicts = judges.get(name).judge([r["prompt"] for r in todo], [r["response"] for r in todo])
        for r, v in zip(todo, verdicts):
            r.setdefault("verdicts", {})[name] = v.to_dict()
        changed = True
    return changed


def _unsafe(records, name) -> list[bool | None]:
    return [r["verdicts"][name]["unsafe"] for r in records if name in r.get("verdicts", {})]


def suite_metrics(records: list[dict], kind: str, judge_names: list[str], *, chat: bool = True, seed: int = 0,
                  can_fail: set[str] | frozenset = frozenset(), score_judge: str | None = None) -> dict:
    """The metrics of one suite (or one category of it) from judged records."""
    m: dict[str, dict] = {}
    if kind in ("harmful", "benign") or (kind == "toxicity" and chat):
        refused = [None if u is None else not u for u in _unsafe(records, "refusal")]
        if refused:
            m["over_refusal_rate" if kind == "benign" else "refusal_rate"] = proportion(refused)
    if kind in ("harmful", "toxicity"):
        for name in judge_names:
            m[f"asr/{name}"] = proportion(_unsafe(records, name))
    for name in judge_names:
        if name in can_fail:
            flags = [u is None for u in _unsafe(records, name)]
            m[f"parse_failure_rate/{name}"] = proportion(flags)
    if kind == "toxicity" and score_judge:
        groups: dict[str, list[float]] = defaultdict(list)
        for r in records:
            v = r.get("verdicts", {}).get(score_judge)
            if v and v.get("score") is not None:
                groups[r["prompt"]].append(float(v["score"]))
        per_prompt = list(groups.values())
        m["mean_toxicity"] = mean_toxicity(per_prompt, seed=seed)
        m["expected_max_toxicity"] = expected_max_toxicity(per_prompt, seed=seed)
        m["toxicity_probability"] = toxicity_probability(per_prompt)
    return m


def judge_agreement(records_by_suite: dict[str, list[dict]]) -> dict:
    """Pairwise agreement of all judges over every generation both judged."""
    names = sorted({n for recs in records_by_suite.values() for r in recs for n in r.get("verdicts", {})})
    out = {}
    for a, b in itertools.combinations(names, 2):
        xa, xb = [], []
        for recs in records_by_suite.values():
            for r in recs:
                v = r.get("verdicts", {})
                if a in v and b in v:
                    xa.append(v[a]["unsafe"])
                    xb.append(v[b]["unsafe"])
        if xa:
            out[f"{a}~{b}"] = agreement(xa, xb)
    return out


def infer_method(model_name: str | None) -> str | None:
    """The method of a training run whose ``model/`` dir is evaluated (its run's train_summary.json
    or config.yaml), else None."""
    if not model_name or not Path(model_name).expanduser().is_dir():
        return None
    run_dir = Path(model_name).expanduser().resolve().parent
    try:
        summary = run_dir / "train_summary.json"
        if summary.is_file():
            return json.loads(summary.read_text()).get("method")
        cfg = run_dir / "config.yaml"
        if cfg.is_file():
            import yaml

            return ((yaml.safe_load(cfg.read_text()) or {}).get("method") or {}).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return None


def evaluate(
    model,
    tokenizer,
    *,
    suites: list[str],
    judges: list[str | Judge] = ("refusal",),
    out_dir: str | Path,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    max_new_tokens: int = 64,
    k: int = 5,
    batch_size: int = 16,
    decoding: str | None = None,
    judge_opts: dict | None = None,
    utility: list[str] = (),
    utility_n: int | None = None,
    model_name: str | None = None,
    method: str | None = None,
    temperature: float = 1.0,
    top_p: float = RTP_TOP_P,
    chunk_size: int = 64,
    system_prompt: str | None = None,
) -> dict:
    """Evaluate ``model`` on ``suites`` with ``judges``; write generations and results.json.

    ``k``: samples per prompt for toxicity suites (harmful and benign suites get one greedy
    answer). ``judge_opts``: ``{judge: {option: value}}``. ``utility``: any of
    ``perplexity``, ``pubmedqa``, ``gsm8k`` (:mod:`safeft.eval.utility`), on ``utility_n``
    items (default ``n``). Returns the results dict also written to ``results.json``.
    """
    out = Path(out_dir)
    gen_dir = out / "generations"
    gen_dir.mkdir(parents=True, exist_ok=True)
    jset = _Judges(list(judges), judge_opts)
    for name in jset.names:  # fail on a bad judge before generating anything
        jset.get(name)
    loaded = [(name, load_suite(name, data_dir=data_dir, n=n, seed=seed)) for name in suites]
    processor = build_logits_processor(model, tokenizer, decoding)

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("suites", {})
    method = method or results.get("method") or infer_method(model_name)
    results.update(model=model_name or results.get("model"), method=method,
                   decoding=decoding)
    for name, items in loaded:
        key = suite_key(name)
        kind, chat = items[0].kind, items[0].chat
        ks = max(1, int(k)) if kind == "toxicity" else 1
        path = gen_dir / f"{key}.jsonl"
        _generate_suite(model, tokenizer, items, path, k=ks, seed=seed, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, chunk_size=chunk_size, logits_processor=processor,
                        temperature=temperature, top_p=top_p, system_prompt=system_prompt)
        all_records = read_generations(path)
        wanted = {it.prompt for it in items}
        records = [r for r in all_records if r["prompt"] in wanted and int(r.get("sample", 0)) < ks]
        names = jset.for_kind(kind, chat)
        if _judge_records(records, jset, names):
            _write_generations(path, all_records)
        user_names = [nm for nm in names if nm != "refusal" or "refusal" in jset.names]
        can_fail = {nm for nm in names if isinstance(jset.get(nm), LLMJudge)}
        score_judge = next((nm for nm in names if jset.get(nm).scores), None)
        kw = dict(chat=chat, seed=seed, can_fail=can_fail, score_judge=score_judge)
        by_cat: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_cat[r["category"]].append(r)
        results["suites"][key] = {
            "kind": kind,
            "n": len(items),
            "samples_per_prompt": ks,
            "toxicity_judge": score_judge if kind == "toxicity" else None,
            "metrics": suite_metrics(records, kind, user_names, **kw),
            "by_category": {c: suite_metrics(rs, kind, user_names, **kw) for c, rs in sorted(by_cat.items())},
        }
    results["judge_agreement"] = judge_agreement(
        {s: read_generations(gen_dir / f"{s}.jsonl") for s in results["suites"]})
    results["generation"] = {"max_new_tokens": max_new_tokens, "k": k, "seed": seed, "n": n,
                             "toxicity_sampling": {"temperature": temperature, "top_p": top_p}}
    if utility:
        from .utility import run_utility

        results.setdefault("utility", {}).update(run_utility(
            model, tokenizer, list(utility), data_dir=data_dir, n=utility_n or n, seed=seed,
            batch_size=batch_size, out_dir=out))
    results.setdefault("utility", {})
    _atomic_write(results_path, json.dumps(results, indent=2, ensure_ascii=False))
    return results


__all__ = ["evaluate", "infer_method", "judge_agreement", "read_generations", "suite_metrics"]
