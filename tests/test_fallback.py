"""The fast paths' self-test and fall-backs, on CPU: statuses, checks that catch wrong kernels (and pass the real
Triton kernels under TRITON_INTERPRET=1), a failure injected at startup or mid-run that leaves the run's output equal
to the reference run's with one warning line and the status recorded, the flags on --help, and the preflight table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssd
from ssd_kernels import check_paged_attention, check_sampler, fast_paths, paged_decode_attention_reference
from ssd_kernels import sample_next_token_reference as reference_sampler

REPO = Path(__file__).resolve().parent.parent
FLAGS = ("fused_sampler", "paged_attention", "cuda_graphs", "flash_varlen", "grouped_mm")


@pytest.fixture(autouse=True)
def fresh_paths():
    """Every test starts from the defaults and leaves them as they were, in the registry's own dicts, which every
    module that reads them shares."""
    saved = dict(fast_paths.FAST_PATHS), dict(fast_paths.FAST_PATH_STATUS)
    fast_paths.FAST_PATHS.update(dict.fromkeys(FLAGS, True))
    fast_paths.FAST_PATH_STATUS.clear()
    yield
    fast_paths.FAST_PATHS.update(saved[0])
    fast_paths.FAST_PATH_STATUS.clear()
    fast_paths.FAST_PATH_STATUS.update(saved[1])


def test_self_test_on_cpu_reports_paths_off():
    status = ssd.self_test(torch.device("cpu"), dict.fromkeys(FLAGS, True) | {"grouped_mm": False})
    assert status == dict.fromkeys(FLAGS, "off (cpu)") | {"grouped_mm": "off (flag)"}
    assert ssd.FAST_PATHS == dict.fromkeys(FLAGS, True) | {"grouped_mm": False}


def test_self_test_flags_are_on_help_and_default_on(capsys):
    with pytest.raises(SystemExit):
        ssd.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in FLAGS + ("dist_timeout", "preflight"):
        assert f"--{name}" in text
    assert all(getattr(ssd.Config(), name) for name in FLAGS) and not ssd.Config().preflight
    assert set(FLAGS) == set(ssd.FAST_PATHS) and set(FLAGS) <= ssd.RESUMABLE_CHANGES


def test_self_test_stops_when_a_check_breaks_the_cuda_context(monkeypatch):
    """A check whose kernel faulted leaves the CUDA context unusable (stood in by a synchronize that raises): no
    fall-back, the run stops with one line naming the path and the flag that skips it."""
    def fault(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(ssd, "check_sampler", fault)
    monkeypatch.setattr(torch.cuda, "synchronize", fault)
    with pytest.raises(ssd.SSDError, match=r"^fast path fused_sampler broke the CUDA context in its self-test \(CUDA "
                       r"error: an illegal memory access was encountered\); rerun with --no-fused_sampler$"):
        ssd.self_test(torch.device("cuda"), dict.fromkeys(FLAGS, False) | {"fused_sampler": True})


def exactly_k(logits, **kw):
    """A plausible kernel bug: top-k keeps exactly k tokens (torch.topk), dropping ties with the k-th."""
    k = kw["top_k"]
    if 0 < k < logits.shape[-1]:
        kept = torch.full_like(logits, float("-inf")).scatter(-1, logits.topk(k).indices, 0.0)
        logits = logits + kept.to(logits.dtype)
    return reference_sampler(logits, **kw)


@pytest.mark.parametrize("bug", ["exactly_k", "ninf_as_finite", "lowest_id_tie_lost"])
def test_self_test_sampler_check_catches_wrong_tokens(bug):
    broken = {"exactly_k": exactly_k,
              "ninf_as_finite": lambda x, **kw: reference_sampler(x.float().clamp(min=-1e4), **kw),
              "lowest_id_tie_lost": lambda x, **kw: reference_sampler(x, **kw) + (x.float().amax(-1) == 0).long()}
    check_sampler(reference_sampler, "cpu", vocab=2000)
    with pytest.raises(AssertionError, match="!= reference"):
        check_sampler(broken[bug], "cpu", vocab=2000)


def test_self_test_paged_attention_check_catches_an_off_by_one():
    check_paged_attention(paged_decode_attention_reference, "cpu", 4, 2, 16, 16)
    short = lambda q, k, v, t, lens: paged_decode_attention_reference(q, k, v, t, (lens - 1).clamp(min=0))  # noqa
    with pytest.raises(AssertionError, match="differs from the reference"):
        check_paged_attention(short, "cpu", 4, 2, 16, 16)


def test_self_test_of_varlen_and_grouped_mm_runs_ssds_model_code():
    """The startup checks of flash_varlen and grouped_mm with ssd's MoE, document_attention and Documents, on CPU
    (where both runs of each take the reference): they pass, and fail an attention that is 20% off with its path on."""
    parts = ssd.MoE, ssd.document_attention, ssd.Documents
    for name in ("flash_varlen", "grouped_mm"):
        fast_paths.check_varlen_and_grouped_mm("cpu", name, *parts)

    def off_when_fast(q, k, v, docs):
        return ssd.document_attention(q, k, v, docs) * (1.2 if fast_paths.FAST_PATHS["flash_varlen"] else 1)
    with pytest.raises(AssertionError, match="Mismatch"):
        fast_paths.check_varlen_and_grouped_mm("cpu", "flash_varlen", ssd.MoE, off_when_fast, ssd.Documents)


def test_self_test_passes_the_triton_kernels_under_the_interpreter():
    """The same checks the GPU runs at startup, on the real kernels run by Triton's interpreter (a subprocess: the
    interpreter must be chosen before triton decorates the kernels)."""
    pytest.importorskip("triton")
    code = ("import warnings; warnings.filterwarnings('ignore')\n"
            "from ssd_kernels import check_sampler, check_paged_attention\n"
            "from ssd_kernels.triton_sampling import sample_next_token_triton\n"
            "from ssd_kernels.paged_attention import paged_decode_attention_triton\n"
            "check_sampler(sample_next_token_triton, 'cpu', vocab=700, extra=[(0.9, 3, 0.7, 0.02)])\n"
            "check_paged_attention(paged_decode_attention_triton, 'cpu', 8, 2, 16, 16)\n"
            "check_paged_attention(paged_decode_attention_triton, 'cpu', 4, 4, 32, 32, dtype=__import__('torch')"
            ".float32)\nprint('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def wrong_tokens(logits, **kw):
    """A fast sampler that compiles and runs but draws the wrong tokens."""
    return (reference_sampler(logits, **kw) + 1) % logits.shape[-1]


def sample_run(tiny_model_dir, prompts_path, out: Path, *flags) -> list:
    ssd.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(prompts_path), "--prompt_column",
              "messages", "--max_prompts", "4", "--num_samples", "2", "--max_completion_length", "12",
              "--sample_only", "--output_dir", str(out), "--no-paged_attention", "--no-cuda_graphs",
              "--no-flash_varlen", "--no-grouped_mm", *flags])
    return [r["completion_ids"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]


def test_fallback_of_a_sampler_that_fails_its_self_test(tiny_model_dir, prompts_path, tmp_path, monkeypatch, capsys):
    """A fused sampler drawing wrong tokens is caught at startup: one warning line naming it and the error, the
    reference for the whole run (the samples equal a --no-fused_sampler run's), the status in ssd_config.json."""
    reference = sample_run(tiny_model_dir, prompts_path, tmp_path / "reference", "--no-fused_sampler")
    monkeypatch.setattr(fast_paths, "FAST_PATH_DEVICES", ("cuda", "cpu"))  # as if this CPU had the fast paths
    monkeypatch.setattr(ssd, "sample_next_token", wrong_tokens)
    capsys.readouterr()
    assert sample_run(tiny_model_dir, prompts_path, tmp_path / "fell-back") == reference
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: fast path fused_sampler failed its self-test "
                                                         "(AssertionError: tokens"), captured.err
    assert "fast paths: fused_sampler fell back (AssertionError" in captured.out
    record = json.loads((tmp_path / "fell-back" / "ssd_config.json").read_text())["fast_paths"]
    assert record["fused_sampler"].startswith("fell back (AssertionError: tokens") and \
        record["paged_attention"] == "off (flag)"
    monkeypatch.setattr(ssd, "check_sampler", lambda *args, **kw: None)  # without the self-test: wrong samples
    assert sample_run(tiny_model_dir, prompts_path, tmp_path / "unchecked") != reference


