"""Every `dms` subcommand ends an expected error with one line on stderr and exit status 2;
--debug or DMS_DEBUG=1 re-raises it with its traceback; an unexpected error is never hidden."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

import dms.cli
from dms.cli import main
from dms.config import DMSConfigError

ASSETS = Path(dms.__file__).resolve().parent / "assets"
NOT_DMS = ("not a DMS checkpoint: its config has no 'dms_window_size' (expected the dms_* keys dms_window_size, "
           "dms_alpha_scale, dms_initial_alpha_offset, dms_tau, dms_alpha_per, dms_separate_alpha, dms_cr, "
           "dms_disable_eviction); "
           "use dms.apply(model, ...) to add DMS to a plain model")


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("DMS_DEBUG", raising=False)


@pytest.fixture
def command_raising(monkeypatch):
    """Installs a subcommand `fake` whose run raises the given exception."""
    def install(error: BaseException):
        module = types.ModuleType("fake_dms_command")
        module.add_arguments = lambda p: None

        def run(args):
            raise error

        module.run = run
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(dms.cli.COMMANDS, "fake", (module.__name__, "raises"))
    return install


def test_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    assert main(["generate", str(missing), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"dms generate: error: no such folder: {missing}\n"


def test_missing_dms_model_of_eval(tmp_path, capsys):
    missing = tmp_path / "dms8"
    assert main(["eval", str(ASSETS / "base"), "--dms", f"8={missing}"]) == 2
    assert capsys.readouterr().err == f"dms eval: error: no such folder: {missing}\n"


def test_plain_model_is_not_a_dms_checkpoint(capsys):
    assert main(["generate", str(ASSETS / "base"), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert capsys.readouterr().err == f"dms generate: error: {NOT_DMS}\n"


def test_bad_argument_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(ASSETS / "dms-8x"), "--prompt", "hi", "--max-new-tokens", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("dms generate: error: argument --max-new-tokens: invalid int value: 'x' "
                                       "(see dms generate --help)\n")


def test_missing_required_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(ASSETS / "dms-8x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("dms generate: error: one of the arguments --prompt --prompt-file is "
                                       "required (see dms generate --help)\n")


def test_full_page_pool(command_raising, capsys):
    from dms.cache import DMSCacheFullError

    command_raising(DMSCacheFullError("DMSCache: a layer needs 9 pages of 16 tokens but max_pages=8"))
    assert main(["fake"]) == 2
    assert capsys.readouterr().err == "dms fake: error: DMSCache: a layer needs 9 pages of 16 tokens but max_pages=8\n"


@pytest.mark.parametrize("error", [TypeError("window must be an int"),
                                   NotImplementedError("beam search is not supported"),
                                   FileNotFoundError(2, "No such file or directory", "data.jsonl")])
def test_expected_errors_are_one_line(command_raising, capsys, error):
    command_raising(error)
    assert main(["fake"]) == 2
    assert capsys.readouterr().err == f"dms fake: error: {error}\n"


def test_multi_line_message_is_joined(command_raising, capsys):
    command_raising(ValueError("first line\n  second line"))
    assert main(["fake"]) == 2
    assert capsys.readouterr().err == "dms fake: error: first line second line\n"


def test_unexpected_error_keeps_its_traceback(command_raising):
    command_raising(RuntimeError("an internal bug"))
    with pytest.raises(RuntimeError, match="^an internal bug$"):
        main(["fake"])


def test_interrupt(command_raising, capsys):
    command_raising(KeyboardInterrupt())
    assert main(["fake"]) == 130
    assert capsys.readouterr().err == "dms fake: interrupted\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_raises_with_traceback(tmp_path, where):
    missing = str(tmp_path / "nope")
    argv = ["generate", missing, "--prompt", "hi"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(FileNotFoundError, match=f"^no such folder: {re.escape(missing)}$"):
        main(argv)


def test_debug_environment_variable_raises(monkeypatch):
    monkeypatch.setenv("DMS_DEBUG", "1")
    with pytest.raises(DMSConfigError) as info:
        main(["generate", str(ASSETS / "base"), "--prompt", "hi"])
    assert str(info.value) == NOT_DMS


def test_eval_without_matplotlib_fails_before_evaluating(monkeypatch, tmp_path, capsys):
    import dms.eval.runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although the plot cannot be drawn")

    monkeypatch.setattr(dms.eval.runner, "evaluate", must_not_run)
    monkeypatch.setattr("dms.eval.evaluate", must_not_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["eval", str(ASSETS / "base"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == 'dms eval: error: plotting needs matplotlib: pip install "dms-kv[plot]"\n'


def test_library_does_not_import_matplotlib():
    import subprocess

    code = "import sys, dms.models, dms.eval, dms.train, dms.cli; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "False\n"


def test_eval_value_error_goes_through_the_same_report(tmp_path, capsys):
    assert main(["eval", str(ASSETS / "base"), "--methods", "vanilla", "--samples", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "dms eval: error: samples must be >= 1, got 0\n"


def test_generate_argument_range(capsys):
    assert main(["generate", str(ASSETS / "dms-8x"), "--prompt", "hi", "--page-size", "0"]) == 2
    assert capsys.readouterr().err == "dms generate: error: --page-size must be >= 1, got 0\n"
