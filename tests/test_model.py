"""model.py: sequence layout for every task kind, the dual-head loss against a hand computation, no NaN without
visual targets, and what trains in each stage."""
import os
import random

import pytest
import torch
import torch.nn.functional as F

from toy import tasks
from tools.benchmark import generate_recomputing
from common import save_atomically
from data import collate
from model import IGNORE, IMAGE_END, IMAGE_START, MetaMorph, build_sample, sample_tokens
from train_adapter import freeze_all_but_adapter

D_V, N = 32, 64


@pytest.fixture(scope="module")
def model(micro):
    torch.manual_seed(0)
    return MetaMorph.from_llm(f"{micro['base']}/llm", D_V, N)


def conversation(task, seed=0):
    turns, images, _ = tasks.TASKS[task](random.Random(seed), set())
    return [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(turns)], len(images)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_labels_and_vision_targets_for_every_task(model, task):
    tok = model.tokenizer
    conv, n_images = next(c for seed in range(50) for c in [conversation(task, seed)]
                          if len(c[0]) > 2 or task != "image_qa")  # image_qa: a multi-turn one
    s = build_sample(tok, conv, n_images, N)
    ids, labels, slots, vision = s["input_ids"], s["labels"], s["slots"], s["vision_mask"]
    replies = [t["value"] for t in conv if t["from"] == "gpt"]
    n_out = sum(r.count("<image>") for r in replies)
    n_in = n_images - n_out
    # text labels: exactly the assistant replies (images as delimiters), each with its end-of-turn markup
    labeled = tok.decode(labels[labels != IGNORE]).replace("\n", "")
    assert labeled == "".join(r.replace("<image>", IMAGE_START + IMAGE_END).replace("\n", "") + tok.eos_token
                              for r in replies)
    # every image: <image_start>, 64 slots numbered in order, <image_end>
    assert (slots >= 0).sum() == N * n_images and torch.equal(slots[slots >= 0], torch.arange(N * n_images))
    starts = (ids == model.image_start_id).nonzero().flatten()
    assert len(starts) == n_images and torch.equal(ids[starts + N + 1], torch.full((n_images,), model.image_end_id))
    # vision targets: exactly the slots of the images in the reply, never a prompt image
    assert vision.sum() == N * n_out
    assert torch.equal(slots[vision], torch.arange(N * n_in, N * n_images))
    for k, start in enumerate(starts):
        assistant_image = k >= n_in
        assert (labels[start] != IGNORE) == assistant_image and (labels[start + N + 1] != IGNORE) == assistant_image
        assert (labels[start + 1:start + N + 1] == IGNORE).all()


def test_delimiters_start_at_the_mean_row(micro):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(f"{micro['base']}/llm").get_input_embeddings().weight
    m = MetaMorph.from_llm(f"{micro['base']}/llm", D_V, N)
    rows = m.llm.get_input_embeddings().weight[[m.image_start_id, m.image_end_id]]
    assert torch.allclose(rows, base.mean(0).expand(2, -1), atol=1e-6)


def batch_of(model, tasks, seed=0):
    samples, visual = [], []
    g = torch.Generator().manual_seed(seed)
    for k, task in enumerate(tasks):
        conv, n = conversation(task, seed + k)
        samples.append(build_sample(model.tokenizer, conv, n, N))
        visual.append(F.normalize(torch.randn(n * N, D_V, generator=g), dim=-1))
    return collate(samples, visual, model.tokenizer.pad_token_id)


def test_loss_equals_a_hand_computation(model):
    batch = batch_of(model, ["generation", "image_qa", "image_edit"])
    total, text, vision = model(**batch, vision_loss_weight=0.5)
    embeds = model.embed(batch["input_ids"], batch["slots"], batch["visual_tokens"])
    out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    ce, cos, l1 = [], [], []
    for b in range(len(batch["input_ids"])):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, t] != IGNORE:  # position t-1 predicts token t
                ce.append(-out.logits[b, t - 1].log_softmax(-1)[batch["labels"][b, t]])
            if batch["vision_mask"][b, t]:
                target, predicted = batch["visual_tokens"][batch["slots"][b, t]], model.vision_head(hidden[b, t - 1])
                cos.append(1 - F.cosine_similarity(predicted, target, dim=0))
                l1.append((predicted - target).abs().mean())
    assert len(cos) == 2 * N  # the generated image and the edited image
    assert torch.allclose(text, torch.stack(ce).mean(), atol=1e-5)
    assert torch.allclose(vision, torch.stack(cos).mean(), atol=1e-5)
    assert torch.allclose(total, text + 0.5 * vision, atol=1e-6)
    _, _, vision_l1 = model(**batch, vision_loss="l1")  # Tab. 3's regression alternative
    assert torch.allclose(vision_l1, torch.stack(l1).mean(), atol=1e-5)


