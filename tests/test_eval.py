"""eval.py: Frechet distance against the closed form, answer scoring edge cases, scene scoring on hand-made scenes,
batched generation against one at a time, the benchmark-file runner, the sets a dataset lacks, and metrics of too few
pictures (n/a)."""
import contextlib
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import data
import eval as ev
import visualizer
from common import TokenCache
from conftest import run
from data import collate
from encode import load_vision_tower
from model import MetaMorph, build_sample
from toy import scenes


def samples_with(mean, std, n=400, seed=0):
    """n samples whose sample mean and (unbiased) covariance are exactly mean and diag(std^2)."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T  # whitened: covariance exactly I
    return x * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)



@pytest.mark.parametrize("prediction, answer, right", [
    ("a circle", "A", False), ("A large circle", "A", True), ("I think it's C", "C", False), ("D", "D", False),
    ("circle", "B", True), ("B", "circle", True), ("(B)", "(B)", True), ("the answer is a circle", "A", False),
    ("B", "hexagon", False), ("", "hexagon", False)])
def test_option_scoring_counts_only_the_options_letters_in_upper_case(prediction, answer, right):
    """With options [square, circle, triangle]: a lower-case word is not a letter, I and D are not options, and the
    answer may be given as a letter or as an option's text; an answer that is neither matches nothing."""
    assert data.is_correct(prediction, answer, ["square", "circle", "triangle"]) is right


def test_an_options_own_text_wins_over_a_letter_it_starts_with():
    options = ["A cat", "A dog", "The bird"]
    assert data.option_letter("A dog", options) == "B" and data.is_correct("B", "A dog", options)
    assert not data.is_correct("A", "A dog", options) and data.option_letter("A.", options) == "A"

def test_frechet_distance_matches_the_closed_form_for_gaussians():
    a, b = samples_with([0.0, 1.0, 2.0], [1.0, 2.0, 0.5]), samples_with([1.0, 1.0, 0.0], [2.0, 2.0, 1.5], seed=1)
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    assert visualizer.frechet_distance(a, b) == pytest.approx(1 + 0 + 4 + (1 + 0 + 1), rel=1e-6)
    assert visualizer.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # a rotation of both sets changes nothing: the general (non-diagonal) formula
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert visualizer.frechet_distance(a @ q, b @ q) == pytest.approx(7.0, rel=1e-6)


@pytest.mark.parametrize("prediction, answer, right", [
    ("B", "B", True), ("b", "B", True), ("(b)", "B", True), ("B.", "B", True), ("B) circle", "B", True),
    ("The answer is B", "B", True), ("C", "B", False), ("Because", "B", False), ("", "B", False),
    ("Red.", "red", True), ("  bottom   LEFT ", "bottom left", True), ("red circle", "red", False),
    ("three!", "three", True), ("two", "three", False)])
def test_answer_scoring(prediction, answer, right):
    assert data.is_correct(prediction, answer) is right


def test_option_text_counts_as_its_letter():
    assert data.is_correct("triangle", "C", ["square", "circle", "triangle"])
    assert not data.is_correct("circle", "C", ["square", "circle", "triangle"])


def test_scene_scoring_on_hand_made_scenes():
    target = [{"shape": "circle", "colour": "red", "size": "large", "x": 11, "y": 11},
              {"shape": "square", "colour": "blue", "size": "small", "x": 53, "y": 53}]
    right = scenes.render(target)
    wrong_colour = scenes.render([dict(target[0], colour="green"), target[1]])
    moved = scenes.render([target[0], dict(target[1], x=32, y=32)])
    extra = scenes.render(target + [{"shape": "triangle", "colour": "yellow", "size": "large", "x": 32, "y": 32}])
    assert scenes.scene_accuracy([right], [target]) == {"position": 1, "shape": 1, "colour": 1, "size": 1,
                                                    "shape_colour": 1, "object": 1, "count": 1, "scene": 1}
    s = scenes.scene_accuracy([wrong_colour], [target])
    assert (s["colour"], s["shape"], s["position"], s["object"], s["scene"]) == (0.5, 1, 1, 0.5, 0)
    s = scenes.scene_accuracy([moved], [target])
    assert (s["position"], s["shape"], s["count"], s["scene"]) == (0.5, 0.5, 1, 0)
    s = scenes.scene_accuracy([extra], [target])
    assert (s["object"], s["count"], s["scene"]) == (1, 0, 0)
    assert scenes.scene_accuracy([right, moved], [target, target])["scene"] == 0.5


