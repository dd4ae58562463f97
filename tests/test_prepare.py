"""prepare.py: each converter on a small source it builds from rendered toy pictures, read back through data.py's loader
and encode.image_paths; then stage 2 trained on converted image-text pairs."""
import io
import json
import os
import random
import re

import numpy as np
import pytest

from conftest import run
from data import load_mixture, read_jsonl
from encode import image_paths, load_image
from tools import prepare
from toy import tasks
from toy.scenes import COLOURS, describe, random_scene, render
from toy.tasks import GEN_PROMPTS, GEN_RESPONSES, VIDEO_PREDICTIONS, random_video


def save(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def convert(*argv):
    """prepare.main; the converter tests skip rows on purpose, so they allow most to be (but not all)."""
    prepare.main([str(a) for a in argv] + ([] if "--max_skipped" in argv else ["--max_skipped", "0.99"]))


def loaded(out, split, name):
    """Samples of a converted file, read as training reads them; every image exists under out."""
    samples = load_mixture(str(out), split, {name: -1})
    assert all(os.path.isfile(os.path.join(out, p)) for s in samples for p in s["images"])
    return samples


def skip_log(out, name):
    return [json.loads(line) for line in open(os.path.join(out, "skipped", f"{name}.jsonl"))]


def reasons(out, name):
    return sorted(r["reason"] for r in skip_log(out, name))


def test_json_array_streams_across_chunk_boundaries():
    rows = [{"id": i, "text": "x" * (i * 7), "nested": {"a": [1, 2, {"b": "]"}]}} for i in range(20)]
    text = json.dumps(rows, indent=2)
    f = io.StringIO(text)
    assert f.read(1) == "["
    assert [row for _, row in prepare.json_array(f, "rows.json", chunk=5)] == rows
    with pytest.raises(ValueError, match=r"rows.json, element 2"):
        list(prepare.json_array(io.StringIO(text[1:text.index('"id": 2') + 9] + " oops"), "rows.json", chunk=5))


def test_llava_json_array(tmp_path, capsys):
    rng, src, out = random.Random(0), tmp_path / "llava", tmp_path / "data"
    images = [save(render(random_scene(rng)), str(src / "coco" / f"{i}.png")) for i in range(5)]
    (src / "coco" / "broken.jpg").write_bytes(b"not a picture")
    good = [{"id": f"q{i}", "image": f"coco/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "no"}]} for i in range(4)]
    good.append({"id": "two", "image": ["coco/0.png", "coco/4.png"], "conversations": [
        {"from": "user", "value": "<image><image>\nSame picture?"}, {"from": "assistant", "value": "no"}]})
    good.append({"id": "text", "conversations": [{"from": "human", "value": "Two plus two?"},
                                                 {"from": "gpt", "value": "four"}]})
    one_turn = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A shape."}]
    bad = [{"id": "missing", "image": "coco/nope.png", "conversations": one_turn},
           {"id": "broken", "image": "coco/broken.jpg", "conversations": one_turn},
           {"id": "count", "image": "coco/1.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                                    {"from": "gpt", "value": "hi"}]},
           {"id": "no-placeholder", "image": "coco/1.png", "conversations": [{"from": "human", "value": "Hi."},
                                                                             one_turn[1]]},
           {"id": "order", "image": "coco/1.png", "conversations": one_turn[1:] + one_turn[1:]},
           {"id": "empty", "image": "coco/1.png", "conversations": [one_turn[0], {"from": "gpt", "value": " "}]},
           {"id": "vid", "video": "v.mp4", "conversations": one_turn}]
    (src / "mix.json").write_text(json.dumps(good[:3] + bad + good[3:], indent=1))
    with pytest.raises(SystemExit) as failed:  # 7 of 13 rows skipped: more than the default, 0.1
        convert("llava", "--src", src / "mix.json", "--out", out, "--val", 0, "--max_skipped", 0.1)
    assert failed.value.code == 2 and "error: skipped 7 of 13 rows (2 placeholder mismatch, " in capsys.readouterr().err
    convert("llava", "--src", src / "mix.json", "--out", out, "--val", 0, "--max_skipped", 0.6)
    samples = {s["id"]: s for s in loaded(out, "train", "image_qa")}
    assert list(samples) == [s["id"] for s in good] and not read_jsonl(str(out / "val" / "image_qa.jsonl"))
    assert samples["q0"]["conversations"] == good[0]["conversations"] and samples["q0"]["task"] == "image_qa"
    assert [t["from"] for t in samples["two"]["conversations"]] == ["human", "gpt"]
    assert samples["text"]["images"] == []
    assert image_paths(str(out)) == sorted(os.path.relpath(p, out) for p in images)
    assert reasons(out, "llava") == ["empty text", "missing image", "placeholder mismatch", "placeholder mismatch",
                                     "turns out of order", "unreadable image", "video sample"]
    assert {r["id"] for r in skip_log(out, "llava")} == {b["id"] for b in bad}
    assert all(r["where"].startswith(str(src / "mix.json")) for r in skip_log(out, "llava"))
    printed = capsys.readouterr().out
    assert "image_qa: 6 train, 0 val" in printed and "skipped 7 of 13 rows (2 placeholder mismatch, " in printed
    convert("llava", "--src", src / "mix.json", "--out", out, "--val", 0, "--fast", "--tag", "fast",
            "--max_skipped", 0.6)
    assert "broken" in {s["id"] for s in read_jsonl(str(out / "train" / "image_qa_fast.jsonl"))}  # not decoded


def test_rows_in_the_projects_own_format_convert_and_all_skipped_fails(tmp_path, capsys):
    """A data_dir already in the conversation format (`images`, a list, and a task per row) goes through `llava`
    as it is, each row to its own task's file (--task for a row that names none; a task that is not a plain name is
    skipped: it names a file); a run that can use no row exits 2 with the reasons counted (it used to exit 0 with every
    row skipped)."""
    rng, data, out = random.Random(0), tmp_path / "mine", tmp_path / "out"
    save(render(random_scene(rng)), str(data / "images" / "a.png"))
    qa = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a shape"}]
    rows = [{"id": "gen", "task": "generation_heldout", "images": ["images/a.png"], "conversations": [
                {"from": "human", "value": "Draw it."}, {"from": "gpt", "value": "Sure: <image>"}]},
            {"id": "qa", "task": "image_qa", "images": ["images/a.png"], "conversations": qa},
            {"id": "plain", "images": ["images/a.png"], "conversations": qa},
            {"id": "escape", "task": "../escape", "images": ["images/a.png"], "conversations": qa},
            {"id": "number", "task": 3, "images": ["images/a.png"], "conversations": qa}]
    write_jsonl(data / "rows.jsonl", rows)
    convert("llava", "--src", data / "rows.jsonl", "--images", data, "--out", out, "--val", 0, "--task", "caption")
    assert [s["id"] for s in loaded(out, "train", "generation_heldout")] == ["gen"]
    assert loaded(out, "train", "image_qa")[0]["images"] == ["../mine/images/a.png"]
    assert [s["id"] for s in loaded(out, "train", "caption")] == ["plain"]
    assert reasons(out, "llava") == ["bad task", "bad task"] and not os.path.exists(tmp_path / "escape.jsonl")
    assert "skipped 2 of 5 rows (2 bad task)" in capsys.readouterr().out
    write_jsonl(data / "rows.jsonl", [{**r, "images": []} for r in rows[:3]])  # every row now lacks its picture
    with pytest.raises(SystemExit) as failed:
        convert("llava", "--src", data / "rows.jsonl", "--out", out)
    captured = capsys.readouterr()
    assert failed.value.code == 2 and "skipped 3 of 3 rows (3 placeholder mismatch)" in captured.out
    assert captured.err.splitlines()[-1].startswith("error: skipped 3 of 3 rows (3 placeholder mismatch): all, or")


def test_max_skipped_is_a_fraction_of_the_rows(tmp_path, capsys):
    """Up to --max_skipped of the rows skipped: exit 0, the counts by reason printed; more: exit 2; --help says so."""
    rng, src, out = random.Random(0), tmp_path / "src", tmp_path / "data"
    save(render(random_scene(rng)), str(src / "a.png"))
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                {"from": "gpt", "value": "a shape"}]}
    write_jsonl(src / "rows.jsonl", [good] * 8 + [{**good, "image": "gone.png"}, "{oops"])
    prepare.main(["llava", "--src", str(src / "rows.jsonl"), "--out", str(out), "--max_skipped", "0.2"])
    printed = capsys.readouterr().out
    assert "skipped 2 of 10 rows (1 missing image, 1 malformed JSON)" in printed
    with pytest.raises(SystemExit) as failed:
        prepare.main(["llava", "--src", str(src / "rows.jsonl"), "--out", str(out), "--max_skipped", "0.19"])
    assert failed.value.code == 2 and "error: skipped 2 of 10 rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as shown:
        prepare.parse_args(["llava", "--help"])
    assert shown.value.code == 0 and "--max_skipped" in capsys.readouterr().out


def test_llava_jsonl_as_captions_with_image_root_and_tag(tmp_path):
    rng, src, out = random.Random(1), tmp_path / "src", tmp_path / "data"
    save(render(random_scene(rng)), str(src / "a.png"))
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nCaption it."},
                                               {"from": "gpt", "value": "A shape."}]}
    write_jsonl(src / "pretrain.jsonl", [row, "", "{not json", "[1, 2]"])
    convert("llava", "--src", src / "pretrain.jsonl", "--out", out, "--task", "caption", "--tag", "pretrain",
            "--image_root", tmp_path, "--val", 0)
    (sample,) = read_jsonl(str(out / "train" / "caption_pretrain.jsonl"))
    assert sample["images"] == ["src/a.png"] and sample["task"] == "caption"
    assert reasons(out, "llava_pretrain") == ["empty line", "malformed JSON", "not a JSON object"]