class OutOfResources(Exception):
    """What triton.runtime.errors.OutOfResources is to call_fast: an exception from a triton module."""


OutOfResources.__module__ = "triton.runtime.errors"


@torch.no_grad()
def test_fallback_of_a_kernel_launch_that_fails_mid_run(tiny_model_dir, monkeypatch, capsys):
    """The paged kernel passes its first launches, then cannot launch (out of shared memory): one warning, the
    reference from then on, and the samples equal a run on the reference; errors that are not Triton's propagate."""
    model, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    prompts = [[5, 6, 7, 8], list(range(100, 140)), [9] * 13]
    kw = dict(max_new_tokens=24, num_samples=2, temperature=1.0, top_k=20, seed=3, batch_size=4, progress=False)
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) > 10:
            raise OutOfResources("out of resource: shared memory, Required: 263168, Hardware limit: 232448")
        return paged_decode_attention_reference(*args)
    monkeypatch.setattr(ssd, "paged_decode_attention", flaky)
    monkeypatch.setattr(fast_paths, "FAST_PATH_DEVICES", ("cuda", "cpu"))  # as if this CPU had the paged kernel
    monkeypatch.setitem(ssd.FAST_PATHS, "cuda_graphs", False)  # launched step by step, as without graphs
    ssd.FAST_PATH_STATUS["paged_attention"] = "ok"
    out = ssd.generate(model, prompts, **kw)
    err = capsys.readouterr().err
    assert err.count("warning: fast path paged_attention failed during the run (OutOfResources: out of resource") \
        == 1, err
    assert not ssd.FAST_PATHS["paged_attention"] and len(calls) == 11
    assert ssd.FAST_PATH_STATUS["paged_attention"].startswith("fell back (OutOfResources")
    monkeypatch.setattr(ssd, "paged_decode_attention", paged_decode_attention_reference)
    assert out == ssd.generate(model, prompts, **kw)
    ssd.FAST_PATHS["paged_attention"] = True
    monkeypatch.setattr(ssd, "paged_decode_attention", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not a launch failure: it is not hidden
        ssd.generate(model, prompts, **kw)


def test_preflight_table_and_report(tmp_path, monkeypatch, capsys):
    """bench/preflight.py's table: the self-tests' statuses, then each command's result and figure (its last
    markdown row or pytest's summary); a failed or timed-out command fails the preflight."""
    import runpy
    preflight = runpy.run_path(str(REPO / "bench" / "preflight.py"))
    monkeypatch.chdir(tmp_path)
    checks = (("table", "-c \"print('| a | b |'); print('| x | 1.5 |')\"", 60),
              ("slow", "-c 'import time; time.sleep(30)'", 1), ("broken", "-c 'raise SystemExit(3)'", 60))
    code = preflight["main"](ssd.Config(), torch.device("cpu"), checks)
    out = capsys.readouterr().out
    assert code == 1
    assert "| self-test: fused_sampler | off (cpu) |" in out and "| table | ok, 0 s | x, 1.5 |" in out
    assert "| slow | failed (over 1 s)" in out and "| broken | failed (exit 3)" in out
    report = next(tmp_path.glob("preflight-*.md")).read_text()
    assert report.startswith("# ssd.py --preflight on cpu") and "## broken: python -c 'raise SystemExit(3)'" in report
    assert preflight["main"](ssd.Config(), torch.device("cpu"), checks[:1]) == 0


def test_preflight_refuses_a_machine_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        ssd.main(["--preflight"])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err