def test_metrics_of_too_few_pictures_are_na_not_numbers():
    """None drawn: every metric of the model's pictures is None in the results and "n/a (0 drawn)" in the report (they
    were scores of blank placeholders); one drawn: its scores, but no Frechet distance (a covariance needs two)."""
    judges = visualizer.Judges.__new__(visualizer.Judges)  # stand-ins for the feature spaces: no model is loaded
    judges.siglip, judges.inception, judges.clip = "siglip", None, None
    judges.pooled = lambda pictures: torch.randn(len(pictures), 3, generator=torch.Generator().manual_seed(7))
    judges.text_score = lambda judge, pictures, texts: 25.0
    targets = [[{"shape": "circle", "colour": "red", "size": "large", "x": 11, "y": 11}]] * 3
    real, texts = [scenes.render(scene) for scene in targets], ["Draw a red circle at the top left."] * 3
    every = ev.picture_metrics(judges, real, range(3), targets, real, texts)
    none = ev.picture_metrics(judges, [], [], targets, real, texts)
    one = ev.picture_metrics(judges, real[:1], [2], targets, real, texts)
    assert isinstance(every["fd_siglip"], float) and every["scene"] == 1
    assert none == dict.fromkeys(every)  # the same metrics, each n/a
    assert one["fd_siglip"] is None and (one["siglip_score"], one["scene"]) == (25, 1)
    assert ev.objects_right_of_all(none, targets, []) == 0 and ev.objects_right_of_all(one, targets, [2]) == 1 / 3
    results = {"run": "out/x", "left_out": [], "understanding": {}, "generation": {
        "generation": {"pictures": 3, "drawn": 0.0, "token_cosine": None, "model": none, "true_tokens": every,
                       "object_of_all": 0.0, "objects_asked": 3},
        "generation_heldout": {"pictures": 3, "drawn": 1 / 3, "token_cosine": 0.5, "model": one, "true_tokens": every,
                               "object_of_all": 1 / 3, "objects_asked": 3}}}
    report = ev.markdown(results)
    row = lambda start: next(line for line in report.splitlines() if line.startswith(start))
    assert row("| generation | model | 0% |").count("n/a (0 drawn)") == 1 + 7 + 2  # token cos, scenes, FD, score
    assert row("| generation_heldout | model | 33% |").count("n/a") == 1 and "| n/a (1 drawn) | 25.0 |" in report
    assert "n/a" not in row("| generation | true tokens |") and "## Understanding" not in report
    shares = row("Whole objects right of all asked for").split("): ")[1]
    assert shares == "generation 0.0 ± 0.0%, generation_heldout 33.3 ± 27.2%."  # 27.2: sqrt(1/3 * 2/3 / 3)


