import os
import subprocess
import sys

import pytest

from configurator import configure, split_args


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
    with pytest.raises(ValueError, match="no_such_knob"):
        configure(knobs(), [write_config(tmp_path, "no_such_knob = 1\n")])


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


def test_every_script_answers_help_with_its_knobs():
    """--help: each knob with its value and its comment from the source, exit 0 (it used to be a traceback)."""
    from concurrent.futures import ThreadPoolExecutor

    from configurator import ROOT, STAGES

    def help_of(script):
        return script, subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)

    with ThreadPoolExecutor(2) as pool:
        for script, out in pool.map(help_of, [s for s in STAGES if os.path.exists(os.path.join(ROOT, s))]):
            assert out.returncode == 0 and not out.stderr.count("Traceback"), (script, out.stderr[-2000:])
            assert out.stdout.startswith(f"{script}: ") and "\n  --" in out.stdout, (script, out.stdout[:500])
    encode_help = help_of("encode.py")[1].stdout
    assert "--encode_shard_size=4096\n      images per safetensors shard" in encode_help
    assert "--data_dir='data/toy'  (tiny.py)" in encode_help  # a value from the config file says so


def test_a_mistake_on_the_command_line_is_one_line_and_exit_2():
    from configurator import ROOT
    for args, message in ((["--encode_shard_sise=3"], "did you mean encode_shard_size"),
                          (["--encode_shard_size=many"], "expected int"), (["nowhere.py"], "config file not found")):
        out = subprocess.run([sys.executable, "encode.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1