def test_drawn_dropout_blanks_only_drawn_inputs_and_only_in_training(model):
    batch = batch_of(model, ["generation", "image_edit"])  # the edit's input picture is read, its output drawn
    drawn = batch["slots"][:, 1:][batch["vision_mask"][:, 1:]]
    blanked = dict(batch, visual_tokens=batch["visual_tokens"].clone())
    blanked["visual_tokens"][drawn] = 0
    was_training = model.training
    model.eval()
    plain = model(**batch)[2]
    assert torch.equal(model(**batch, drawn_dropout=1.0)[2], plain)  # no dropout outside training
    model.train()
    try:
        all_dropped = model(**batch, drawn_dropout=1.0)[2]
        # every drawn token read as a blank, the targets still the true tokens; the edit's input picture untouched
        hidden = model.hidden_states(blanked["input_ids"], blanked["slots"], blanked["visual_tokens"])[:, :-1]
        predicted = model.vision_head(hidden[batch["vision_mask"][:, 1:]])
        expected = (1 - F.cosine_similarity(predicted, batch["visual_tokens"][drawn], dim=-1)).mean()
        assert torch.allclose(all_dropped, expected, atol=1e-5) and not torch.allclose(all_dropped, plain, atol=1e-3)
        assert torch.allclose(model(**batch, drawn_dropout=0.0)[2], plain, atol=1e-6)
    finally:
        model.train(was_training)


def test_no_visual_targets_gives_zero_vision_loss_not_nan(model):
    batch = batch_of(model, ["image_qa", "caption"])
    assert not batch["vision_mask"].any()
    model.zero_grad()
    total, text, vision = model(**batch)
    assert vision.item() == 0 and torch.isfinite(total)
    total.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.vision_head.parameters())
    assert model.adapter[0].weight.grad.abs().sum() > 0


def test_bf16_autocast_forward_matches_fp32(model):
    """dtype="bfloat16" (or a bf16 GPU) trains fp32 weights under autocast: the adapter's bf16 output must still go
    into the fp32 embedding rows, and the loss stay close to fp32's."""
    batch = batch_of(model, ["generation", "image_qa"])
    total, _, _ = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_bf16, _, _ = model(**batch)
    assert torch.isfinite(total_bf16) and abs(total_bf16.item() - total.item()) < 0.05 * total.item()


def test_stage1_trains_only_adapter_and_delimiter_rows(micro):
    m = MetaMorph.from_llm(f"{micro['base']}/llm", D_V, N)
    params = freeze_all_but_adapter(m)
    total, _, _ = m(**batch_of(m, ["caption", "caption"]))
    total.backward()
    emb = m.llm.get_input_embeddings().weight
    rows = torch.zeros(len(emb), dtype=torch.bool)
    rows[[m.image_start_id, m.image_end_id]] = True
    assert emb.grad[rows].abs().sum() > 0 and not emb.grad[~rows].any()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter.parameters())
    frozen = [p for p in m.parameters() if p is not emb and not any(p is q for q in m.adapter.parameters())]
    assert all(p.grad is None for p in frozen) and all(not p.requires_grad for p in m.vision_head.parameters())
    assert len(params) == len(list(m.adapter.parameters())) + 1  # tied embeddings: one table