def test_sets_without_a_val_file_are_left_out_with_a_note(tmp_path, monkeypatch, capsys):
    """The default sets are the toy world's: data that has some of them is evaluated on those, with a note for each
    set it lacks; data that has none of them (and no benchmark file) is an error."""
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "image_qa.jsonl").write_text("")
    monkeypatch.setattr(ev, "data_dir", str(tmp_path))
    understand, draw, notes = ev.sets_in_data()
    assert (understand, draw) == ({"image_qa": ev.eval_understanding["image_qa"]}, {})
    assert [note.split()[2] for note in notes] == ["video_qa", "visual_thinking", *ev.eval_generation]
    assert capsys.readouterr().out.splitlines() == notes
    (tmp_path / "val" / "image_qa.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="nothing to evaluate"):
        ev.sets_in_data()
    monkeypatch.setattr(ev, "benchmark_file", "bench.jsonl")
    assert ev.sets_in_data()[:2] == ({}, {})


@pytest.fixture(scope="module")
def model(micro):
    torch.manual_seed(0)
    dim = TokenCache(f"{micro['out_dir']}/tokens").dim
    return MetaMorph.from_llm(f"{micro['base']}/llm", dim).eval()


@pytest.mark.parametrize("draw", [False, True])
def test_batched_generation_equals_one_at_a_time(micro, model, draw):
    """model.generate_batch (eval's replies) on prompts of different lengths, left-padded into one KV cache, gives
    each row what generate() gives it alone: 2 text tokens; or (draw) on even rows, a picture after each of them,
    while the odd rows write text and finish, so rows in different modes share every step."""
    cache = TokenCache(f"{micro['out_dir']}/tokens")
    samples = ev.read_jsonl(f"{micro['data_dir']}/val/image_qa.jsonl")
    items = data.questions("image_qa", samples)[:6]  # different lengths: left padding is exercised
    prompts = [build_sample(model.tokenizer, c, len(p), 64, add_generation_prompt=True) for c, p, _, _ in items]
    visual = [cache.get_many(p).flatten(0, 1).float() for _, p, _, _ in items]
    assert len({len(p["input_ids"]) for p in prompts}) > 1
    drawing = [i for i in range(len(prompts)) if draw and i % 2 == 0]
    rows = drawing  # the rows of the current batch whose LM head says <image_start>

    def opens(module, inputs, logits):
        logits = logits.clone()
        logits[rows, model.image_start_id] = 1e4
        return logits
    model.stop_ids = lambda: set()  # an untrained model may end at once: make every row write all its tokens
    hook = model.llm.get_output_embeddings().register_forward_hook(opens)
    try:
        batched, _ = model.generate_batch([(p["input_ids"], p["slots"]) for p in prompts], visual, max_new_tokens=2)
        for i, (p, v, pieces) in enumerate(zip(prompts, visual, batched)):
            rows = [0] if i in drawing else []
            alone, _ = model.generate(p["input_ids"], p["slots"], v, max_new_tokens=2)
            assert pieces[0::2] == alone[0::2] and len(pieces) == len(alone) == (5 if i in drawing else 1)
            assert sum(map(len, pieces[0::2])) == (4 if i in drawing else 2)  # <image_end>s are not counted
            for mine, its in zip(pieces[1::2], alone[1::2]):
                assert mine.shape == (64, model.vision_dim) and torch.allclose(mine, its, atol=1e-4)
    finally:
        del model.stop_ids
        hook.remove()



@contextlib.contextmanager
def row_0_always_draws(micro, model):
    """Two image_qa prompts and their visual tokens, with the LM head patched so that row 0 opens a picture whenever
    it writes and row 1 never does, and nothing ends a turn early: yields (prompts as generate_batch takes them,
    visual tokens)."""
    cache = TokenCache(f"{micro['out_dir']}/tokens")
    items = data.questions("image_qa", ev.read_jsonl(f"{micro['data_dir']}/val/image_qa.jsonl"))[:2]
    built = [build_sample(model.tokenizer, c, len(p), 64, add_generation_prompt=True) for c, p, _, _ in items]

    def opens(module, inputs, logits):
        logits = logits.clone()
        logits[0, model.image_start_id] = 1e4
        logits[1:, model.image_start_id] = -1e4
        return logits
    model.stop_ids = lambda: set()
    hook = model.llm.get_output_embeddings().register_forward_hook(opens)
    try:
        yield [(p["input_ids"], p["slots"]) for p in built], [cache.get_many(p).flatten(0, 1).float()
                                                              for _, p, _, _ in items]
    finally:
        del model.stop_ids
        hook.remove()


def test_batched_generation_with_rows_in_both_modes_under_bf16_autocast(micro, model):
    """Under bf16 autocast the adapter's output is bf16 while the embedding rows are fp32: a step where one row draws
    and another writes text must still mix them (it raised a dtype error in index_put)."""
    with row_0_always_draws(micro, model) as (prompts, visual), torch.autocast("cpu", dtype=torch.bfloat16):
        pieces, _ = model.generate_batch(prompts, visual, max_new_tokens=2)
    assert len(pieces[0]) == 5 and all(image.shape == (64, model.vision_dim) for image in pieces[0][1::2])
    assert len(pieces[1]) == 1 and len(pieces[1][0]) == 2


def test_a_row_that_never_stops_drawing_ends_at_max_new_images(micro, model):
    """A picture costs one text token of max_new_tokens but 65 steps: a row opening picture after picture (eval's
    video_prediction once drew 96 in one reply) must end its turn where a picture past max_new_images would begin,
    while the row beside it writes on."""
    with row_0_always_draws(micro, model) as (prompts, visual):
        unlimited, limited = (model.generate_batch(prompts, visual, max_new_tokens=5, max_new_images=limit)[0]
                              for limit in (None, 2))
    assert len(unlimited[0][1::2]) == 5 and len(limited[0][1::2]) == 2
    assert limited[0][-1] == [model.image_end_id]  # the turn ended after the second picture, nothing opened
    assert limited[1] == unlimited[1] and len(limited[1][0]) == 5


def test_questions_cover_every_turn_with_earlier_answers_given():
    sample = {"images": ["a.png"], "meta": {"qtypes": ["colour", "count"]}, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]}
    (c1, p1, a1, t1), (c2, p2, a2, t2) = data.questions("image_qa", [sample])
    assert (len(c1), p1, a1, t1) == (1, ["a.png"], "red", "colour")
    assert (len(c2), c2[1]["value"], p2, a2, t2) == (3, "red", ["a.png"], "two", "count")


