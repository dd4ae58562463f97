"""pipeline.py's scheduling, on stand-in stage scripts that only record when they ran and write their artefact: the
order, what is skipped, and what --force re-runs."""
import json
import os
import time

import pytest

import pipeline
from configurator import BadInput

FAKE_STAGE = """import json, os, sys, time
start = time.time()
time.sleep(0.1)
out = os.environ["FAKE_OUT"]
json.dump({"start": start, "end": time.time()},
          open(os.path.join(out, os.path.basename(sys.argv[0]) + ".json"), "w"))
artefact = json.load(open(os.path.join(out, "artefacts.json")))[os.path.basename(sys.argv[0])]
if artefact:
    os.makedirs(os.path.dirname(artefact), exist_ok=True)
    open(artefact, "w").write("done")
"""


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Every stage script replaced by FAKE_STAGE, run from tmp_path; returns the {script: run record} reader."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_OUT", str(tmp_path))
    monkeypatch.setattr(pipeline, "out_dir", str(tmp_path / "out"))
    monkeypatch.setattr(pipeline, "toy_world", False)
    monkeypatch.setattr(pipeline, "force", "")
    monkeypatch.setattr(pipeline, "samples", [])
    artefacts = {script: done for script, done, _, _ in pipeline.stages()}
    json.dump(artefacts, open(tmp_path / "artefacts.json", "w"))
    for script in artefacts:
        (tmp_path / script).write_text(FAKE_STAGE)

    def ran():
        return {s: json.load(open(tmp_path / f"{s}.json")) for s in artefacts if (tmp_path / f"{s}.json").exists()}
    return ran


def test_stages_run_one_after_another_in_order(fake_stages):
    pipeline.main("configs/tiny.py")
    ran = fake_stages()
    order = sorted(ran, key=lambda s: ran[s]["start"])
    assert order == ["encode.py", "train_adapter.py", "train_vpit.py", "train_decoder.py", "eval.py"]
    assert all(ran[a]["end"] <= ran[b]["start"] for a, b in zip(order, order[1:]))


def test_done_stages_are_skipped_and_force_reruns_from_a_stage(fake_stages, monkeypatch):
    pipeline.main("configs/tiny.py")
    first = fake_stages()
    time.sleep(0.01)
    pipeline.main("configs/tiny.py")  # everything done: only encode.py runs again (it has no end marker)
    again = fake_stages()
    assert again["encode.py"] != first["encode.py"] and {s: r for s, r in again.items() if s != "encode.py"} == \
        {s: r for s, r in first.items() if s != "encode.py"}
    left = ["vpit_lead_in", "vpit_mix", "ckpt/vpit", "ckpt/vpit_lead_in", "ckpt/vpit_mix", "ckpt/decoder", "latents",
            "ckpt/adapter"]
    for folder in left:  # what a lead-in, a lead-out, an interrupted run and the decoder's latent cache leave behind
        os.makedirs(os.path.join(pipeline.out_dir, folder))
    monkeypatch.setattr(pipeline, "force", "train_vpit.py")
    assert [s for s, _ in pipeline.plan()] == ["encode.py", "train_vpit.py", "train_decoder.py", "eval.py"]
    for folder in ("vpit", "eval", "decoder") + tuple(left[:-1]):  # cleared, as they will re-run from scratch
        assert not os.path.exists(os.path.join(pipeline.out_dir, folder)), folder
    assert os.path.exists(os.path.join(pipeline.out_dir, "ckpt/adapter"))  # stage 1 is not forced
    monkeypatch.setattr(pipeline, "force", "nonsense.py")
    with pytest.raises(ValueError, match="not a stage"):
        pipeline.plan()


def test_toy_world_is_done_when_its_last_file_records_the_recipe_in_force(tmp_path, monkeypatch):
    """toy/toyworld.py writes world.json last, whole, with the knobs it made the world from. Without it (interrupted,
    or an older checkout's world) the world is made again; with other knobs than the config's (as
    `python -m toy.toyworld <config>` would read them) the pipeline stops with one line, as remaking the world could
    redraw pictures the token cache still holds."""
    from toy import toyworld
    monkeypatch.setattr(pipeline, "data_dir", str(tmp_path / "toy"))
    monkeypatch.setattr(pipeline, "force", "")
    monkeypatch.setattr(pipeline, "llm_path", str(tmp_path / "base" / "llm"))
    os.makedirs(tmp_path / "base")
    json.dump({}, open(tmp_path / "base" / "pretrain_report.json", "w"))  # the stand-ins are made
    done = {script: marker for script, marker, _, _ in pipeline.stages()}["toy/toyworld.py"]
    assert done == os.path.join(pipeline.data_dir, "world.json")
    world_runs = lambda: "toy/toyworld.py" in [s for s, _ in pipeline.plan()]
    os.makedirs(pipeline.data_dir)
    open(os.path.join(pipeline.data_dir, "corpus.txt"), "w").close()  # an older checkout's world
    assert world_runs()
    recipe = {knob: getattr(toyworld, knob) for knob in toyworld.RECIPE}
    json.dump({"recipe": recipe}, open(done, "w"))
    assert not world_runs()
    json.dump({"recipe": {**recipe, "toy_vpit_text": {}}}, open(done, "w"))
    with pytest.raises(BadInput, match=r"other toy-world knobs .*\(toy_vpit_text\)"):
        pipeline.plan()
    config = tmp_path / "bigger.py"
    config.write_text("toy_vpit_text = {}\n")  # the same knobs, set by the config the pipeline runs
    monkeypatch.setattr(pipeline, "config_file", str(config))
    assert not world_runs()


def test_forcing_the_world_keeps_the_shipped_stand_ins(tmp_path, monkeypatch):
    """--force=toy/toyworld.py makes the world and every stage after it again, but not the stand-ins (base models the
    repo ships): only --force=toy/pretrain_tiny.py, or their absence, remakes them."""
    monkeypatch.setattr(pipeline, "data_dir", str(tmp_path / "toy"))
    monkeypatch.setattr(pipeline, "out_dir", str(tmp_path / "out"))
    monkeypatch.setattr(pipeline, "llm_path", str(tmp_path / "base" / "llm"))
    from toy import toyworld
    os.makedirs(tmp_path / "toy")
    json.dump({"recipe": {knob: getattr(toyworld, knob) for knob in toyworld.RECIPE}},
              open(tmp_path / "toy" / "world.json", "w"))
    os.makedirs(tmp_path / "base" / "llm")
    json.dump({}, open(tmp_path / "base" / "pretrain_report.json", "w"))
    os.makedirs(tmp_path / "out" / "adapter")
    open(tmp_path / "out" / "adapter" / "metamorph.json", "w").close()
    monkeypatch.setattr(pipeline, "force", "toy/toyworld.py")
    planned = [s for s, _ in pipeline.plan()]
    assert planned[0] == "toy/toyworld.py" and "toy/pretrain_tiny.py" not in planned and "train_adapter.py" in planned
    assert os.path.exists(tmp_path / "base" / "llm") and not os.path.exists(tmp_path / "out" / "adapter")
    monkeypatch.setattr(pipeline, "force", "toy/pretrain_tiny.py")
    assert [s for s, _ in pipeline.plan()][0] == "toy/pretrain_tiny.py"
    assert not os.path.exists(tmp_path / "base")
