"""sample.py: command-line parsing, where input images go, the clear errors, a whole run, and a chat whose KV cache
carries every turn (generated images included) exactly as a from-scratch pass over the whole conversation would."""
import copy
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import sample
from configurator import configure
from conftest import run
from encode import image_tokens, load_image
from model import encode_text


class ImageOpener(torch.nn.Module):
    """An LM head that always makes <image_start> the likeliest token, so an untrained micro model draws at once."""

    def __init__(self, head, image_start_id):
        super().__init__()
        self.head, self.image_start_id = head, image_start_id

    def forward(self, hidden):
        logits = self.head(hidden).clone()
        logits[..., self.image_start_id] += 1e4
        return logits


@pytest.fixture
def session(micro_run, micro, monkeypatch):
    for key, value in [("out_dir", micro_run["out"]), ("siglip_path", f"{micro['base']}/siglip"),
                       ("vae_path", f"{micro['base']}/vae"), ("decoder_sample_steps", 2), ("max_new_tokens", 3)]:
        monkeypatch.setattr(sample, key, value)
    load_model = sample.load_model

    def drawing_model(run, dev):
        model = load_model(run, dev)
        model.llm.set_output_embeddings(ImageOpener(model.llm.get_output_embeddings(), model.image_start_id))
        return model

    monkeypatch.setattr(sample, "load_model", drawing_model)
    return sample.Session(torch.device("cpu"))


def val_image(micro, task="image_edit"):
    return os.path.join(micro["data_dir"], "images", "val", task, f"val-{task}-000000-0.png")


def test_cli_parsing_keeps_a_prompt_with_spaces_and_collects_images():
    g = {"prompt": "", "image": [], "chat": False, "temperature": 0.0}
    configure(g, ["--prompt", "Generate an image of a red circle above a blue square", "--image", "a.png",
                  "--image=b c.png", "--chat", "--temperature=0.7"])
    assert g["prompt"] == "Generate an image of a red circle above a blue square"
    assert g["image"] == ["a.png", "b c.png"] and g["chat"] is True and g["temperature"] == 0.7
    g = {"prompt": "", "image": []}
    configure(g, ["--prompt=3"])  # a string knob stays a string, even when it reads as a number
    assert g["prompt"] == "3" and g["image"] == []


def test_the_edit_path_places_the_input_image_before_the_instruction(session):
    tok = session.model.tokenizer
    for text in ["Make the circle blue", "<image> Make the circle blue"]:
        ids, slots = session.prompt_ids(sample.with_placeholders(text, 1), 1)
        decoded = tok.decode(ids)
        assert decoded.index("<image_start>") < decoded.index("<image_end>") < decoded.index("Make the circle")
        assert (slots >= 0).sum() == 64 and slots[slots >= 0].tolist() == list(range(64))
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        sample.with_placeholders("<image> and <image>", 1)


def test_reply_shows_the_saved_picture_where_it_stands(session):
    reply = session.reply("Draw a red circle in the center")
    assert reply.startswith("[image: ")
    path = reply[len("[image: "):reply.index("]")]
    assert os.path.dirname(path) == session.out and Image.open(path).size == (64, 64)


def test_command_line_run(micro_run, micro):
    """The whole path from the shell: config, model, vision tower and decoder load; a question about an image."""
    out = run("sample.py", *micro_run["args"], "--max_new_tokens=3", "--prompt", "What colour is the square?", "--image", val_image(micro))
    assert "Traceback" not in out.stderr


def test_without_a_trained_run_the_shipped_one_answers_and_says_so(micro_run, micro, tmp_path):
    """An out_dir with no model: sample.py uses shipped_run (the repo's toy run; here the micro run stands in for it)
    and names it on stderr; with a trained model in out_dir it says nothing of the kind."""
    out = run("sample.py", *micro_run["args"], "--max_new_tokens=3", f"--out_dir={tmp_path}",
              f"--shipped_run={micro_run['out']}", "--prompt", "What colour is the square?", "--image", val_image(micro))
    assert f"using the shipped toy run in {micro_run['out']}" in out.stderr  # (and it ran: run() checks the exit)
    out = run("sample.py", *micro_run["args"], "--max_new_tokens=3", f"--shipped_run={tmp_path}", "--prompt", "hi")
    assert "shipped" not in out.stderr


