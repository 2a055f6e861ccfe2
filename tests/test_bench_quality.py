"""The quality benchmark's harness runs end to end on a tiny random model with a tiny
character-level tokenizer (2 passkey cells, streaming PPL over ~50 tokens), resumes from its cell
cache, and skips the kvpress side by side when its virtualenv is missing."""
import json
import pathlib
import sys

import pytest

from helpers import load_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def load_quality():
    return load_bench("quality")


def tiny_tokenizer(path: pathlib.Path):
    """One token per character (printable ASCII + newline) plus chat specials: 99 ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers import make_checkpoint

    d = make_checkpoint(tmp_path_factory.mktemp("tiny-quality"), "llama", seed=0,
                        max_position_embeddings=1024)
    tiny_tokenizer(d)
    return d


def test_tiny_quality_grid(tiny_dir, tmp_path, capsys):
    q = load_quality()
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--device", "cpu", "--compile", "off",
            "--suites", "passkey,ppl,kvpress", "--policies", "h2o", "--vam-variants", "",
            "--lengths", "420", "--depths", "0.5", "--budgets", "48", "--keys", "1",
            "--haystacks", "classic", "--max-new-tokens", "3",
            "--text", str(text), "--ppl-prompt", "8", "--ppl-tokens", "50", "--ppl-budgets", "48",
            "--kvpress-venv", str(tmp_path / "no-venv"), "--no-kvpress-setup",
            "--out", str(out), "--name", "tiny"]
    assert q.main(argv) == 0
    data = json.loads((out / "tiny.json").read_text())
    for key in ("command", "commit", "device", "torch", "wall_s"):
        assert key in data["meta"]
    assert data["policies"] == ["full", "h2o"]
    cells = data["results"]["passkey"]["cells"]
    assert {(c["policy"], c["budget"]) for c in cells} == {("full", None), ("h2o", 48)}
    for c in cells:
        assert c["correct"] in (True, False) and abs(c["prompt_len"] - 420) <= 20
        assert len(c["answer"]) == 5 and c["answer"].isdigit()
    ppl = data["results"]["ppl"]["cells"]
    assert {(c["policy"], c["budget"]) for c in ppl} == {("full", None), ("h2o", 48)}
    for c in ppl:
        assert c["tokens"] == 50 and 1 < c["ppl"] < 1e4
    h2o = next(c for c in cells if c["policy"] == "h2o")
    assert h2o["retained"] <= 48 + 1
    # no kvpress venv and no setup: the side by side is skipped, with a note
    assert "kvpress" not in data["results"]
    assert any("kvpress side by side skipped" in n for n in data["notes"])
    md = (out / "tiny.md").read_text()
    assert "## Passkey retrieval" in md and "## Streaming perplexity" in md and "| h2o |" in md
    assert data["meta"]["cells_computed"] == 4
    pngs = {p.name for p in out.glob("*.png")}
    from quality_suites.report import _plt

    if _plt() is not None:
        assert {"tiny_ppl.png", "tiny_heatmap_h2o.png", "tiny_heatmap_full.png"} <= pngs
    # resume: the same grid again computes nothing
    assert q.main(argv) == 0
    again = json.loads((out / "tiny.json").read_text())
    assert again["meta"]["cells_computed"] == 0 and again["meta"]["cells_cached"] == 4
    assert [c["ppl"] for c in again["results"]["ppl"]["cells"]] == [c["ppl"] for c in ppl]


def test_question_start_and_prose(tiny_dir):
    import transformers

    from flexkv.passkey import QUESTION, build_passkey_prompt

    sys.path.insert(0, str(ROOT / "bench"))
    import kvpress_side as ks

    load_quality()
    from quality_suites.common import pydoc_prose

    prose = pydoc_prose(no_digits=True)
    assert len(prose) > 20000 and not any(ch.isdigit() for ch in prose)
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    ids, _ = build_passkey_prompt(tok, 400, 0.3, "12345", filler=prose)
    ids = ids[0].tolist()
    n = ks.question_start(tok, ids)
    assert tok.decode(ids[n:]).lstrip("\n").startswith(QUESTION)
    assert QUESTION not in tok.decode(ids[:n])
    assert ks.ensure_venv(pathlib.Path("/nonexistent/venv"), setup=False) is None


def test_bad_arguments():
    q = load_quality()
    with pytest.raises(SystemExit):
        q.main(["--suites", "nope"])
    with pytest.raises(SystemExit):
        q.main(["--depths", "0.5,1.5"])


def test_vam_sweep_alpha_zero_is_the_base(tiny_dir, tmp_path):
    from flexkv.policies import available

    if "<policy>+vam" not in available():
        pytest.skip("the vam modifier is not registered")
    q = load_quality()
    text = tmp_path / "text.txt"
    text.write_text("Pack my box with five dozen liquor jugs. " * 3)
    out = tmp_path / "out"
    assert q.main(["--model", str(tiny_dir), "--device", "cpu", "--compile", "off",
                   "--suites", "ppl,vam-stream", "--policies", "full", "--ppl-policies", "streaming",
                   "--vam-variants", "", "--vam-stream-bases", "h2o", "--alphas", "0,0.35",
                   "--budgets", "24", "--ppl-budgets", "24", "--text", str(text), "--ppl-prompt", "8",
                   "--ppl-tokens", "30", "--out", str(out), "--name", "vam"]) == 0
    data = json.loads((out / "vam.json").read_text())
    assert [c["policy"] for c in data["results"]["ppl"]["cells"]] == ["full", "streaming"]
    cells = data["results"]["vam-stream"]["cells"]
    by = {(c["policy"], c["alpha"]): c["ppl"] for c in cells}
    assert by[("h2o+vam", 0.0)] == pytest.approx(by[("h2o", None)], rel=1e-6)
    assert by[("h2o+vam", 0.35)] != pytest.approx(by[("h2o", None)], rel=1e-6)
    assert "Sanity check, alpha = 0 vs the base policy: h2o@24: equal" in (out / "vam.md").read_text()


def test_streaming_ppl_is_the_teacher_forced_nll(tiny_dir, tmp_path):
    """The alignment every PPL number rests on: `full`'s streaming PPL through `forced_tokens`
    (one decode step per token) equals exp of the mean NLL of one plain teacher-forced forward
    of transformers' model over the same ids (the logit at i predicts token i + 1)."""
    import math

    import torch
    import transformers

    q = load_quality()
    text = tmp_path / "text.txt"
    text.write_text("Sphinx of black quartz, judge my vow. " * 4)
    out = tmp_path / "out"
    P, N = 12, 60
    assert q.main(["--model", str(tiny_dir), "--device", "cpu", "--compile", "off",
                   "--suites", "ppl", "--policies", "full", "--text", str(text),
                   "--ppl-prompt", str(P), "--ppl-tokens", str(N), "--out", str(out),
                   "--name", "align"]) == 0
    cell = json.loads((out / "align.json").read_text())["results"]["ppl"]["cells"][0]
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    ids = torch.tensor([tok(text.read_text(), add_special_tokens=False)["input_ids"][:P + N]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(ids).logits[0, P - 1:-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, P:], reduction="none")
    assert cell["tokens"] == N
    assert math.log(cell["ppl"]) == pytest.approx(float(nll.mean()), rel=1e-5, abs=1e-6)
    # and the per-block curve is the same NLL, block by block
    assert cell["nll_curve"][0] == pytest.approx(float(nll[:64].mean()), abs=1e-4)


def test_tiny_ruler_fidelity_vam_grid(tiny_dir, tmp_path, ruler_wheel, monkeypatch):
    """The ruler, fidelity and vam suites end to end on the tiny model (RULER's real data through
    a character-level tokenizer): full first, compression only on the tasks full can do (here
    --ruler-min-full 0 keeps every task), ratios -> budgets, KL(full || full) = 0, resume."""
    monkeypatch.setenv("FLEXKV_RULER_WHEEL", str(ruler_wheel))
    q = load_quality()
    text = tmp_path / "text.txt"
    text.write_text("How vexingly quick daft zebras jump! " * 4)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--device", "cpu", "--compile", "off", "--preset", "quick",
            "--suites", "ruler,fidelity,vam", "--policies", "snapkv", "--ruler-lengths", "900",
            "--ruler-tasks", "niah_single_1,niah_multikey_1", "--ruler-samples", "1",
            "--ruler-ratios", "0.5", "--ruler-budgets", "64", "--ruler-min-full", "0",
            "--ruler-max-new", "4", "--fid-prefix", "96", "--fid-tokens", "24",
            "--vam-bases", "full,snapkv", "--vam-ratios", "0.5", "--alphas", "0,0.35",
            "--text", str(text), "--out", str(out), "--name", "tiny"]
    from quality_suites import fidelity

    full_passes = []
    forward = fidelity.forward
    monkeypatch.setattr(fidelity, "forward", lambda r, texts, policy, *a, **k: (
        full_passes.append(policy) if policy == "full" else None) or forward(r, texts, policy, *a, **k))
    assert q.main(argv) == 0
    assert full_passes == ["full"]   # one reference pass, shared by the fidelity and vam suites
    data = json.loads((out / "tiny.json").read_text())
    cells = data["results"]["ruler"]["cells"]
    assert {(c["policy"], tuple(c["comp"] or ()), c["task"]) for c in cells} == {
        (p, comp, t) for t in ("niah_single_1", "niah_multikey_1")
        for p, comp in [("full", ()), ("snapkv", ("ratio", 0.5)), ("snapkv", ("budget", 64))]}
    for c in cells:
        assert 0 <= c["score"] <= 1 and 800 <= c["prompt_len"] <= 900
        if c["comp"] == ["ratio", 0.5]:
            assert c["budget_tokens"] == round(c["prompt_len"] / 2)
        if c["policy"] == "snapkv":
            assert c["retained"] <= c["budget_tokens"] + 4    # + the decoded tokens
    fid = {(c["policy"], tuple(c["comp"] or ())): c for c in data["results"]["fidelity"]["cells"]}
    assert fid[("full", ())]["kl"] == 0 and fid[("full", ())]["top1"] == 1
    comp = fid[("snapkv", ("ratio", 0.5))]
    assert comp["kl"] > 0 and comp["budget_tokens"] == 48 and comp["ppl"] > 1
    # 24 tokens in 16 stretches (2 and 1 tokens): their token-weighted mean is the KL
    assert len(comp["kl_curve"]) == 16
    assert sum(x * (2 if i < 8 else 1) for i, x in enumerate(comp["kl_curve"])) / 24 == \
        pytest.approx(comp["kl"], rel=1e-4)
    vam = {(c["base"], c["alpha"]): c for c in data["results"]["vam"]["cells"]}
    assert set(vam) == {(b, a) for b in ("full", "snapkv") for a in (None, 0.0, 0.35)}
    for b in ("full", "snapkv"):       # alpha = 0 is the base, on both metrics
        assert vam[(b, 0.0)]["nll"] == pytest.approx(vam[(b, None)]["nll"], rel=1e-6)
        assert vam[(b, 0.0)]["ruler"] == vam[(b, None)]["ruler"]
    assert vam[("snapkv", 0.35)]["nll"] != pytest.approx(vam[("snapkv", None)]["nll"], rel=1e-6)
    md = (out / "tiny.md").read_text()
    for head in ("## Summary", "## RULER", "## Fidelity to the full cache",
                 "## VAM in its paper's regime"):
        assert head in md
    row = next(l for l in md.splitlines() if l.startswith("| snapkv |"))   # the summary's row
    assert row.count("|") == 1 + 4 and f"{comp['kl']:.4f}" in row     # RULER, KL, top-1
    assert "Sanity check, alpha = 0 vs the base (continuation NLL): full: equal; snapkv: equal" in md
    # resume: nothing recomputed
    assert q.main(argv) == 0
    assert json.loads((out / "tiny.json").read_text())["meta"]["cells_computed"] == 0