def test_benchmark_file_runner(micro, model, tmp_path, monkeypatch):
    """A LLaVA/Cambrian-layout file: options become lettered lines and the letter prompt, images go before the
    question, and the accuracy is the scoring of the predictions it returns."""
    val = ev.read_jsonl(f"{micro['data_dir']}/val/image_qa.jsonl")
    rows = [{"images": val[0]["images"], "question": "What shape is it?", "options": ["circle", "square"],
             "answer": "B", "category": "shape"},
            {"images": val[1]["images"], "question": "What colour is it?", "answer": "red", "category": "colour"},
            {"image": val[2]["images"][0], "question": "How many shapes?", "options": ["one", "two", "three"],
             "answer": 0, "category": "count"}]  # LLaVA's one "image" and ScienceQA's answer index
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen, real = [], model.generate_batch
    monkeypatch.setattr(model, "generate_batch", lambda prompts, visual, n, **limits: seen.extend(prompts) or real(
        prompts, visual, n, **limits))
    monkeypatch.setattr(ev, "benchmark_file", str(path))
    monkeypatch.setattr(ev, "benchmark_image_root", micro["data_dir"])
    tower, processor = load_vision_tower(f"{micro['base']}/siglip")
    result = ev.run_benchmark_file(model, tower, processor, torch.device("cpu"))
    assert result["questions"] == 3 and set(result["by_category"]) == {"shape", "colour", "count"}
    texts = [model.tokenizer.decode(ids) for ids, _ in seen]
    assert "A. circle" in texts[0] and "B. square" in texts[0] and data.OPTION_PROMPT in texts[0]
    assert "A." not in texts[1] and data.OPTION_PROMPT not in texts[1]
    assert all((slots >= 0).sum() == 64 for _, slots in seen)
    assert texts[1].index("<image_end>") < texts[1].index("What colour")
    answers = ["B", "red", "A"]
    expected = [data.is_correct(pred, a, r.get("options", ())) for pred, a, r in zip(result["predictions"], answers, rows)]
    assert result["accuracy"] == pytest.approx(sum(expected) / 3)
    rows[0]["answer"] = "hexagon"  # neither a letter nor an option: an error, not a question nobody can get right
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="line 1: the answer 'hexagon'"):
        ev.run_benchmark_file(model, tower, processor, torch.device("cpu"))
    path.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(ValueError, match="bench.jsonl, line 2: not a benchmark row"):
        ev.run_benchmark_file(model, tower, processor, torch.device("cpu"))


def test_teacher_forced_cosine_with_own_and_another_request(micro, model):
    """"own" is 1 - the training loss's vision term on the same samples; "other" swaps in the next sample's request
    only: the same when every request is the same, different (the micro LLM reads its words) when they differ."""
    cache = TokenCache(f"{micro['out_dir']}/tokens")
    tokens = lambda paths: cache.get_many(paths).flatten(0, 1).float()
    samples = ev.read_jsonl(f"{micro['data_dir']}/val/generation.jsonl")[:4]
    assert len({s["conversations"][0]["value"] for s in samples}) == 4
    built = [build_sample(model.tokenizer, s["conversations"], len(s["images"])) for s in samples]
    batch = collate(built, [tokens(s["images"]) for s in samples], model.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        _, _, vision = model(**batch)
    result = ev.teacher_forced_cosine(model, tokens, samples, torch.device("cpu"))
    assert result["own"] == pytest.approx(1 - vision.item(), abs=1e-5)
    assert abs(result["own"] - result["other"]) > 1e-4
    same = [{**s, "conversations": samples[0]["conversations"][:1] + s["conversations"][1:]} for s in samples]
    again = ev.teacher_forced_cosine(model, tokens, same, torch.device("cpu"))
    assert again["own"] == pytest.approx(again["other"], abs=1e-6)


def test_inception_features_take_pictures_of_any_size(tmp_path):
    """Real benchmark pictures differ in size: each is resized to the detector's 299 x 299 before stacking."""
    class Detector(torch.nn.Module):  # StyleGAN-ADA's TorchScript interface: uint8 NCHW in, features out
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.stack([x.float().mean((1, 2, 3)), torch.tensor(float(x.shape[-1])).expand(len(x))], 1)
    torch.jit.script(Detector()).save(str(tmp_path / "inception.pt"))
    judges = visualizer.Judges.__new__(visualizer.Judges)
    judges.inception, judges.dev = torch.jit.load(str(tmp_path / "inception.pt")), torch.device("cpu")
    pictures = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (512, 512), "white")]
    features = judges.inception_features(pictures)
    assert features.shape == (2, 2) and features[:, 1].tolist() == [299, 299] and features[0, 0] < features[1, 0]