def test_clear_errors(micro_run, micro, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    common = [*micro_run["args"], "--max_new_tokens=3"]
    cases = [[f"--out_dir={tmp_path}", "--shipped_run=", "--prompt", "hi"],
             ["--prompt", "hi", f"--image={bad}"], ["--prompt", "hi", f"--image={tmp_path}/missing.png"],
             ["--prompt", "a long prompt " * 50, "--max_seq_len=64"]]
    with ThreadPoolExecutor(2) as pool:
        untrained, corrupt, missing, too_long = pool.map(lambda a: run("sample.py", *common, *a, check=False), cases)
    for out in (untrained, corrupt, missing, too_long):  # a user's mistake: one line on stderr, exit 2, no traceback
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.splitlines()[-1].startswith("error: "), out.stderr[-2000:]
    assert "python train_vpit.py" in untrained.stderr and str(tmp_path) in untrained.stderr
    assert "cannot read image" in corrupt.stderr and str(bad) in corrupt.stderr
    assert "image not found" in missing.stderr
    assert "prompt too long" in too_long.stderr and "max_seq_len=64" in too_long.stderr


def test_the_length_check_leaves_room_for_every_picture_a_reply_may_draw(session, monkeypatch):
    """max_new_tokens counts text tokens only; a picture adds 65 positions, and a reply may draw max_new_images of
    them, which must all fit in max_seq_len. The model here opens a picture at every text token: it stops at the
    limit (max_new_tokens=3 alone would let it draw 3)."""
    monkeypatch.setattr(sample, "max_new_images", 2)
    ids, _ = session.prompt_ids("Draw a red circle.", 0)
    monkeypatch.setattr(sample, "max_seq_len", len(ids) + sample.max_new_tokens + 129)  # one place short
    with pytest.raises(ValueError, match="130 for max_new_images=2"):
        session.reply("Draw a red circle.")
    monkeypatch.setattr(sample, "max_seq_len", len(ids) + sample.max_new_tokens + 130)
    assert session.reply("Draw a red circle.").count("[image:") == 2


def test_chat_keeps_every_turn_in_the_kv_cache(session, micro):
    """Turn 2 on the cache of turn 1 (a question and a generated picture) gives what generate() gives on the whole
    conversation at once: turn-1 prompt + its reply's tokens and picture + the next-turn markup."""
    model = session.model
    first_ids, first_slots = session.prompt_ids(sample.with_placeholders("What is this?", 1), 1)
    assert "[image: " in session.reply("What is this?", [val_image(micro)])
    # the same turn 1 from scratch, written out as ids, slots and visual tokens
    visual = [image_tokens(session.tower, session.processor, [load_image(val_image(micro))]).flatten(0, 1)]
    ids, slots = first_ids.tolist(), first_slots.tolist()
    for k, piece in enumerate(model.generate(first_ids, first_slots, visual[0], 3)[0]):
        if k % 2:  # a generated picture: its slots index the visual tokens after those so far
            start = sum(len(v) for v in visual)
            ids, slots = ids + [0] * 64, slots + list(range(start, start + 64))
            visual.append(piece)
        else:
            ids, slots = ids + piece, slots + [-1] * len(piece)
    markup_ids, markup_slots = encode_text(model.tokenizer, sample.next_turn_markup(model.tokenizer, "And now?"), 0)
    expected, _ = model.generate(torch.tensor(ids + markup_ids), torch.tensor(slots + markup_slots),
                                 torch.cat(visual), 3)
    cached, _ = model.generate(torch.tensor(markup_ids), torch.tensor(markup_slots), torch.zeros(0, model.vision_dim),
                               3, past_key_values=copy.deepcopy(session.cache))
    assert session.cache.get_seq_length() == len(ids)
    assert len(cached) == len(expected) > 1
    for k, (got, want) in enumerate(zip(cached, expected)):
        assert torch.allclose(got, want, atol=1e-4) if k % 2 else got == want
    assert "[image: " in session.reply("And now?")  # the session's own second turn
    assert session.cache.get_seq_length() > len(ids) + len(markup_ids)


def test_a_fresh_clone_answers_and_draws_with_the_shipped_weights(tmp_path):
    """The repo's own weights (toy/base stand-ins, toy/run), nothing trained: a question about a toy picture gets a
    colour word, and a drawing request a PNG, with stderr naming the shipped run."""
    from toy import scenes
    picture = tmp_path / "q.png"
    scenes.render([{"shape": "square", "colour": "blue", "size": "large", "x": 32, "y": 11}]).save(picture)
    out = run("sample.py", f"--out_dir={tmp_path}/out", "--prompt", "What colour is the square?", "--image", str(picture))
    assert "using the shipped toy run in toy/run" in out.stderr and out.stdout.strip() in scenes.COLOURS
    out = run("sample.py", f"--out_dir={tmp_path}/out", "--prompt", "Generate an image of a large red circle in the center.")
    drawn = os.listdir(tmp_path / "out" / "samples")
    assert len(drawn) == 1 and f"[image: {tmp_path}/out/samples/{drawn[0]}]" in out.stdout
    assert Image.open(tmp_path / "out" / "samples" / drawn[0]).size == (64, 64)
