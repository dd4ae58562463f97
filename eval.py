"""
Evaluation: the paper's claims are numbers, this makes ours (the released MetaMorph code ships none).

    python eval.py                                         # the toy run: understanding + generation -> out_dir/eval/
    python eval.py --benchmark_file=mmbench.jsonl          # also any benchmark file in the LLaVA/Cambrian eval layout

Understanding: batched greedy answers, exact match or option letter, per task and question type.
Generation (GenEval-style on the toy world): prompt -> VPiT visual tokens -> decoder -> pixels -> the toy world's scene
reader -> accuracy per attribute and per prompt, for seen prompts, held-out compositions and riddles (Sec. 4.2-4.3);
image_edit and video_prediction against their target scenes; Frechet distance in SigLIP feature space (FD-SigLIP;
standard FID when `inception_path` names a local TorchScript Inception); a CLIP-score analogue from the SigLIP
stand-in (the real CLIP score when `clip_path` names a local CLIP); cosine of predicted to true tokens, drawn freely
and, for the text-to-image sets, teacher-forced with the sample's own request and with another sample's (whether the
drawing reads the words at all). The ceiling: the same metrics on pictures decoded from the TRUE tokens, so a reader
sees what the LLM loses and what the decoder loses. A set whose val file data_dir lacks is left out with a note (the
defaults name the toy world's sets); a metric with too few pictures drawn to compute it is n/a, not a number.
"""
import json
import math
import os
import string

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import TokenCache, trained_run
from configurator import BadInput, MissingFile
from data import collate, is_correct, option_letter, output_images, questions, read_jsonl, with_options
from encode import image_tokens, load_image, load_vision_tower
from model import IMAGE, MetaMorph, build_sample
from toy.scenes import BACKGROUND, SIZE, describe, names_toy_scenes, scene_accuracy
from visualizer import Judges, decode_tokens, load_visualizer, save_grid

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
out_dir = "out/tiny"  # reads out_dir/vpit, out_dir/decoder and out_dir/tokens; writes out_dir/eval
shipped_run = "toy/run"  # used when out_dir holds no trained model (as in sample.py; "": none)
siglip_path = "toy/base/siglip"
vae_path = "toy/base/vae"
num_visual_tokens = 64
# val samples per task; the toy world's sets: a set whose val file data_dir lacks is left out, with a note
eval_understanding = {"image_qa": 200, "video_qa": 100, "visual_thinking": 64}
eval_generation = {"generation": 48, "generation_heldout": 48, "generation_riddle": 48, "image_edit": 32,
                   "video_prediction": 8}  # val samples per set (a video_prediction sample asks for 1-5 pictures)
eval_batch_size = 32
eval_max_new_images = 8  # pictures a reply may draw (video_prediction asks for up to 5); past it the turn ends
eval_max_new_tokens = 96  # text tokens of a reply: an answer, or the words around the pictures it draws (a
# picture's 64 vision steps are not text tokens); room for a sentence or two before a picture
decoder_sample_steps = 25
decoder_guidance = 1.5
seed = 0
image_root = ""  # where the JSONL's image paths start ("": data_dir; real data: tools/prepare.py's --image_root)
benchmark_file = ""  # JSONL of {"images": [...], "question": ..., "options": [...]?, "answer": ...}
benchmark_image_root = ""  # "": the benchmark file's folder
inception_path = ""  # TorchScript Inception (e.g. inception-2015-12-05.pt): adds standard FID
clip_path = ""  # a local CLIPModel folder: adds the real CLIP score
grid_rows = 12
eval_ceiling = True  # also score pictures decoded from the TRUE tokens (the decoder's ceiling); ablations skip it
device = "auto"
# ---------------------------------------------------------------------------------------------------------------------
GENERATION_SETS = ("generation", "generation_heldout", "generation_riddle")
# ---- scoring ---------------------------------------------------------------------------------------------------------
# ---- what the data holds ---------------------------------------------------------------------------------------------
def val_file(task):
    return os.path.join(data_dir, "val", f"{task}.jsonl")