def test_eval_command_on_a_micro_run(micro, micro_run):
    """`python eval.py` end to end on untrained micro models: every understanding task and generation set is scored
    on the samples asked for, the ceiling and the feature metrics included, and the report, the results and the
    grid are written."""
    run("eval.py", *micro_run["args"], f"--data_dir={micro['data_dir']}", "--eval_max_new_tokens=4",
        "--eval_understanding={'image_qa': 4, 'video_qa': 2, 'visual_thinking': 2}", "--grid_rows=3",
        "--eval_generation={'generation': 4, 'generation_heldout': 4, 'generation_riddle': 4, 'image_edit': 2, "
        "'video_prediction': 2}")
    folder = os.path.join(micro_run["out"], "eval")
    results = json.load(open(os.path.join(folder, "results.json")))
    asked = {t: len(data.questions(t, ev.read_jsonl(f"{micro['data_dir']}/val/{t}.jsonl")[:n]))
             for t, n in (("image_qa", 4), ("video_qa", 2), ("visual_thinking", 2))}  # every turn of a conversation
    assert {t: r["questions"] for t, r in results["understanding"].items()} == asked and asked["image_qa"] > 4
    generation = results["generation"]
    frames = sum(len(data.output_images(s)) for s in ev.read_jsonl(f"{micro['data_dir']}/val/video_prediction.jsonl")[:2])
    assert {s: r["pictures"] for s, r in generation.items()} == \
        {"generation": 4, "generation_heldout": 4, "generation_riddle": 4, "image_edit": 2, "video_prediction": frames}
    for name in ("generation", "generation_riddle"):
        assert {"fd_siglip", "siglip_score", "scene"} <= set(generation[name]["true_tokens"])
    report = open(os.path.join(folder, "report.md")).read()
    assert "## Understanding" in report and "| generation_riddle | true tokens |" in report
    assert Image.open(os.path.join(folder, "grid.png")).height == 20 + 3 * (2 * scenes.SIZE + 4)


def test_eval_command_on_real_layout_data(micro, micro_run, tmp_path):
    """Data as prepare.py writes it, or a user's own: two of the toy's sets, no toy-world meta (no scene reader, no
    question types), pictures under an image_root of their own. eval.py with the default sets leaves out (and notes)
    the sets the data lacks and scores what it can; a model that draws nothing (no text tokens to open a picture
    with) has n/a for every metric of its pictures, not scores of placeholders, while its true tokens are scored."""
    data, pictures = tmp_path / "data", tmp_path / "pictures"
    pictures.mkdir()
    os.symlink(os.path.join(micro["data_dir"], "images"), pictures / "images")
    for task in ("generation", "image_qa"):
        (data / "val").mkdir(parents=True, exist_ok=True)
        rows = [{k: v for k, v in s.items() if k != "meta"}
                for s in ev.read_jsonl(f"{micro['data_dir']}/val/{task}.jsonl")[:4]]
        (data / "val" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    shutil.copytree(micro_run["out"], out, symlinks=True, ignore=shutil.ignore_patterns("eval"))
    printed = run("eval.py", *micro_run["args"], f"--out_dir={out}", f"--data_dir={data}", f"--image_root={pictures}",
                  "--eval_max_new_tokens=0").stdout
    results = json.load(open(out / "eval" / "results.json"))
    left_out = ["video_qa", "visual_thinking", "generation_heldout", "generation_riddle", "image_edit",
                "video_prediction"]
    assert [note.split()[2] for note in results["left_out"]] == left_out
    assert all(note in printed for note in results["left_out"])
    assert set(results["understanding"]) == {"image_qa"} and set(results["generation"]) == {"generation"}
    assert set(results["understanding"]["image_qa"]["by_type"]) == {"image_qa"}
    generation = results["generation"]["generation"]
    assert (generation["pictures"], generation["drawn"], generation["token_cosine"]) == (4, 0, None)
    assert generation["model"] == {"fd_siglip": None, "siglip_score": None}  # no scene scores: no toy scenes
    assert all(isinstance(generation["true_tokens"][k], float) for k in ("fd_siglip", "siglip_score"))
    report = open(out / "eval" / "report.md").read()
    assert "| generation | model | 0% | n/a (0 drawn) | " in report and "| n/a (0 drawn) | n/a (0 drawn) |" in report
    assert "left out video_qa (eval_understanding)" in report and "nan" not in report