def pictures_with_captions(folder, n, seed=0):
    """n rendered pictures in folder and their alt-text-like captions, "A small red circle in the center."."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [(save(render(s), os.path.join(folder, f"{i:03d}.png")), f"A{describe(s)[1:]}.")
            for i, s in enumerate(scenes)]


def template_of(text, templates):
    return next(t for t in templates if re.fullmatch(re.escape(t).replace(r"\{\}", ".+"), text, re.S))


def test_pairs_from_a_folder(tmp_path):
    src, out = tmp_path / "pairs", tmp_path / "data"
    pairs = pictures_with_captions(src / "part0", 30)
    for path, text in pairs:
        open(path[:-4] + ".txt", "w").write(text)
    save(render([]), str(src / "part0" / "lonely.png"))
    (src / "part0" / "orphan.txt").write_text("A caption with no picture.")
    (src / "part0" / "empty.txt").write_text("  \n")
    save(render([]), str(src / "part0" / "empty.png"))
    for twin in ("twin.png", "twin.jpg"):  # two pictures, one caption: which is meant?
        save(render([]), str(src / "part0" / twin))
    (src / "part0" / "twin.txt").write_text("A blank picture.")
    convert("pairs", "--src", src, "--out", out, "--val", 0.3)
    generation = loaded(out, "train", "generation") + loaded(out, "val", "generation")
    captions = loaded(out, "train", "caption") + loaded(out, "val", "caption")
    assert len(generation) == len(captions) == 30
    convert("pairs", "--src", src, "--out", out, "--val", 0.3, "--seed", 7, "--tag", "again")
    for split in ("train", "val"):  # a picture goes to one split, whatever converts it, whenever
        assert {p for s in loaded(out, split, "generation") for p in s["images"]} == \
               {p for s in loaded(out, split, "caption") for p in s["images"]} == \
               {p for s in loaded(out, split, "generation_again") for p in s["images"]} != set()
    by_image = {s["images"][0]: s for s in generation}
    for path, text in pairs:
        human, gpt = (t["value"] for t in by_image[os.path.relpath(path, out)]["conversations"])
        assert f" a{text[1:-1]}" in human and "<image>" not in human and gpt.count("<image>") == 1
    prompts = {template_of(s["conversations"][0]["value"], GEN_PROMPTS) for s in generation}
    replies = {template_of(s["conversations"][1]["value"], GEN_RESPONSES) for s in generation}
    assert len(prompts) >= 4 and len(replies) >= 3  # App. C.2: varied phrasings
    assert all(s["conversations"][0]["value"].startswith("<image>\n") for s in captions)
    assert {s["conversations"][1]["value"] for s in captions} == {text for _, text in pairs}
    assert len({s["conversations"][0]["value"] for s in captions}) >= 3
    assert reasons(out, "pairs") == ["caption without image", "empty text", "no caption file",
                                     "several pictures for one caption"]


def test_pairs_from_a_tsv(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    pairs = pictures_with_captions(src / "img", 3)
    lines = ["image\tcaption"] + [f"img/{os.path.basename(p)}\t{t}" for p, t in pairs] + ["img/gone.png\tA circle.",
                                                                                          "no tab here"]
    (src / "pairs.tsv").write_text("\n".join(lines) + "\n")
    convert("pairs", "--src", src / "pairs.tsv", "--out", out, "--val", 0)
    generation = loaded(out, "train", "generation")
    assert [s["images"] for s in generation] == [[os.path.relpath(p, out)] for p, _ in pairs]
    assert len(loaded(out, "train", "caption")) == 3
    assert reasons(out, "pairs") == ["missing image", "not image<TAB>caption"]


def frame_number(path):
    return int(re.search(r"(\d+)\.png$", path).group(1))


def test_video_prediction_and_qa(tmp_path):
    rng, src, out = random.Random(2), tmp_path / "frames", tmp_path / "data"
    for v in range(3):
        frames, _ = random_video(rng, 12, 1)
        for t, scene in enumerate(frames):
            save(render(scene), str(src / f"video{v}" / f"frame_{t + 1}.png"))
    for t in range(2):
        save(render([]), str(src / "short" / f"frame_{t}.png"))
    write_jsonl(tmp_path / "qa.jsonl", [{"video": "video0", "question": "Which way?", "answer": "left"},
                                        {"video": "video1", "question": "Which way?", "answer": "up"},
                                        {"video": "nowhere", "question": "Which way?", "answer": "up"},
                                        {"video": "video2", "question": "", "answer": "up"}])
    convert("video", "--src", src, "--qa", tmp_path / "qa.jsonl", "--out", out, "--val", 0,
            "--clip_frames", 3, 5, "--intervals", 2, 3, "--qa_frames", 8)
    predictions = loaded(out, "train", "video_prediction")
    assert len(predictions) == 3 * 4
    assert [s["id"] for s in predictions] == [f"video{v}-{kind}" for v in range(3) for kind in VIDEO_PREDICTIONS]
    strides = set()
    for s in predictions:
        assert len({os.path.dirname(p) for p in s["images"]}) == 1  # one video per sample
        kind = s["id"].split("-")[-1]
        if kind == "reorder":  # shown shuffled, then the whole clip in order
            clip = [frame_number(p) for p in s["images"][len(s["images"]) // 2:]]
        else:
            clip = sorted(frame_number(p) for p in s["images"])
        assert 3 <= len(clip) <= 5
        strides |= {b - a for a, b in zip(clip, clip[1:])}
    assert strides == {2, 3}
    qa = loaded(out, "train", "video_qa")
    assert [s["conversations"][1]["value"] for s in qa] == ["left", "up"]
    assert [frame_number(p) for p in qa[0]["images"]] == [1, 2, 4, 5, 7, 8, 10, 11]  # 8 of 12, spread evenly
    assert qa[0]["conversations"][0]["value"].count("<image>") == 8
    assert reasons(out, "video") == ["empty text", "missing video", "too few frames"]


def test_image_edit(tmp_path):
    rng, src, out = random.Random(3), tmp_path / "edits", tmp_path / "data"
    rows = []
    for i in range(4):
        scene = random_scene(rng)
        instruction, edited = tasks.edit_instruction(rng, scene, ())
        rows.append({"id": f"e{i}", "source": f"{i}-in.png", "instruction": instruction, "target": f"{i}-out.png"})
        save(render(scene), str(src / rows[-1]["source"]))
        save(render(edited), str(src / rows[-1]["target"]))
    write_jsonl(src / "edits.jsonl", rows + [dict(rows[0], id="gone", target="nope.png"),
                                             dict(rows[0], id="blank", instruction=""),
                                             {"id": "half", "source": "0-in.png"}])
    convert("edit", "--src", src / "edits.jsonl", "--out", out, "--val", 0)
    samples = loaded(out, "train", "image_edit")
    assert [s["id"] for s in samples] == ["e0", "e1", "e2", "e3"]
    assert samples[1]["conversations"][0]["value"] == f"<image>\n{rows[1]['instruction']}"
    assert samples[1]["conversations"][1]["value"] == "<image>"
    assert samples[1]["images"] == ["../edits/1-in.png", "../edits/1-out.png"]
    assert {r["id"]: r["reason"] for r in skip_log(out, "edit")} == {"gone": "missing image", "blank": "empty text",
                                                                      "half": "missing field"}


def test_visual_thinking_saves_the_zoomed_crop(tmp_path):
    rng, src, out = random.Random(4), tmp_path / "vt", tmp_path / "data"
    rows, colours = [], []
    for i in range(3):
        (x, y), colour = rng.choice([(11, 11), (53, 32), (32, 53)]), rng.choice(list(COLOURS))
        colours.append(colour)
        save(render([{"shape": "square", "colour": colour, "size": "small", "x": x, "y": y}]), str(src / f"{i}.png"))
        rows.append({"image": f"{i}.png", "question": "What colour is the small square?", "answer": colour,
                     "box": [x - 5, y - 5, x + 5, y + 5]})
    write_jsonl(src / "vt.jsonl", rows + [dict(rows[0], box=[70, 70, 90, 90]), dict(rows[0], box="left"),
                                          dict(rows[0], image="gone.png")])
    convert("thinking", "--src", src / "vt.jsonl", "--out", out, "--val", 0)
    samples = loaded(out, "train", "visual_thinking")
    assert len(samples) == 3
    for s, colour in zip(samples, colours):
        human, gpt = (t["value"] for t in s["conversations"])
        assert human.startswith("<image>\nThink visually") and gpt == f"<image>\n{colour}"
        crop = load_image(os.path.join(out, s["images"][1]))
        assert crop.size == (64, 64) and crop.getpixel((32, 32)) == COLOURS[colour]  # the box fills the picture
        assert (np.asarray(crop) == COLOURS[colour]).all(-1).mean() > 0.5
    assert reasons(out, "thinking") == ["bad box", "bad box", "missing image"]
    crops = [s["images"][1] for s in samples]
    write_jsonl(src / "vt.jsonl", rows[1:])  # a row fewer: the other crops keep their names (the token cache's keys)
    convert("thinking", "--src", src / "vt.jsonl", "--out", out, "--val", 0)
    assert [s["images"][1] for s in loaded(out, "train", "visual_thinking")] == crops[1:]


def test_an_image_lands_in_one_split_however_its_sources_name_it(tmp_path):
    """The split hashes the image's path as the JSONL names it: a LLaVA file naming coco/x.png and a caption TSV inside
    coco/ naming ./x.png put every image in the same split."""
    src, out = tmp_path / "src", tmp_path / "data"
    pairs = pictures_with_captions(src / "coco", 40)
    names = [os.path.basename(p) for p, _ in pairs]
    write_jsonl(src / "llava.jsonl", [{"id": n, "image": f"coco/{n}", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": t}]}
        for n, (_, t) in zip(names, pairs)])
    (src / "coco" / "pairs.tsv").write_text("".join(f"./{n}\t{t}\n" for n, (_, t) in zip(names, pairs)))
    convert("llava", "--src", src / "llava.jsonl", "--images", src, "--out", out, "--val", 0.3)
    convert("pairs", "--src", src / "coco" / "pairs.tsv", "--out", out, "--val", 0.3)
    split_of = lambda task: {s["images"][0]: split for split in ("train", "val") for s in loaded(out, split, task)}
    qa, generation = split_of("image_qa"), split_of("generation")
    assert qa == generation and 0 < list(qa.values()).count("val") < 40


def test_stage2_trains_on_converted_pairs(micro, tmp_path):
    """The toy pipeline's stage 2 (encode.py, train_vpit.py) on converter output, with the micro stand-ins."""
    src, data, out = tmp_path / "pairs", tmp_path / "data", tmp_path / "out"
    pairs = pictures_with_captions(src / "img", 24, seed=5)
    (src / "pairs.jsonl").write_text("".join(json.dumps({"image": f"img/{os.path.basename(p)}", "caption": t}) + "\n"
                                             for p, t in pairs))
    convert("pairs", "--src", src / "pairs.jsonl", "--out", data, "--val", 0.3)
    siglip, llm = os.path.join(micro["base"], "siglip"), os.path.join(micro["base"], "llm")
    run("encode.py", f"--data_dir={data}", f"--out_dir={out}", f"--siglip_path={siglip}")
    n_train = len(read_jsonl(str(data / "train" / "generation.jsonl")))
    run("train_vpit.py", f"--data_dir={data}", f"--out_dir={out}", f"--llm_path={llm}", "--vpit_init=",
        f"--vpit_data={{'generation': {n_train}}}", "--vpit_val=2", "--micro_batch_size=4", "--vpit_batch_size=8",
        "--eval_interval=1000", "--vpit_lead_in={}", "--vpit_lead_out={}")
    report = json.load(open(os.path.join(out, "logs", "vpit_report.json")))
    assert set(report["val"]) == {"generation"} and report["val"]["generation"]["vision_cos"] is not None