def test_stage1_leaves_an_untied_output_table_frozen(micro):
    """Llama-3.1 unties its tables: the output rows of the delimiters are never a caption target, so stage 1 must not
    train them (PAPER.md: the adapter and, in the released code, the input embeddings)."""
    m = MetaMorph.from_llm(f"{micro['base']}/llm", D_V, N)
    m.llm.lm_head.weight = torch.nn.Parameter(m.llm.lm_head.weight.detach().clone())  # untie
    params = freeze_all_but_adapter(m)
    m(**batch_of(m, ["caption", "caption"]))[0].backward()
    out = m.llm.get_output_embeddings().weight
    assert out is not m.llm.get_input_embeddings().weight and not out.requires_grad and out.grad is None
    assert not any(p is out for p in params) and m.llm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_stage2_trains_everything(model):
    model.zero_grad()
    total, _, _ = model(**batch_of(model, ["generation", "image_qa"]))
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = MetaMorph.from_pretrained(str(tmp_path / "ckpt"))
    batch = batch_of(model, ["generation"])
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], loaded(**batch)[0], atol=1e-6)
    assert loaded.image_start_id == model.image_start_id and loaded.vision_dim == D_V


def test_kv_cache_generation_equals_recomputation(micro):
    """Greedy generate() with its KV cache, against recomputing the whole sequence at every step (benchmark.py's
    baseline, the released code's way): the same text tokens before and after a picture, allclose visual tokens."""
    model = MetaMorph.from_llm(f"{micro['base']}/llm", D_V, N)
    conv, n = conversation("generation")
    prompt = build_sample(model.tokenizer, conv[:1], 0, N, add_generation_prompt=True)
    # force an image: make <image_start> the likeliest next token after the prompt
    with torch.no_grad():
        model.llm.get_output_embeddings().weight[model.image_start_id] *= 0
        model.llm.get_output_embeddings().weight[model.image_start_id] += 50 * model.hidden_states(
            prompt["input_ids"][None], prompt["slots"][None], torch.zeros(0, D_V))[0, -1]
    args = (prompt["input_ids"], prompt["slots"], torch.zeros(0, D_V))
    cached, _ = model.generate(*args, max_new_tokens=4)
    recomputed = generate_recomputing(model, *args, max_new_tokens=4)
    assert cached[0] == recomputed[0] == [model.image_start_id] and cached[1].shape == (N, D_V)
    assert torch.allclose(cached[1], recomputed[1], atol=1e-4)
    assert cached[2] == recomputed[2] and cached[2][0] == model.image_end_id and len(cached[2]) > 1


def test_sample_tokens_greedy_and_nucleus_per_row():
    """Greedy takes each row's argmax; nucleus sampling draws each row from its own top-p set only (top_p=0.7 keeps
    the 0.5 and 0.3 tokens, never the 0.2 one), and a seeded generator repeats its draws."""
    probs = torch.zeros(2, 10)
    probs[0, [3, 6, 8]] = torch.tensor([0.5, 0.3, 0.2])
    probs[1, [1, 2, 9]] = torch.tensor([0.2, 0.5, 0.3])
    logits = probs.clamp(min=1e-9).log()
    assert sample_tokens(logits) == [3, 2]
    draws = [sample_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(k)) for k in range(200)]
    assert {d[0] for d in draws} == {3, 6} and {d[1] for d in draws} == {2, 9}
    again = [sample_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(k)) for k in range(200)]
    assert draws == again


def test_stop_ids_include_the_generation_configs_end_of_turn(model):
    """A template whose end of turn is not the tokenizer's eos (Gemma's <end_of_turn>, Llama-3's <|eot_id|>) names it in
    generation_config.eos_token_id, one id or a list: generation must stop on it too."""
    config = model.llm.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = [model.tokenizer.eos_token_id, 7]
        assert model.stop_ids() == {model.tokenizer.eos_token_id, 7}
        config.eos_token_id = 9
        assert model.stop_ids() == {model.tokenizer.eos_token_id, 9}
    finally:
        config.eos_token_id = saved


def test_save_atomically_replaces_a_folder_and_keeps_it_when_a_save_fails(tmp_path):
    path = str(tmp_path / "ckpt")

    def writer(text):
        def save(folder):
            os.makedirs(folder)
            open(os.path.join(folder, "f"), "w").write(text)
        return save
    save_atomically(writer("one"), path)
    save_atomically(writer("two"), path)
    assert open(os.path.join(path, "f")).read() == "two" and sorted(os.listdir(tmp_path)) == ["ckpt"]

    def crash(folder):
        os.makedirs(folder)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        save_atomically(crash, path)
    assert open(os.path.join(path, "f")).read() == "two"
