import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from configurator import ROOT, STAGES, comments, configure, script_args, split_args


def knobs():
    return {"lr": 1e-3, "steps": 10, "name": "run", "flag": False, "mix": {"a": 1}, "prompt": ""}


def write_config(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return str(path)


def test_file_then_overrides_in_both_spellings(tmp_path):
    g = knobs()
    cfg = write_config(tmp_path, "steps = 20\nlr = 5\n")
    configure(g, [cfg, "--name=big", "--steps", "30", "--mix={'b': 2}", "--flag"])
    assert g["steps"] == 30 and g["name"] == "big" and g["mix"] == {"b": 2} and g["flag"] is True
    assert g["lr"] == 5.0 and isinstance(g["lr"], float)  # int accepted for a float knob


def test_prompt_with_spaces_stays_a_string(tmp_path):
    g = knobs()
    configure(g, [write_config(tmp_path, ""), "--prompt", "Generate an image of a red circle"])
    assert g["prompt"] == "Generate an image of a red circle"
    configure(g, [write_config(tmp_path, ""), "--prompt=True"])
    assert g["prompt"] == "True"


def test_unknown_override_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="'stpes'"):
        configure(knobs(), [write_config(tmp_path, ""), "--stpes=3"])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="'steps'.*expected int"):
        configure(knobs(), [write_config(tmp_path, ""), "--steps=fast"])
    with pytest.raises(ValueError, match="'name'"):
        configure(knobs(), [write_config(tmp_path, "name = 3\n")])


def test_config_file_key_no_stage_declares_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'no_such_knob' .*in no stage script"):
        configure(knobs(), [write_config(tmp_path, "no_such_knob = 1\n")])
    with pytest.raises(ValueError, match="'data_dri' \\(did you mean data_dir"):  # a stage's key, misspelt
        configure(knobs(), [write_config(tmp_path, "data_dri = 'x'\n")])


def test_a_mistake_in_a_config_file_names_its_line(tmp_path):
    with pytest.raises(ValueError, match=r"cfg.py, line 2: .*never closed"):
        configure(knobs(), [write_config(tmp_path, "steps = 3\nlr = [1,\n")])
    with pytest.raises(ValueError, match=r"cfg.py, line 2: NameError: name 'rate'"):
        configure(knobs(), [write_config(tmp_path, "steps = 3\nlr = rate * 2\n")])


def test_config_file_keys_of_other_stages_are_accepted(tmp_path):
    g = knobs()
    configure(g, [write_config(tmp_path, "seed = 7\nsteps = 3\n")])  # seed belongs to toyworld.py, not to these knobs
    assert g["steps"] == 3 and "seed" not in knobs().keys() - g.keys()


def test_default_config_is_tiny():
    g = {"data_dir": "elsewhere"}
    configure(g, [])
    assert g["config_file"].endswith("configs/tiny.py") and g["data_dir"] == "data/toy"


def test_split_args_rejects_stray_words():
    with pytest.raises(ValueError, match="unexpected argument"):
        split_args(["configs/tiny.py", "oops"])


def test_none_lists_and_names_shared_within_a_file(tmp_path):
    """None only where the default is None; a list's items keep the default's item type (--channels 64 collects the
    number 64, --channels=[1, 'x'] is an error); a config file's comprehension sees the names defined before it."""
    with pytest.raises(ValueError, match="'steps'.*NoneType"):
        configure(knobs(), [write_config(tmp_path, ""), "--steps=None"])
    g = {**knobs(), "channels": [16, 32], "images": [], "path": None}
    configure(g, [write_config(tmp_path, ""), "--channels", "64", "--channels", "8", "--path=out"])
    assert g["channels"] == [64, 8] and g["path"] == "out"
    with pytest.raises(ValueError, match=r"'channels\[1\]'"):
        configure(g, [write_config(tmp_path, ""), "--channels=[1, 'x']"])
    configure(g, [write_config(tmp_path, "steps = 4\nchannels = [steps * k for k in (1, 2)]\n")])
    assert g["channels"] == [4, 8]


SCRIPT = '''"""A script to read. Its docstring heads the help."""
# ----------------------------------------------------------------------
lr = 0.1  # the learning rate, a comment that runs on
# over two lines
steps = 10  # how many
# Model: the next knob's heading, not part of steps' comment
width = 64
quiet = False
# ----------------------------------------------------------------------
'''


def test_comments_run_on_in_lower_case_and_head_the_next_knob_in_capitals(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    assert comments(str(script)) == {"lr": "the learning rate, a comment that runs on over two lines",
                                     "steps": "how many", "width": "Model: the next knob's heading, not part of "
                                     "steps' comment", "quiet": ""}


def test_help_shows_the_values_after_the_config_file(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    g = {"lr": 0.1, "steps": 10, "width": 64, "quiet": False, "__file__": str(script), "__doc__": "A script to read."}
    with pytest.raises(SystemExit) as done:
        configure(g, [write_config(tmp_path, "steps = 20\n"), "-h", "--width=8"])
    printed = capsys.readouterr().out
    assert done.value.code == 0 and printed.startswith("script.py: A script to read.\n")
    assert "  --steps=20  (cfg.py)\n      how many\n" in printed and "  --width=8\n      Model: " in printed
    assert "  --lr=0.1\n      the learning rate, a comment that runs on over two lines\n" in printed


def run_script(script, *args):
    return subprocess.run([sys.executable, *script_args(script), *args], cwd=ROOT, capture_output=True, text=True)


def test_every_script_answers_help_with_its_knobs():
    """--help: each knob with its value and its comment from the source, exit 0 (it used to be a traceback)."""
    scripts = [s for s in STAGES if os.path.exists(os.path.join(ROOT, s))]
    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(scripts, pool.map(lambda s: run_script(s, "--help"), scripts)))
    for script, out in helps.items():
        assert out.returncode == 0 and "Traceback" not in out.stderr, (script, out.stderr[-2000:])
        assert out.stdout.startswith(f"{os.path.basename(script)}: "), (script, out.stdout[:500])
        assert re.search(r"\n  --\w+=.+\n      \S", out.stdout), (script, out.stdout)  # a knob, its value, its comment
    assert "--encode_shard_size=4096\n      images per safetensors shard" in helps["encode.py"].stdout
    assert "--data_dir='data/toy'  (tiny.py)" in helps["encode.py"].stdout  # a value from the config file says so


def test_a_mistake_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    cases = [(["--encode_shard_sise=3"], "did you mean encode_shard_size"),
             (["--encode_shard_size=many"], "expected int"), (["nowhere.py"], "config file not found"),
             (["oops"], "unexpected argument 'oops'"),
             ([write_config(tmp_path, "encode_shard_sise = 3\n")], "did you mean encode_shard_size")]
    with ThreadPoolExecutor(2) as pool:
        outs = pool.map(lambda case: run_script("encode.py", *case[0]), cases)
        for (args, message), out in zip(cases, outs):
            assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
            assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1, \
                (args, out.stderr)
