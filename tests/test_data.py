"""SSD data phase: loading prompts, formatting them, the filter, samples.jsonl, resuming, ranks, and bad input."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ssd

REPO = Path(__file__).resolve().parent.parent
GENERATION_PROMPT = "<|im_start|>assistant\n"

# One sampling command shared by the reference run, the resumed runs and the two-rank run (plus --output_dir).
SAMPLE_FLAGS = ["--prompt_column", "messages", "--max_prompts", "16", "--num_samples", "2",
                "--max_completion_length", "24", "--generation_batch_size", "3", "--seed", "7", "--sample_only"]


def sample_argv(tiny_model_dir, prompts_path, out, *extra) -> list:
    return ["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(prompts_path),
            *SAMPLE_FLAGS, "--output_dir", str(out), *extra]


def rows(prompts_path) -> list:
    return [json.loads(line) for line in Path(prompts_path).read_text().splitlines()]


def read_samples(out: Path) -> list:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def cli(argv, *, torchrun: int = 0, timeout: int = 300, env=None):
    launcher = [sys.executable]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", f"--master_port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(launcher + ["ssd.py"] + argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, prompts_path, tmp_path_factory) -> Path:
    """An uninterrupted one-process sampling run of SAMPLE_FLAGS."""
    out = tmp_path_factory.mktemp("reference") / "out"
    ssd.main(sample_argv(tiny_model_dir, prompts_path, out))
    return out


# ---------------------------------------------------------------- loading prompts -------------------------------------

@pytest.fixture(scope="module")
def dataset_copies(prompts_path, tmp_path_factory) -> dict:
    """The 48 prompts in every local format load_prompts reads."""
    import datasets
    tmp = tmp_path_factory.mktemp("formats")
    data = rows(prompts_path)
    ds = datasets.Dataset.from_list(data)
    (tmp / "p.json").write_text(json.dumps(data))  # one JSON array
    ds.to_parquet(str(tmp / "p.parquet"))
    ds.remove_columns("messages").to_csv(str(tmp / "p.csv"), index=False)  # CSV has no list column
    ds.save_to_disk(str(tmp / "dataset"))
    datasets.DatasetDict({"train": ds.select(range(5)), "test": ds}).save_to_disk(str(tmp / "dataset_dict"))
    return {"jsonl": prompts_path, "json": tmp / "p.json", "parquet": tmp / "p.parquet", "csv": tmp / "p.csv",
            "dataset": tmp / "dataset", "dataset_dict": tmp / "dataset_dict"}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "dataset", "dataset_dict"])
@pytest.mark.parametrize("column", ["prompt", "messages"])
def test_local_formats_load_the_same_prompts(fmt, column, dataset_copies, prompts_path):
    if fmt == "csv" and column == "messages":
        pytest.skip("CSV holds no chat-message lists")
    data = rows(prompts_path)
    split = ["--dataset_split", "test"] if fmt == "dataset_dict" else []
    cfg = ssd.parse_args(["--dataset_path", str(dataset_copies[fmt]), "--prompt_column", column] + split)
    assert ssd.load_prompts(cfg) == [r[column] for r in data]
    assert ssd.load_prompts(dataclasses.replace(cfg, max_prompts=7)) == [r[column] for r in data[:7]]
    assert ssd.load_prompts(dataclasses.replace(cfg, max_prompts=1000)) == [r[column] for r in data]


def test_dataset_dict_split(dataset_copies, prompts_path):
    cfg = ssd.parse_args(["--dataset_path", str(dataset_copies["dataset_dict"]), "--prompt_column", "prompt"])
    assert ssd.load_prompts(cfg) == [r["prompt"] for r in rows(prompts_path)[:5]]  # --dataset_split train
    with pytest.raises(ssd.SSDError, match=r"splits \['train', 'test'\].*--dataset_split"):
        ssd.load_prompts(dataclasses.replace(cfg, dataset_split="validation"))


def test_empty_prompts_keep_their_row_index(tmp_path):
    path = tmp_path / "p.jsonl"
    data = [{"q": "first"}, {"q": ""}, {"q": "   \n"}, {"q": "fourth"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    assert ssd.load_prompts(ssd.parse_args(["--dataset_path", str(path), "--prompt_column", "q"])) == \
        ["first", None, None, "fourth"]


# ---------------------------------------------------------------- formatting prompts ----------------------------------

def test_chat_format_ends_with_the_generation_prompt(tokenizer, prompts_path):
    cfg = ssd.Config(prompt_format="chat")
    tail = tokenizer(GENERATION_PROMPT, add_special_tokens=False).input_ids
    for r in rows(prompts_path)[:8]:
        for prompt in (r["prompt"], r["messages"]):
            ids, cut = ssd.format_prompt(prompt, tokenizer, cfg)
            assert not cut and ids[-len(tail):] == tail
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    with_system = next(r["messages"] for r in rows(prompts_path) if len(r["messages"]) == 2)
    text = tokenizer.decode(ssd.format_prompt(with_system, tokenizer, cfg)[0])
    assert text.startswith("<|im_start|>system\n" + with_system[0]["content"])


def test_raw_format_starts_with_the_instruction(tokenizer, prompts_path):
    cfg = ssd.Config(prompt_format="raw")
    r = next(r for r in rows(prompts_path) if len(r["messages"]) == 2)
    ids, cut = ssd.format_prompt(r["prompt"], tokenizer, cfg)
    assert not cut and tokenizer.decode(ids) == ssd.RAW_INSTRUCTION + r["prompt"]
    text = tokenizer.decode(ssd.format_prompt(r["messages"], tokenizer, cfg)[0])  # messages: their contents
    assert text == ssd.RAW_INSTRUCTION + "\n\n".join(m["content"] for m in r["messages"])
    assert "<|im_start|>" not in text


def test_chat_template_kwargs_reach_the_template(tokenizer):
    tok = type(tokenizer).from_pretrained(REPO / "tests" / "assets" / "tiny-qwen3")
    # Qwen3's switch: a template that honours enable_thinking=false with an empty think block
    tok.chat_template = tokenizer.chat_template + ("{%- if add_generation_prompt and enable_thinking is defined and "
                                                   "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")
    plain = tok.decode(ssd.format_prompt("hi", tok, ssd.Config())[0])
    off = tok.decode(ssd.format_prompt("hi", tok, ssd.Config(chat_template_kwargs='{"enable_thinking": false}'))[0])
    assert plain.endswith(GENERATION_PROMPT) and off == plain + "<think>\n\n</think>\n\n"


def test_long_prompts_are_cut_from_the_left(tokenizer, prompts_path):
    prompt = rows(prompts_path)[2]["prompt"]
    full, cut = ssd.format_prompt(prompt, tokenizer, ssd.Config())
    assert not cut and len(full) > 20
    for fmt in ("chat", "raw"):
        full = ssd.format_prompt(prompt, tokenizer, ssd.Config(prompt_format=fmt))[0]
        ids, cut = ssd.format_prompt(prompt, tokenizer, ssd.Config(prompt_format=fmt, max_prompt_length=12))
        assert cut and ids == full[-12:]  # the end, with the chat template's generation prompt, survives
        assert ssd.format_prompt(prompt, tokenizer, ssd.Config(prompt_format=fmt, max_prompt_length=len(full))) == \
            (full, False)


def test_samples_record_cut_prompts(tiny_model_dir, prompts_path, tmp_path, tokenizer, capsys):
    full = [ssd.format_prompt(r["prompt"], tokenizer, ssd.Config())[0] for r in rows(prompts_path)[:6]]
    limit = sorted(map(len, full))[2]  # some prompts are cut, some are not
    expected = [len(ids) > limit for ids in full]
    assert 0 < sum(expected) < 6
    out = tmp_path / "out"
    ssd.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(prompts_path), "--prompt_column",
              "prompt", "--max_prompts", "6", "--num_samples", "1", "--max_completion_length", "4",
              "--max_prompt_length", str(limit), "--output_dir", str(out), "--sample_only"])
    records = read_samples(out)
    assert [r["prompt_cut"] for r in records] == expected
    tail = tokenizer(GENERATION_PROMPT, add_special_tokens=False).input_ids
    for r, ids in zip(records, full):
        assert r["prompt_ids"] == ids[-limit:] and r["prompt_tokens"] == min(len(ids), limit)
        assert r["prompt_ids"][-len(tail):] == tail
    assert f"| {sum(expected)} prompts cut from the left |" in capsys.readouterr().out


def test_report_counts_cut_prompts_once(capsys):
    records = [{"prompt_index": i, "sample_index": j, "keep": True, "drop_reason": None, "stop": "eos",
                "prompt_cut": i == 0, "completion_tokens": 5} for i in range(2) for j in range(3)]
    ssd.report_samples(records, 0)
    assert "| 1 prompts cut from the left |" in capsys.readouterr().out


def test_report_gives_the_share_of_tokens_from_length_capped_samples(capsys):
    """Three of four samples end with an end token; the capped one has 60 of the 90 completion tokens."""
    records = [{"prompt_index": i, "sample_index": 0, "keep": i != 1, "drop_reason": None if i != 1 else "stub",
                "stop": "length" if i == 3 else "eos", "prompt_cut": False, "completion_tokens": n}
               for i, n in enumerate([10, 5, 15, 60])]
    ssd.report_samples(records, 0)
    out = capsys.readouterr().out
    assert "length-capped (no end token): 1 samples, 66.7% of all completion tokens, 70.6% of the kept ones" in out


def test_drop_truncated_drops_length_capped_samples():
    records = [{"completion": "print(1)\nprint(2)", "stop": stop} for stop in ("eos", "length", "eos", "length")]
    records.append({"completion": "", "stop": "length"})  # a stub is reported as a stub
    assert [r["keep"] for r in ssd.apply_filters(records, ssd.Config())] == [True] * 4 + [False]
    result = ssd.apply_filters(records, ssd.Config(drop_truncated=True))
    assert [r["drop_reason"] for r in result] == [None, "truncated", None, "truncated", "stub"]
    assert [r["keep"] for r in result] == [True, False, True, False, False]
    assert ssd.Config().drop_truncated is False  # the paper trains on truncated samples too


def test_drop_truncated_in_a_run(tiny_model_dir, prompts_path, tmp_path):
    """max_completion_length 6: most random completions hit the cap; none of them is kept."""
    out = tmp_path / "out"
    ssd.main(sample_argv(tiny_model_dir, prompts_path, out, "--max_completion_length", "6", "--drop_truncated",
                         "--no-filter_empty", "--sample_only", "--max_prompts", "8"))
    records = read_samples(out)
    assert sum(r["stop"] == "length" for r in records) >= 4
    assert all(r["keep"] == (r["stop"] == "eos") for r in records)


# ---------------------------------------------------------------- the filter ------------------------------------------

@pytest.mark.parametrize("text, stub", [
    ("", True), ("   ", True), ("\n\n\t", True), ("x = 1", True), ("  print(1)  \n", True),
    ("print(1)\nprint(2)", False),  # several short lines are a program
    ("print(12345)", False), ("return 42;", False),  # 10 characters
    ("123456789", True),  # 9 characters
])
def test_is_stub(text, stub):
    assert ssd.is_stub(text) is stub


def test_apply_filters(prompts_path):
    def records(texts):
        return [{"completion": t, "keep": "stale", "drop_reason": "stale"} for t in texts]

    texts = ["", "x = 1", "a" * 30, "b" * 12, "c" * 12, "d" * 20, "print(1)\nprint(2)", "e" * 12]
    result = ssd.apply_filters(records(texts), ssd.Config())
    assert [(r["keep"], r["drop_reason"]) for r in result] == \
        [(False, "stub"), (False, "stub")] + [(True, None)] * 6

    # drop_shortest: a fraction of the kept completions, shortest first, ties broken by record order
    result = ssd.apply_filters(records(texts), ssd.Config(drop_shortest=0.5))
    assert [r["drop_reason"] for r in result] == ["stub", "stub", None, "shortest", "shortest", None, None,
                                                  "shortest"]
    assert [r["keep"] for r in result] == [False, False, True, False, False, True, True, False]
    assert ssd.apply_filters(records(texts), ssd.Config(drop_shortest=0.5)) == result  # deterministic
    result = ssd.apply_filters(records(texts), ssd.Config(drop_shortest=0.2))  # int(6 * 0.2) = 1
    assert [r["drop_reason"] for r in result].count("shortest") == 1 and result[3]["drop_reason"] == "shortest"

    # filter_empty off keeps the stubs (and they are then the shortest)
    result = ssd.apply_filters(records(texts), ssd.Config(filter_empty=False))
    assert all(r["keep"] and r["drop_reason"] is None for r in result)
    result = ssd.apply_filters(records(texts), ssd.Config(filter_empty=False, drop_shortest=0.25))
    assert [r["drop_reason"] for r in result[:2]] == ["shortest", "shortest"]


# ---------------------------------------------------------------- samples.jsonl ---------------------------------------

def test_samples_schema(reference_run, tokenizer, prompts_path):
    records = read_samples(reference_run)
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(i, j) for i in range(16) for j in range(2)]
    types = {"prompt_index": int, "sample_index": int, "prompt": str, "completion": str, "prompt_ids": list,
             "completion_ids": list, "prompt_tokens": int, "completion_tokens": int, "stop": str, "prompt_cut": bool,
             "keep": bool}
    assert set(types) | {"drop_reason"} == set(ssd.SAMPLE_FIELDS)
    end_ids = {2045, 2047}
    data = rows(prompts_path)
    for r in records:
        assert tuple(r) == ssd.SAMPLE_FIELDS
        for field, kind in types.items():
            assert type(r[field]) is kind, (field, r[field])
        assert all(type(t) is int for t in r["prompt_ids"] + r["completion_ids"])
        assert r["prompt_ids"] == ssd.format_prompt(data[r["prompt_index"]]["messages"], tokenizer, ssd.Config())[0]
        assert r["prompt"] == tokenizer.decode(r["prompt_ids"])
        assert r["completion"] == tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
        assert (r["prompt_tokens"], r["completion_tokens"]) == (len(r["prompt_ids"]), len(r["completion_ids"]))
        assert r["stop"] in ("eos", "length") and r["prompt_cut"] is False
        if r["stop"] == "eos":
            assert r["completion_ids"][-1] in end_ids and not end_ids & set(r["completion_ids"][:-1])
        else:
            assert r["completion_tokens"] == 24 and not end_ids & set(r["completion_ids"])
        assert r["drop_reason"] == (None if r["keep"] else "stub")
        assert r["keep"] is not ssd.is_stub(r["completion"])
    assert len({r["completion"] for r in records}) > len(records) // 2  # samples of one prompt differ
    assert not list(reference_run.glob("samples-part*"))


def test_rerun_reads_the_samples_and_may_change_resumable_settings(reference_run, tiny_model_dir, prompts_path,
                                                                  tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    before = (out / "samples.jsonl").read_bytes()
    monkeypatch.setattr(ssd, "load_model", lambda *a, **k: pytest.fail("the samples are already there"))
    ssd.main(sample_argv(tiny_model_dir, prompts_path, out, "--generation_batch_size", "5", "--cache_tokens",
                         "1000"))
    assert (out / "samples.jsonl").read_bytes() == before


# ---------------------------------------------------------------- resuming and ranks ----------------------------------

def test_kill_and_resume_gives_the_same_samples(reference_run, tiny_model_dir, prompts_path, tmp_path, capsys):
    """Needs the batch-invariant kernels: a resumed run decodes the remaining prompts in other batches."""
    killed, torn = tmp_path / "killed", tmp_path / "torn"
    argv = sample_argv(tiny_model_dir, prompts_path, killed)
    part = killed / "samples-part0-of-1.jsonl"
    proc = subprocess.Popen([sys.executable, "ssd.py"] + argv, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and (not part.exists() or part.read_text().count("\n") < 4):
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {stderr[-2000:]}"
    lines = part.read_text().splitlines(keepends=True)
    assert 4 <= len(lines) < 32 and not (killed / "samples.jsonl").exists()

    # A copy whose part file ends in a half-written record, as a kill in the middle of a write leaves it.
    shutil.copytree(killed, torn)
    torn_part = torn / part.name
    torn_part.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    assert not torn_part.read_text().endswith(("}", "\n"))

    capsys.readouterr()
    ssd.main(argv)  # the same command resumes (in this process, to save a start-up)
    assert re.search(r"sampling \d+ prompts x 2 \([1-9]\d* done\)", capsys.readouterr().out)  # it resumed
    ssd.main(sample_argv(tiny_model_dir, prompts_path, torn, "--generation_batch_size", "5"))  # a resumable change
    expected = (reference_run / "samples.jsonl").read_bytes()
    assert (killed / "samples.jsonl").read_bytes() == expected
    assert (torn / "samples.jsonl").read_bytes() == expected
    assert not list(killed.glob("samples-part*")) and not list(torn.glob("samples-part*"))


def test_read_jsonl_ignores_a_torn_line_ending_in_a_brace(tmp_path):
    path = tmp_path / "part.jsonl"
    whole = json.dumps({"prompt_index": 0, "completion": "d = {}"})
    path.write_text(whole + "\n" + whole[: whole.index("}") + 1])  # cut right after the brace inside the string
    assert ssd.read_jsonl(path) == [json.loads(whole)]


@pytest.mark.slow
def test_two_ranks_give_the_same_samples_as_one(reference_run, tiny_model_dir, prompts_path, tmp_path):
    out = tmp_path / "two"
    result = cli(sample_argv(tiny_model_dir, prompts_path, out), torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "samples.jsonl").read_bytes() == (reference_run / "samples.jsonl").read_bytes()
    assert not list(out.glob("samples-part*"))


# ---------------------------------------------------------------- bad input -------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Every error below must come before any model is loaded."""
    import datasets
    datasets.disable_progress_bars()  # its "Generating train split" bar is not part of ssd's message
    monkeypatch.setattr(ssd, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error"))
    yield
    datasets.enable_progress_bars()


def expect_error(argv, capsys, match: str, sampled: bool = False):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ssd.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    if sampled:  # after the sampler's progress bar
        lines = lines[-1:]
        assert captured.err.count("error:") == 1, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(match, lines[0]), lines[0]
    assert ("sampling" in captured.out) is sampled
    return lines[0]


def run_argv(tiny_model_dir, dataset, out, *extra):
    return ["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(dataset), "--prompt_column", "prompt",
            "--max_completion_length", "8", "--max_steps", "1", "--output_dir", str(out), *extra]


@pytest.mark.parametrize("extra, match", [
    (["--prompt_column", "question"], r"no column 'question'.*\['id', 'prompt', 'messages'\]"),
    (["--drop_shortest", "1.0"], r"--drop_shortest"),
    (["--drop_shortest", "-0.1"], r"--drop_shortest"),
    (["--prompt_format", "markdown"], r"--prompt_format"),
    (["--chat_template_kwargs", "{enable_thinking: false}"], r"--chat_template_kwargs must be a JSON object"),
    (["--chat_template_kwargs", "[1]"], r"--chat_template_kwargs must be a JSON object"),
    (["--max_completion_length", "2040"], r"longest prompt \(\d+ tokens\) \+ --max_completion_length \(2040\) "
                                          r"exceeds the model's max_position_embeddings \(2048\)"),
    (["--cache_tokens", "200"], r"--cache_tokens 200 holds no sequence of \d+ prompt \+ 8 new tokens \(1 blocks "
                                r"of 256\); raise --cache_tokens to at least 256"),
])
def test_bad_settings(extra, match, tiny_model_dir, prompts_path, tmp_path, capsys, no_model):
    expect_error(run_argv(tiny_model_dir, prompts_path, tmp_path / "out", *extra), capsys, match)


@pytest.mark.parametrize("name, content, match", [
    ("empty_prompts.jsonl", '{"prompt": ""}\n{"prompt": "  "}\n', r"no non-empty prompt in column 'prompt'"),
    ("absent.jsonl", None, r"does not exist"),
    ("absent_folder", None, r"expected a \.jsonl/\.json/\.parquet/\.csv file or a save_to_disk folder"),
    ("prompts.txt", "Write a function.\n", r"expected a \.jsonl/\.json/\.parquet/\.csv file"),
])
def test_bad_datasets(name, content, match, tiny_model_dir, tmp_path, capsys, no_model):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    expect_error(run_argv(tiny_model_dir, path, tmp_path / "out"), capsys, match)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "folder"])
def test_empty_dataset(fmt, tiny_model_dir, tmp_path, capsys, no_model):
    import datasets
    empty = datasets.Dataset.from_dict({"prompt": []}, features=datasets.Features({"prompt": datasets.Value("string")}))
    path = tmp_path / (f"empty.{fmt}" if fmt != "folder" else "empty")
    {"jsonl": lambda: path.write_text(""), "json": lambda: path.write_text("[]"),
     "csv": lambda: path.write_text("prompt\n"), "parquet": lambda: empty.to_parquet(str(path)),
     "folder": lambda: empty.save_to_disk(str(path))}[fmt]()
    expect_error(run_argv(tiny_model_dir, path, tmp_path / "out"), capsys, r"--dataset_path|no non-empty prompt")


