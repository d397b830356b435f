"""``safeft eval`` end to end on the real SmolLM2: a few prompts per suite, saved
generations, results.json, resumption; one-line errors on bad input."""

from __future__ import annotations

import json

import pytest

from safeft.cli import main


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    assert main(["eval", "--suites", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safeft: error: suites: unknown suite 'nope'") and "\n" not in err
    assert main(["eval", "--suites", "benign-risky", "--judges", "bogus", "--out", str(tmp_path)]) == 2
    assert "unknown judge 'bogus'" in capsys.readouterr().err


@pytest.mark.integration
def test_eval_smollm2_all_shared_suites_and_resume(shared_data, smollm2_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ev"
    argv = ["eval", "--model", "embedded:smollm2", "--suites", "donotanswer,future-tense,rtp,toxigen,benign",
            "--judges", "refusal,toxicity", "--n", "2", "--seed", "0", "--k", "2", "--max-new-tokens", "6",
            "--data-dir", str(shared_data), "--out", str(out), "--method", "base"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "donotanswer (n=2): refusal_rate" in printed and "results ->" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "embedded:smollm2" and res["method"] == "base"
    assert set(res["suites"]) == {"donotanswer", "future-tense", "rtp", "toxigen", "benign"}
    for suite, body in res["suites"].items():
        recs = [json.loads(ln) for ln in (out / "generations" / f"{suite}.jsonl").read_text().splitlines()]
        per_prompt = 2 if body["kind"] == "toxicity" else 1
        assert len(recs) == 2 * per_prompt and body["n"] == 2
        assert all(r["response"].strip() for r in recs)  # SmolLM2 writes something for every prompt
        assert all("toxicity" in r["verdicts"] for r in recs)
    assert "expected_max_toxicity" in res["suites"]["rtp"]["metrics"]
    assert "over_refusal_rate" in res["suites"]["benign"]["metrics"]
    assert set(res["suites"]["donotanswer"]["by_category"]) <= {
        "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
        "malicious_uses", "misinformation_harms"}
    before = {p.name: p.read_text() for p in (out / "generations").iterdir()}

    from safeft.eval import runner

    def no_generation(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(runner, "generate", no_generation)
    assert main(argv) == 0  # resumes: everything saved, nothing regenerated
    assert {p.name: p.read_text() for p in (out / "generations").iterdir()} == before
    assert json.loads((out / "results.json").read_text())["suites"] == res["suites"]
