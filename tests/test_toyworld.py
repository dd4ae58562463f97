import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest
from PIL import Image

from toy import scenes, tasks, text, toyworld
from toy.scenes import COLOURS, HALF, HELDOUT_COMBOS, POSITIONS, SHAPES, read_scene, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("--toy_train={'caption': 6, 'image_qa': 40, 'video_qa': 8, 'generation': 40, 'image_edit': 30, "
         "'video_prediction': 16, 'visual_thinking': 10}")
SMALL_VAL = "--toy_val={'caption': 4, 'image_qa': 14, 'video_qa': 4, 'generation': 4, 'image_edit': 4, " \
            "'video_prediction': 8, 'visual_thinking': 4}"

TEXT = ("--toy_text={'scene_qa': 60, 'video_qa': 10, 'keyed_copy': 10, 'repeat': 10, 'facts': 10, 'riddle': 20, "
        "'grid_qa': 30, 'grid_caption': 10, 'grid_draw': 30}")
TEXT_VAL = "--toy_text_val={'scene_qa': 20, 'video_qa': 6, 'keyed_copy': 4, 'grid_qa': 4, 'grid_draw': 4}"
VPIT_TEXT = {"scene_qa": 5, "facts": 3}


def make_world(path, seed=5):
    subprocess.run([sys.executable, "-m", "toy.toyworld", f"--data_dir={path}", f"--seed={seed}", SMALL, SMALL_VAL,
                    "--toy_heldout_val=12", "--toy_corpus_captions=50", TEXT, TEXT_VAL,
                    f"--toy_vpit_text={VPIT_TEXT}"], cwd=ROOT, check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("world")))


def digest(root):
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(dirpath, name), "rb").read())
    return h.hexdigest()