def test_output_dir_guard(tiny_model_dir, prompts_path, tmp_path, capsys, no_model):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    expect_error(run_argv(tiny_model_dir, prompts_path, foreign), capsys, r"not empty and holds no ssd run")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    run = tmp_path / "run"
    run.mkdir()
    argv = run_argv(tiny_model_dir, prompts_path, run)
    (run / "ssd_config.json").write_text(json.dumps(dataclasses.asdict(ssd.parse_args(argv))))
    (run / "samples-part0-of-1.jsonl").write_text("")  # the run has started writing
    record = (run / "ssd_config.json").read_text()
    expect_error(argv + ["--temperature", "0.7"], capsys, r"other settings \(--temperature 1\.6, now 0\.7\)")
    expect_error(argv + ["--seed", "1"], capsys, r"--seed")
    assert (run / "ssd_config.json").read_text() == record


def test_a_run_that_wrote_nothing_restarts_with_new_settings(tiny_model_dir, prompts_path, tmp_path, capsys,
                                                             no_model):
    """A first attempt stopped by a bad flag leaves only ssd_config.json: the corrected command may take the dir."""
    run = tmp_path / "run"
    expect_error(run_argv(tiny_model_dir, prompts_path, run, "--prompt_column", "question"), capsys, r"no column")
    assert sorted(p.name for p in run.iterdir()) == ["ssd_config.json"]
    expect_error(run_argv(tiny_model_dir, prompts_path, run, "--prompt_column", "nothing"), capsys, r"no column")
    assert json.loads((run / "ssd_config.json").read_text())["prompt_column"] == "nothing"


def test_errors_on_the_command_line(tiny_model_dir, prompts_path, tmp_path):
    """The real CLI: exit code 2, one line on stderr, and no model loaded (it is quick)."""
    env = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    start = time.time()
    result = cli(run_argv(tiny_model_dir, prompts_path, tmp_path / "out", "--prompt_column", "question"), env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: the dataset has no column 'question'")
    assert "sampling" not in result.stdout
    assert time.time() - start < 60


def test_filter_dropping_everything_stops(tiny_model_dir, prompts_path, tmp_path, capsys):
    # top_k 1 is argmax sampling: one-token completions whatever the kernels, all shorter than 10 characters
    argv = run_argv(tiny_model_dir, prompts_path, tmp_path / "out", "--max_prompts", "4", "--max_completion_length",
                    "1", "--top_k", "1")
    line = expect_error(argv, capsys, r"filter dropped all 4 samples", sampled=True)
    assert "--max_completion_length" in line
    assert len(read_samples(tmp_path / "out")) == 4