def test_kvpress_ruler_question_split_and_report(tiny_dir, tmp_path, ruler_wheel, monkeypatch,
                                                 default_model_dir):
    """The kvpress-ruler suite: kvpress's context/question split of a RULER prompt falls at
    `Sample.question_start`; without kvpress's virtualenv the suite is skipped with a note; its
    report averages per task and counts same scores."""
    import transformers

    from flexkv import ruler

    monkeypatch.setenv("FLEXKV_RULER_WHEEL", str(ruler_wheel))
    sys.path.insert(0, str(ROOT / "bench"))
    import kvpress_side as ks

    q = load_quality()
    from quality_suites import kvpress_ruler

    # the default model's tokenizer (byte-level BPE: decoding gives the text back, which the split
    # relies on; the tiny character-level one maps unknown characters to <unk>)
    tok = transformers.AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)
    for task in ("niah_single_2", "vt", "qa_1"):
        s = ruler.make_sample(task, tok, 1024, 0)
        ids = tok(s.input + s.answer_prefix, add_special_tokens=False)["input_ids"]
        n = ks.question_start(tok, ids, at=s.question_start)
        assert tok.decode(ids[:n]) == s.input[:s.question_start]
        assert tok.decode(ids[n:]) == s.input[s.question_start:] + s.answer_prefix

    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--device", "cpu", "--compile", "off", "--preset", "quick",
            "--suites", "kvpress-ruler", "--policies", "snapkv", "--ruler-lengths", "900",
            "--ruler-tasks", "niah_single_1", "--ruler-samples", "1", "--ruler-ratios", "0.5",
            "--ruler-min-full", "0", "--ruler-max-new", "4", "--kvpress-venv",
            str(tmp_path / "no-venv"), "--no-kvpress-setup", "--out", str(out), "--name", "kr"]
    assert q.main(argv) == 0
    assert "kvpress RULER side by side skipped" in (out / "kr.md").read_text()

    cell = dict(length=900, index=0)
    res = dict(
        flexkv=[dict(cell, policy="full", comp=None, task="a", score=1.0),
                dict(cell, policy="full", comp=None, task="b", score=0.5),
                dict(cell, policy="snapkv", comp=["ratio", 0.5], task="a", score=1.0),
                dict(cell, policy="snapkv", comp=["ratio", 0.5], task="b", score=0.0)],
        kvpress=[dict(cell, policy="full", press="none", mode="whole", comp=None, task="a",
                      score=1.0),
                 dict(cell, policy="full", press="none", mode="whole", comp=None, task="b",
                      score=0.5),
                 dict(cell, policy="snapkv", press="SnapKVPress", mode="whole",
                      comp=["ratio", 0.5], task="a", score=0.0),
                 dict(cell, policy="snapkv", press="SnapKVPress", mode="whole",
                      comp=["ratio", 0.5], task="b", score=0.0),
                 dict(cell, policy="snapkv", press="SnapKVPress", mode="question",
                      comp=["ratio", 0.5], task="a", score=1.0)],
        venv="v", kvpress_version="0.5.5", modes=ks.MODE_DOC,
        press_params={"snapkv": ks.press_params("SnapKVPress")},
        flex_params={"snapkv": ks.flex_params("snapkv")}, wall_s=1.0)
    lines, _ = kvpress_ruler.section(res, dict(ruler_lengths=[900], ruler_ratios=[0.5]),
                                     ["full", "snapkv"], {}, tmp_path, "kr")
    table = [ln for block in lines for ln in block.split("\n")
             if ln.startswith("| full") or ln.startswith("| snapkv")]
    assert table == ["| full | none | - | 2 | 0.75 | 0.75 | - | 2/2 |",
                     "| snapkv | SnapKVPress | 0.5 | 2 | 0.50 | 0.00 | 1.00 | 1/2 |"]