def samples(root, split, name):
    with open(os.path.join(root, split, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    assert digest(make_world(str(tmp_path / "again"))) == digest(world)
    assert digest(make_world(str(tmp_path / "other"), seed=6)) != digest(world)


def test_every_task_in_both_splits_with_matching_placeholders(world):
    for split in ("train", "val"):
        for task in tasks.TASKS:
            rows = samples(world, split, task)
            assert rows, (split, task)
            for s in rows:
                assert s["task"] == task
                turns = s["conversations"]
                assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
                assert sum(t["value"].count("<image>") for t in turns) == len(s["images"])
                assert len(s["meta"]["scenes"]) == len(s["images"])
                assert all(os.path.exists(os.path.join(world, p)) for p in s["images"])


def test_task_formats(world):
    qa = samples(world, "train", "image_qa")
    assert {q for s in qa for q in s["meta"]["qtypes"]} == set(tasks.QA_TYPES)
    assert max(len(s["conversations"]) for s in qa) > 2  # some conversations ask several questions
    for s in qa:
        turns = [t["value"] for t in s["conversations"]]
        assert turns[0].startswith("<image>\n") and sum(t.count("<image>") for t in turns) == 1
        assert len(set(turns[0::2])) == len(turns) // 2 == len(s["meta"]["qtypes"])  # no question twice
        for question, answer, qtype in zip(turns[0::2], turns[1::2], s["meta"]["qtypes"]):
            if qtype == "multiple_choice":
                assert answer in "ABCD" and "\nA. " in question
    for s in samples(world, "train", "generation"):
        assert s["conversations"][1]["value"].endswith("<image>") and "<image>" not in s["conversations"][0]["value"]
    for s in samples(world, "train", "video_qa"):
        assert 4 <= len(s["images"]) <= 8 and s["meta"]["qtype"] in ("direction", "order")
    kinds = {s["meta"]["qtype"] for s in samples(world, "train", "video_prediction")}
    assert kinds == {"forward", "partial", "reverse", "reorder"}
    for s in samples(world, "train", "visual_thinking"):
        human, gpt = (t["value"] for t in s["conversations"])
        assert "Think visually" in human and gpt.startswith("<image>\n") and len(gpt) > len("<image>\n")
    for s in samples(world, "train", "image_edit"):
        assert s["conversations"][1]["value"] == "<image>" and len(s["images"]) == 2


def test_answers_are_true_of_the_pictures(world):
    """The scene reader, reading the rendered image, agrees with each colour/shape/count/position/size answer."""
    for s in samples(world, "train", "image_qa"):
        qtype, answer = s["meta"]["qtype"], s["conversations"][1]["value"]
        read = read_scene(Image.open(os.path.join(world, s["images"][0])))
        if qtype == "colour":
            assert answer in {o["colour"] for o in read}
        elif qtype == "position":
            assert answer in {o["position"] for o in read}
        elif qtype == "count" and "How many shapes" in s["conversations"][0]["value"]:
            assert scenes.NUMBERS.index(answer) == len(read)


def test_phrasings_vary(world):
    prompts = {s["conversations"][0]["value"].split(" ")[0] for s in samples(world, "train", "generation")}
    responses = {s["conversations"][1]["value"] for s in samples(world, "train", "generation")}
    assert len(prompts) >= 3 and len(responses) >= 3


def test_heldout_compositions_never_in_train_visual_outputs(world):
    output_tasks = ["generation", "image_edit", "video_prediction", "visual_thinking"]
    for task in output_tasks:
        for s in samples(world, "train", task):
            n_in = s["conversations"][0]["value"].count("<image>")
            for scene in s["meta"]["scenes"][n_in:]:  # the images the model must produce
                assert not any((o.get("colour"), o.get("shape")) in HELDOUT_COMBOS for o in scene), s["id"]
    heldout = samples(world, "val", "generation_heldout")
    assert heldout and all(any((o["colour"], o["shape"]) in HELDOUT_COMBOS for o in s["meta"]["scenes"][0])
                           for s in heldout)
    # ... while understanding data does show them
    understood = [o for s in samples(world, "train", "image_qa") for o in s["meta"]["scenes"][0]]
    assert any((o["colour"], o["shape"]) in HELDOUT_COMBOS for o in understood)


def text_rows(root, split):
    with open(os.path.join(root, "text", f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_val_scenes_are_never_training_scenes(world):
    """Every picture of val, in every task, shows a scene no training picture or training text shows."""
    train, val = set(), set()
    for task in tasks.TASKS:
        for s in samples(world, "train", task):
            train.update(scenes.scene_keys(task, s["meta"]["scenes"]))
        for s in samples(world, "val", task):
            val.update(scenes.scene_keys(task, s["meta"]["scenes"]))
    for task in tasks.HELDOUT:
        for s in samples(world, "val", task):
            val.update(scenes.scene_keys(task, s["meta"]["scenes"]))
    assert val and train and not val & train
    assert all(scenes.is_val_scene(k) for k in val) and not any(scenes.is_val_scene(k) for k in train)
    in_words = set()  # the scenes the text corpus describes: scene_qa's scenes, riddles' answers, keyed values
    for c in text_rows(world, "train"):
        turns = [t["value"] for t in c["conversations"]]
        for intro in text.SCENE_INTROS:
            prefix = intro.split("{}")[0]
            if c["task"] == "scene_qa" and turns[0].startswith(prefix):
                in_words.add(turns[0][len(prefix):].split(".\n")[0])
        if c["task"] in ("riddle", "keyed_copy", "repeat"):
            in_words.add(turns[1])
    assert len(in_words) > 50 and not in_words & val
    # ... nor as a grid of words
    val_grids = {scenes.grid(scene) for task in {**tasks.TASKS, **tasks.HELDOUT} if not task.startswith("video")
                 for s in samples(world, "val", task) for scene in s["meta"]["scenes"] if scene and "x" in scene[0]}
    train_grids = set()
    for c in text_rows(world, "train"):
        turns = [t["value"] for t in c["conversations"]]
        if c["task"] in ("grid_qa", "grid_caption"):
            train_grids.add(turns[0][len("Grid: "):].split("\n")[0])
        if c["task"] == "grid_draw":
            train_grids.add(turns[1])
    assert len(train_grids) > 30 and len(val_grids) > 30 and not train_grids & val_grids


def test_text_conversations_answer_from_the_words(world):
    """The stand-in LLM's conversations: scenes in words whose answers are true of the scene, every kind present,
    val scenes kept out of train."""
    rows = text_rows(world, "train")
    assert {c["task"] for c in rows} == set(text.TEXT_TASKS)
    assert all("<image>" not in t["value"] for c in rows for t in c["conversations"])
    for c in rows:
        turns = [t["value"] for t in c["conversations"]]
        if c["task"] == "keyed_copy":
            key = turns[0].rsplit("What is in ", 1)[1][:-1]
            assert f"{key}: {turns[1]}." in turns[0]
        if c["task"] == "scene_qa" and turns[0].startswith("Scene: ") and "What colour is the" in turns[0]:
            scene_text, question = turns[0][len("Scene: "):].split("\n", 1)
            assert turns[1] in scene_text
        if c["task"] == "grid_draw":  # 64 slot words, each object asked for where asked (riddles name none)
            words = re.findall(r"\[[^]]*\]", turns[1])
            assert len(words) == 64 and "".join(words) == turns[1] and set(words) <= set(scenes.SLOT_WORDS)
            if "in the colour of" not in turns[0]:
                assert {w[1:-1] for w in words if w != scenes.EMPTY_SLOT} == set(re.findall(
                    r"(?:large|small) \w+ \w+(?= in the)", turns[0]))
        if c["task"] == "grid_qa" and turns[1] in scenes.COLOURS:  # a colour is read off the grid
            assert turns[1] in turns[0].split("\n")[0]
    val = text_rows(world, "val")
    assert {c["task"] for c in val} == {"scene_qa", "video_qa", "keyed_copy", "grid_qa", "grid_draw"}


def test_stage2_text_task_is_the_first_text_conversations_of_its_kinds(world):
    """train/ and val/text.jsonl, stage 2's text-only task: the first conversations of each kind toy_vpit_text names,
    from the same split's text file (val holds no facts, so none), as they are but for their task."""
    for split in ("train", "val"):
        source = text_rows(world, split)
        of_kind = lambda kind: [c for c in source if c["task"] == kind]
        want = [dict(c, task="text") for kind, n in VPIT_TEXT.items() for c in of_kind(kind)[:n]]
        assert samples(world, split, "text") == want
        assert len(want) == (8 if split == "train" else 5)


def test_world_json_records_the_knobs_the_world_was_made_from(world):
    """pipeline.py compares this record with the knobs in force to decide whether the world must be made again."""
    record = json.load(open(os.path.join(world, "world.json")))
    assert set(record["recipe"]) == set(toyworld.RECIPE)
    assert (record["recipe"]["seed"], record["recipe"]["toy_heldout_val"], record["recipe"]["toy_vpit_text"]) == \
        (5, 12, VPIT_TEXT)
    assert 0.9 < record["scene_reader_accuracy"] <= 1.0
    assert not [f for f in os.listdir(world) if f.endswith(".tmp")]


def test_riddles_need_corpus_facts_absent_from_image_data(world):
    riddles = samples(world, "val", "generation_riddle")
    train_text = " ".join(t["value"] for task in tasks.TASKS for s in samples(world, "train", task)
                          for t in s["conversations"])
    corpus = open(os.path.join(world, "corpus.txt")).read()
    for s in riddles:
        prompt = s["conversations"][0]["value"]
        thing = prompt.split("in the colour of ")[1].split(",")[0].split(" ", 1)[1]
        colour = s["meta"]["scenes"][0][0]["colour"]
        assert scenes.COLOUR_OF[thing] == colour and f"{thing} is {colour}" in corpus
        assert thing not in train_text and prompt not in train_text
    for fact, answer in tasks.facts():
        assert f"{fact} {answer}." in corpus


def test_scene_reader_reads_every_attribute():
    rng = random.Random(0)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        read = read_scene(render(scene))
        assert len(read) == len(scene)
        for o in scene:
            assert any(r["shape"] == o["shape"] and r["colour"] == o["colour"] and r["size"] == o["size"] and
                       r["position"] == scenes.position_name(o["x"], o["y"]) for r in read)


def test_scene_reader_on_hand_made_scene_and_blank():
    scene = [{"shape": "triangle", "colour": "orange", "size": "small", "x": 53, "y": 53},
             {"shape": "square", "colour": "blue", "size": "large", "x": 11, "y": 11}]
    read = read_scene(render(scene))
    assert [(r["shape"], r["colour"], r["size"], r["position"]) for r in read] == [
        ("square", "blue", "large", "top left"), ("triangle", "orange", "small", "bottom right")]
    assert read_scene(render([])) == []
    assert len(COLOURS) >= 6 and set(SHAPES) >= {"circle", "square", "triangle"} and len(HALF) == 2
    assert len(POSITIONS) == 9


def test_grid_puts_each_object_in_the_slots_it_covers():
    """scenes.grid: 64 slot words in reading order; every object of every kind is in at least one slot, only in
    slots inside its bounding box, and each slot it names is one it covers for a quarter or more."""
    rng = random.Random(0)
    assert scenes.grid([]) == scenes.EMPTY_SLOT * 64
    for _ in range(100):
        scene = scenes.random_scene(rng)
        words = re.findall(r"\[[^]]*\]", scenes.grid(scene))
        assert len(words) == 64
        named = lambda o: f"[{o['size']} {o['colour']} {o['shape']}]"
        assert all(named(o) in words for o in scene)
        near = lambda o, i: all(abs(centre - at) < HALF[o["size"]] + scenes.SLOT for centre, at in zip(
            [(c + 0.5) * scenes.SLOT for c in divmod(i, 8)[::-1]], (o["x"], o["y"])))
        for i, w in enumerate(words):
            assert w == scenes.EMPTY_SLOT or any(named(o) == w and near(o, i) for o in scene), (i, w, scene)
    big = {"shape": "square", "colour": "red", "size": "large", "x": 11, "y": 11}  # pixels 3..19: slots 0-2 x 0-2
    words = re.findall(r"\[[^]]*\]", scenes.grid([big]))
    assert [i for i, w in enumerate(words) if w != scenes.EMPTY_SLOT] == [0, 1, 2, 8, 9, 10, 16, 17, 18]