def sets_in_data():
    """(understanding sets, generation sets, notes): the sets of eval_understanding and eval_generation whose val file
    data_dir has. The defaults name the toy world's sets and a user's own data holds some of them, so each set it
    lacks is left out with a one-line note, not an error; nothing left to evaluate at all is one."""
    present = lambda sets: {task: n for task, n in sets.items() if os.path.exists(val_file(task))}
    understand, draw = present(eval_understanding), present(eval_generation)
    notes = [f"left out {task} ({knob}): no {val_file(task)}" for knob, sets, kept in
             (("eval_understanding", eval_understanding, understand), ("eval_generation", eval_generation, draw))
             for task in sets if task not in kept]
    if not (understand or draw or benchmark_file):
        raise MissingFile(f"nothing to evaluate: none of the sets of eval_understanding and eval_generation has "
                          f"a val file in {os.path.join(data_dir, 'val')}, and no benchmark_file is given")
    for note in notes:
        print(note)
    return understand, draw, notes


# ---- understanding ---------------------------------------------------------------------------------------------------
def replies(model, cache, items, dev):
    """Greedy replies to (conversation, image paths) items, eval_batch_size at a time side by side in one KV cache
    (model.generate_batch), eval_max_new_tokens text tokens and eval_max_new_images pictures at most: per item, its
    pieces (text ids, image tokens, text ids, ...)."""
    out = []
    for i in tqdm(range(0, len(items), eval_batch_size), desc="generate", leave=False):
        batch = items[i:i + eval_batch_size]
        prompts = [build_sample(model.tokenizer, conv, len(paths), num_visual_tokens, add_generation_prompt=True)
                   for conv, paths in batch]
        visual = [(cache(paths) if paths else torch.zeros(0, model.vision_dim)).to(dev) for _, paths in batch]
        out += model.generate_batch([(p["input_ids"].to(dev), p["slots"].to(dev)) for p in prompts], visual,
                                    eval_max_new_tokens, max_new_images=eval_max_new_images)[0]
    return out


def answer_all(model, cache, items, dev, options=None):
    """items: (conversation, image paths, answer, type) -> list of (prediction, correct). The prediction is the text
    after the reply's last image: the whole reply to a question, the final answer of a visual-thinking reply."""
    results = []
    pieces = replies(model, cache, [(conv, paths) for conv, paths, _, _ in items], dev)
    for k, (reply, (_, _, answer, _)) in enumerate(zip(pieces, items)):
        prediction = model.tokenizer.decode(reply[-1], skip_special_tokens=True).strip()
        results.append((prediction, is_correct(prediction, answer, (options or {}).get(k, ()))))
    return results


def accuracy_by(kinds, scored):
    """(accuracy, {kind: accuracy}) of (prediction, correct) pairs, each of the kind (question type) beside it."""
    by_kind = {}
    for kind, (_, right) in zip(kinds, scored):
        by_kind.setdefault(kind, []).append(right)
    return float(np.mean([right for _, right in scored])), {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}


def understanding(model, cache, dev, sets):
    """Per task of sets (task -> samples): accuracy over all questions, over each conversation's first question, and
    per question type."""
    report = {}
    for task, n in sets.items():
        samples = read_jsonl(val_file(task))[:n]
        items = questions(task, samples)
        scored = answer_all(model, cache, items, dev)
        accuracy, by_type = accuracy_by([qtype for *_, qtype in items], scored)
        first = [right for (conv, *_), (_, right) in zip(items, scored) if len(conv) == 1]
        report[task] = {"accuracy": accuracy, "first_turn": float(np.mean(first)), "questions": len(items),
                        "by_type": by_type}
    return report