def test_cell_keys_name_prefill_only_only_when_set():
    """The cell cache's keys hold every resolved parameter; `prefill_only` enters only when set,
    so the cells cached before it existed (which all ran without it) keep their keys."""
    load_quality()
    from quality_suites.common import prefill_only, resolved_params

    plain = resolved_params("h2o+vam", 64)
    assert "h2o.prefill_only" not in plain and "h2o.recent" in plain and "vam.alpha" in plain
    assert resolved_params("h2o+vam", 64, {"prefill_only": True})["h2o.prefill_only"] is True
    assert not prefill_only("h2o") and prefill_only("snapkv") and not prefill_only("full")


def test_rerender_a_committed_report_from_its_json(tmp_path):
    """`--rerender JSON` writes the report again from the cells its JSON holds, with no model:
    every line of the committed report comes back in order (the header line aside, which gains
    the re-rendering's command and commit), now with the resolution tables."""
    import shutil
    quality = load_quality()
    src = ROOT / "bench" / "results" / "quality" / "cpu-ruler-ratios.json"
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    assert quality.main(["--rerender", str(dst)]) == 0
    old = src.with_suffix(".md").read_text().splitlines()
    new = dst.with_suffix(".md").read_text().splitlines()
    assert new[:3] == old[:3]                                # title, command
    run = old[3].split("; re-rendered")[0]                   # the run's own stamp, kept
    assert new[3].startswith(run + "; re-rendered from its JSON") and str(dst) in new[3]
    it = iter(new[4:])
    missing = [line for line in old[4:] if not any(line == x for x in it)]
    assert missing == []
    assert any(line.startswith("How far these scores are resolved at compression 0.5") for line in new)
    assert json.loads(dst.read_text())["meta"]["rerendered"]["command"].endswith(str(dst))
    with pytest.raises(SystemExit):
        quality.main(["--rerender", str(tmp_path / "nothing.json")])
