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