def run_benchmark_file(model, tower, processor, dev):
    """A benchmark in the LLaVA/Cambrian eval layout, scored by option letter (with options) or exact match."""
    root = benchmark_image_root or os.path.dirname(os.path.abspath(benchmark_file))
    items, options = [], {}
    for lineno, line in enumerate(open(benchmark_file), 1):
        if not line.strip():
            continue  # (a blank line, e.g. at the end)
        k = len(items)
        try:
            row = json.loads(line)
            question, answer = row["question"], row["answer"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{benchmark_file}, line {lineno}: not a benchmark row, a JSON object with `question` and "
                           f"`answer` ({e!r})") from None
        images = row.get("images", row.get("image", []))  # LLaVA's files name one picture as "image"
        images = [images] if isinstance(images, str) else images
        if row.get("options"):
            letters = string.ascii_uppercase
            question = with_options(question, row["options"])
            options[k] = row["options"]
            answer = letters[answer] if isinstance(answer, int) else answer  # an index (ScienceQA's layout)
            if option_letter(str(answer), options[k]) is None:
                raise BadInput(f"{benchmark_file}, line {lineno}: the answer {answer!r} is neither an option's letter "
                               "nor its text")
        if IMAGE not in question:
            question = f"{IMAGE}\n" * len(images) + question
        items.append(([{"from": "human", "value": question}], images, str(answer), row.get("category", "all")))
    encode = lambda paths: image_tokens(tower, processor, [load_image(os.path.join(root, p)) for p in paths],
                                        num_visual_tokens).flatten(0, 1)
    scored = answer_all(model, encode, items, dev, options)
    accuracy, by_category = accuracy_by([category for *_, category in items], scored)
    return {"file": benchmark_file, "accuracy": accuracy, "questions": len(items), "by_category": by_category,
            "predictions": [prediction for prediction, _ in scored]}


# ---- generation ------------------------------------------------------------------------------------------------------
def predicted_tokens(model, cache, samples, dev):
    """For every sample: the true tokens of its output images and the model's prediction for each (None when the
    model drew fewer images than asked for), from its greedy reply to the first turn."""
    wanted = [output_images(s) for s in samples]
    first = [(s["conversations"][:1], s["images"][:s["conversations"][0]["value"].count(IMAGE)]) for s in samples]
    drawn = replies(model, cache, first, dev)
    out = []
    for s, indices, pieces in zip(samples, wanted, drawn):
        true = cache([s["images"][i] for i in indices]).view(len(indices), num_visual_tokens, -1)
        images = pieces[1::2]
        out += [(s, i, true[j], images[j].cpu() if j < len(images) else None) for j, i in enumerate(indices)]
    return out


@torch.no_grad()
def teacher_forced_cosine(model, cache, samples, dev):
    """{"own", "other"}: the vision head's token cosine when every slot reads the true token before it (as in
    training), with each sample's own request and with the next sample's. If the model draws what the words say, the
    other request costs cosine; if it only continues the picture from the tokens already there, it costs nothing."""
    def mean_cosine(conversations):
        total = 0.0
        for i in range(0, len(samples), eval_batch_size):
            batch = list(zip(conversations, samples))[i:i + eval_batch_size]
            built = [build_sample(model.tokenizer, c, len(s["images"]), num_visual_tokens) for c, s in batch]
            tensors = collate(built, [cache(s["images"]) for _, s in batch], model.tokenizer.pad_token_id or 0)
            _, _, vision = model(**{k: v.to(dev) for k, v in tensors.items()})
            total += (1 - vision.item()) * len(batch)  # every sample here draws one picture: 64 targets each
        return total / len(samples)

    others = samples[1:] + samples[:1]
    return {"own": mean_cosine([s["conversations"] for s in samples]),
            "other": mean_cosine([o["conversations"][:1] + s["conversations"][1:] for s, o in zip(samples, others)])}


def picture_metrics(judges, pictures, which, targets, real, texts):
    """The metrics of pictures, picture j made for item which[j]: scene accuracy against the items' target scenes
    (where the data names them), and where real pictures are given (the prompt sets) the feature metrics against all
    of them. Only the pictures given count: a metric with too few is None (n/a), never a score of placeholders."""
    out = scene_accuracy(pictures, [targets[k] for k in which]) if targets else {}
    if real:
        out.update(judges.metrics(pictures, real, [texts[k] for k in which]))
    return out


def objects_right_of_all(metrics, targets, drawn):
    """The share of every object asked for that a picture shows whole; metrics["object"] is the share of those in the
    pictures drawn (items `drawn`), and a prompt answered in words draws none of its objects."""
    asked = [len(scene) for scene in targets]
    return (metrics["object"] or 0.0) * sum(asked[k] for k in drawn) / sum(asked)


def generation(model, visualizer, cache, judges, dev, sets):
    """Per set of sets (set -> samples): the share of pictures the model drew, and of those its token cosine and the
    scene accuracy, and the same of pictures decoded from the true tokens (the ceiling); for the prompt sets the
    feature metrics too. Returns (report, grid rows)."""
    report, grid = {}, []
    decode = lambda tokens: decode_tokens(visualizer, torch.stack(tokens), decoder_sample_steps, decoder_guidance,
                                          seed) if tokens else []
    for task, n in sets.items():
        samples = read_jsonl(val_file(task))[:n]
        items = predicted_tokens(model, cache, samples, dev)
        drawn = [k for k, (*_, p) in enumerate(items) if p is not None]  # the items the model drew a picture for
        pictures = decode([items[k][3] for k in drawn])  # no placeholder for a picture not drawn: it is not scored
        ceiling = decode([true for _, _, true, _ in items]) if eval_ceiling else []
        # the scene each picture should show, where the data says it (the toy world; real pictures get the rest)
        targets = [s["meta"]["scenes"][i] for s, i, _, _ in items] if names_toy_scenes(samples) else None
        cosine = [float(F.cosine_similarity(items[k][3].float(), items[k][2].float()).mean()) for k in drawn]
        report[task] = {"pictures": len(items), "drawn": len(drawn) / len(items),
                        "token_cosine": float(np.mean(cosine)) if cosine else None}
        real = texts = None
        if task in GENERATION_SETS:  # a text request, no input image: another sample's request fits
            report[task]["teacher_forced_cosine"] = teacher_forced_cosine(model, cache, samples, dev)
            real = [load_image(os.path.join(image_root or data_dir, s["images"][i])) for s, i, _, _ in items]
            prompts = [s["conversations"][0]["value"] for s, _, _, _ in items]
            # the text-image score compares a picture with words that describe it; a riddle's words do not (the
            # stand-in's text tower cannot solve it), so riddles are scored against the scene they mean, in plain words
            texts = [describe(t) for t in targets] if task == "generation_riddle" else prompts
            side, drawn_for = visualizer.decoder.resolution, dict(zip(drawn, pictures))
            blank = Image.new("RGB", (side, side), BACKGROUND)  # in the grid, a picture the model did not draw
            white = Image.new("RGB", (side, side), "white")  # eval_ceiling=False: an empty column
            rows = [(prompts[k], real[k], ceiling[k] if ceiling else white, drawn_for.get(k, blank))
                    for k in range(len(items))]
            grid += rows[:grid_rows // sum(t in GENERATION_SETS for t in sets)]
        report[task]["model"] = picture_metrics(judges, pictures, drawn, targets, real, texts)
        if targets:
            report[task]["object_of_all"] = objects_right_of_all(report[task]["model"], targets, drawn)
            report[task]["objects_asked"] = sum(map(len, targets))
        if eval_ceiling:
            report[task]["true_tokens"] = picture_metrics(judges, ceiling, range(len(items)), targets, real, texts)
    return report, grid


# ---- the report ------------------------------------------------------------------------------------------------------
def cell(metrics, key, show, count):
    """A report cell: show(value); "-" where the metric does not apply (no scenes: real data); n/a where too few
    pictures were there to compute it (None in results.json)."""
    if key not in metrics:
        return "-"
    return f"n/a ({count})" if metrics[key] is None else show(metrics[key])


def markdown(results):
    lines = ["# Evaluation", "", f"Run: `{results['run']}`. Understanding: greedy answers on val; generation: decoder "
             f"with {decoder_sample_steps} DDIM steps, guidance {decoder_guidance}."]
    lines += [""] + [f"- {note}" for note in results["left_out"]] if results["left_out"] else []
    if results["understanding"]:
        lines += ["", "## Understanding", "", "| task | questions | accuracy | first turn | by question type |",
                  "| --- | --- | --- | --- | --- |"]
    for task, r in results["understanding"].items():
        types = ", ".join(f"{t} {100 * v:.0f}%" for t, v in r["by_type"].items())
        lines.append(f"| {task} | {r['questions']} | {100 * r['accuracy']:.1f}% | {100 * r['first_turn']:.1f}% "
                     f"| {types} |")
    if "benchmark" in results:
        b = results["benchmark"]
        lines += ["", f"Benchmark file `{b['file']}`: {100 * b['accuracy']:.1f}% of {b['questions']} questions."]
    if not results["generation"]:
        return "\n".join(lines + [""])
    keys = ["position", "shape", "colour", "size", "object", "count", "scene"]
    lines += ["", "## Generation (scene accuracy read back from the pixels)", "",
              "Per object at its grid cell: position (something there), shape, colour, size, object (all three); per "
              "picture: count, scene (everything right, nothing extra). `true tokens` = the decoder's ceiling. Token "
              "cos: drawn freely; teacher-forced (every slot reads the true token before it) with the sample's own "
              "request / another sample's: no gap means the drawing does not depend on the words. The model's "
              "metrics are over the pictures it drew (`drawn`: their share); n/a: too few pictures (FD needs two).", "",
              "| set | source | drawn | token cos | teacher-forced own / other | " + " | ".join(keys) +
              " | FD-SigLIP | SigLIP score |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
    percent, three, one = (lambda v: f"{100 * v:.1f}"), "{:.3f}".format, "{:.1f}".format
    for task, r in results["generation"].items():
        for source in [k for k in ("model", "true_tokens") if k in r]:
            m = r[source]
            count = f"{round(r['drawn'] * r['pictures'])} drawn" if source == "model" else f"{r['pictures']} pictures"
            cells = " | ".join(cell(m, k, percent, count) for k in keys)
            extra = f"{cell(m, 'fd_siglip', three, count)} | {cell(m, 'siglip_score', one, count)}"
            forced = r.get("teacher_forced_cosine")
            forced = f"{forced['own']:.3f} / {forced['other']:.3f}" if forced and source == "model" else "-"
            drawn = f"{100 * r['drawn']:.0f}% | {cell(r, 'token_cosine', three, count)}" if source == "model" else \
                "- | 1.000"
            lines.append(f"| {task} | {source.replace('_', ' ')} | {drawn} | {forced} | {cells} | {extra} |")
    error = lambda r: 100 * math.sqrt(r["object_of_all"] * (1 - r["object_of_all"]) / r["objects_asked"])  # binomial
    of_all = [f"{task} {100 * r['object_of_all']:.1f} ± {error(r):.1f}%" for task, r in results["generation"].items()
              if "object_of_all" in r]
    lines += ["", "Whole objects right of all asked for (a prompt answered in words counts as wrong; ± one standard "
              "error of the share over this many objects): " + ", ".join(of_all) + "."] if of_all else []
    lines += ["", "![prompts, real, decoded from true tokens, generated](grid.png)", ""]
    return "\n".join(lines)


def main():
    understand, draw, left_out = sets_in_data()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    torch.manual_seed(seed)
    run = trained_run(out_dir, shipped_run)
    model = MetaMorph.from_pretrained(os.path.join(run, "vpit")).to(dev).eval()
    tokens = TokenCache(os.path.join(out_dir, "tokens"))
    cache = lambda paths: tokens.get_many(paths).flatten(0, 1).float()
    tower, processor = load_vision_tower(siglip_path)
    tower.to(dev)
    results = {"run": run, "left_out": left_out, "understanding": understanding(model, cache, dev, understand)}
    if benchmark_file:
        results["benchmark"] = run_benchmark_file(model, tower, processor, dev)
    results["generation"], grid = {}, []
    if draw:
        visualizer = load_visualizer(os.path.join(run, "decoder"), vae_path, dev)
        judges = Judges(tower, processor, dev, siglip_path, clip_path, inception_path)
        results["generation"], grid = generation(model, visualizer, cache, judges, dev, draw)
    eval_dir = os.path.join(out_dir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    json.dump(results, open(os.path.join(eval_dir, "results.json"), "w"), indent=1)
    save_grid(grid, os.path.join(eval_dir, "grid.png"), SIZE)
    report = markdown(results)
    open(os.path.join(eval_dir, "report.md"), "w").write(report)
    print(report)


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
