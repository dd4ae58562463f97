"""train_adapter.py and train_vpit.py end to end at micro size: both stages, resume, DDP and DeepSpeed ZeRO-3; and
data.py's reading of conversation files."""
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run
from data import read_jsonl
from common import TokenCache
from model import MetaMorph

STAGE2 = ["--vpit_data={'image_qa': 16, 'generation': 8, 'image_edit': 8}", "--vpit_val=2", "--micro_batch_size=4",
          "--vpit_batch_size=8", "--log_interval=1", "--eval_interval=1000", "--vpit_lr=0.003", "--vpit_lead_out={}",
          "--vpit_lead_in={}"]


def fresh_out(micro, tmp_path, name):
    """A new out_dir that shares the micro run's token cache."""
    out = tmp_path / name
    out.mkdir()
    os.symlink(os.path.join(micro["out_dir"], "tokens"), out / "tokens")
    return str(out)


def stage_args(micro, out):
    return [a for a in micro["args"] if not a.startswith("--out_dir")] + [f"--out_dir={out}"]


def curve(out, stage="vpit"):
    return [json.loads(line) for line in open(os.path.join(out, "logs", f"{stage}.jsonl"))]


def test_stage1_then_stage2(micro, tmp_path):
    out = fresh_out(micro, tmp_path, "both")
    run("train_adapter.py", *stage_args(micro, out), "--adapter_data={'caption': 16}", "--adapter_val=2",
        "--micro_batch_size=4", "--adapter_batch_size=8", "--adapter_epochs=4", "--log_interval=1")
    assert os.path.exists(os.path.join(out, "adapter", "metamorph.safetensors"))
    assert not os.path.exists(os.path.join(out, "ckpt", "adapter"))
    log = run("train_vpit.py", *stage_args(micro, out), *STAGE2, "--vpit_init=adapter")
    report = json.load(open(os.path.join(out, "logs", "vpit_report.json")))
    assert set(report["val"]) == {"image_qa", "generation", "image_edit"} and 0 <= report["image_qa_exact_match"] <= 1
    assert "val" in log.stdout
    model = MetaMorph.from_pretrained(os.path.join(out, "vpit"))
    # stage 2 started from stage 1's adapter, and trained it further
    from safetensors.torch import load_file

    stage1 = load_file(os.path.join(out, "adapter", "metamorph.safetensors"))["adapter.0.weight"]
    assert not torch.equal(stage1, model.adapter[0].weight)
    assert (stage1 - model.adapter[0].weight).abs().max() < 1.0
    rerun = run("train_vpit.py", *stage_args(micro, out), *STAGE2)
    assert "already holds the finished stage 2" in rerun.stdout


def test_lead_in_then_mix_then_lead_out_each_from_the_one_before(micro, tmp_path):
    """configs/tiny.py's phases: vpit_lead_in trained alone, at its own constant lr and with stage 1's adapter frozen,
    into out_dir/vpit_lead_in; the mix from it at vpit_lr, training everything, into out_dir/vpit_mix; the lead-out
    from that at its own decaying lr into out_dir/vpit, with the closing report. A finished phase is not trained
    again."""
    out = fresh_out(micro, tmp_path, "lead")
    stage1 = os.path.join(out, "adapter")  # stands in for stage 1's output: stage 2 takes its adapter
    dim = TokenCache(os.path.join(out, "tokens")).dim
    MetaMorph.from_llm(os.path.join(micro["base"], "llm"), dim).save_pretrained(stage1)
    args = [*stage_args(micro, out), *STAGE2[:-1], "--vpit_init=adapter", "--vpit_lead_in={'generation': 8}",
            "--vpit_lead_in_epochs=2", "--vpit_lead_in_lr=0.001", "--vpit_lead_in_frozen=adapter",
            "--vpit_lead_out={'generation': 16}", "--vpit_lead_out_lr=0.002"]
    bad = run("train_vpit.py", *args, "--vpit_lead_in_frozen=adaptor", check=False)
    assert bad.returncode == 2 and "names no part of the model" in bad.stderr and "Traceback" not in bad.stderr
    run("train_vpit.py", *args)
    assert [r["lr"] for r in curve(out, "vpit_lead_in")] == pytest.approx([0.001, 0.001])  # 8 conversations, 2 epochs
    assert len(curve(out, "vpit_mix")) == 4  # the mix: 32 conversations at batch 8
    assert max(r["lr"] for r in curve(out, "vpit_mix")) == pytest.approx(0.003)  # vpit_lr, decaying
    assert [r["lr"] for r in curve(out)] == pytest.approx([0.002, 0.002])  # the lead-out: 16 conversations
    report = lambda phase: json.load(open(os.path.join(out, "logs", f"{phase}_report.json")))
    assert "val" in report("vpit") and "val" not in report("vpit_mix")  # the closing report: the last phase's alone
    lead_in = os.path.join(out, "vpit_lead_in")
    before, led, after = (MetaMorph.from_pretrained(os.path.join(out, d)) for d in ("adapter", "vpit_lead_in", "vpit"))
    assert all(torch.equal(a, b) for a, b in zip(before.adapter.parameters(), led.adapter.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before.llm.parameters(), led.llm.parameters()))  # the LLM trained
    assert not torch.equal(led.adapter[0].weight, after.adapter[0].weight)  # stage 2 trains the adapter again
    marked = MetaMorph.from_pretrained(lead_in)
    with torch.no_grad():
        marked.vision_head[2].bias.fill_(7.0)
    marked.save_pretrained(lead_in)
    for phase in ("vpit_mix", "vpit"):
        shutil.rmtree(os.path.join(out, phase))
    run("train_vpit.py", *args, "--vpit_lr=0.0", "--vpit_lead_out_lr=0.0")  # lr 0: each phase ends where it started
    assert len(curve(out, "vpit_lead_in")) == 2
    final = MetaMorph.from_pretrained(os.path.join(out, "vpit"))
    assert torch.equal(final.vision_head[2].bias, torch.full_like(final.vision_head[2].bias, 7.0))


def test_interrupt_and_resume_reproduces_the_loss_curve(micro, tmp_path):
    whole, broken = fresh_out(micro, tmp_path, "whole"), fresh_out(micro, tmp_path, "broken")
    # drawn-token dropout on (configs/tiny.py's): its random draws resume where they stopped
    common = [*STAGE2, "--vpit_init=", "--ckpt_interval=2", "--drawn_token_dropout=0.5"]
    run("train_vpit.py", *stage_args(micro, whole), *common)
    run("train_vpit.py", *stage_args(micro, broken), *common, "--stop_after=2")
    assert not os.path.exists(os.path.join(broken, "vpit")) and len(curve(broken)) == 2
    resumed = run("train_vpit.py", *stage_args(micro, broken), *common)
    assert "resumed from" in resumed.stdout
    a, b = curve(whole), curve(broken)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["text_loss"] == pytest.approx(y["text_loss"], abs=1e-5)
        assert (x["vision_cos"] is None and y["vision_cos"] is None) or \
            x["vision_cos"] == pytest.approx(y["vision_cos"], abs=1e-5)
        assert x["lr"] == pytest.approx(y["lr"])


def torchrun(*args):
    return run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
               env={"OMP_NUM_THREADS": "1"})


def with_text_only_task(micro, tmp_path):
    """A copy of the micro world's conversation files plus a task of text-only conversations (as Cambrian-7M has)."""
    data = tmp_path / "world"
    shutil.copytree(micro["data_dir"], data, ignore=shutil.ignore_patterns("images"))
    os.symlink(os.path.join(micro["data_dir"], "images"), data / "images")
    for split in ("train", "val"):
        rows = [{"id": f"text-{i}", "images": [], "conversations": [
            {"from": "human", "value": f"What is {i} plus one?"}, {"from": "gpt", "value": str(i + 1)}]} for i in range(8)]
        (data / split / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(data)


def test_two_process_ddp_matches_one_process(micro, tmp_path):
    """Also with micro-batches that hold no image (length grouping puts the short text-only ones together), where the
    adapter takes no part in the step: DDP must not wait for its gradients."""
    one, two = fresh_out(micro, tmp_path, "one"), fresh_out(micro, tmp_path, "two")
    data = with_text_only_task(micro, tmp_path)
    common = [*STAGE2, "--vpit_init=", "--device=cpu", f"--data_dir={data}",
              "--vpit_data={'image_qa': 16, 'generation': 8, 'text': 8}"]
    run("train_vpit.py", *stage_args(micro, one), *common)
    torchrun("train_vpit.py", *stage_args(micro, two), *common)
    a, b = curve(one), curve(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):  # same global batch: same losses, up to the order of float sums
        assert x["text_loss"] == pytest.approx(y["text_loss"], rel=1e-4)
        assert (x["vision_cos"] is None and y["vision_cos"] is None) or \
            x["vision_cos"] == pytest.approx(y["vision_cos"], rel=1e-4, abs=1e-5)


def seed_pairing_text_only_with_images(micro, data_dir, mixture, micro_batch=4):
    """A seed whose length-grouped batches give, in some step of 2 ranks, one rank only text-only conversations
    and the other images (the case where a rank's adapter would sit out a ZeRO-3 collective)."""
    from data import length_grouped_batches, stage_data
    tokenizer = MetaMorph.from_llm(os.path.join(micro["base"], "llm"), 8).tokenizer
    train_set, _ = stage_data(data_dir, mixture, 1, tokenizer, os.path.join(micro["out_dir"], "tokens"), 1024)
    has_image = [bool(train_set.sample(i)["images"]) for i in range(len(train_set))]
    for seed in range(1337, 1400):
        batches = length_grouped_batches(train_set.lengths(), micro_batch, seed)
        images = [any(has_image[i] for i in b) for b in batches]
        if any(images[2 * s] != images[2 * s + 1] for s in range(len(batches) // 2)):
            return seed
    raise AssertionError("no seed pairs a text-only micro-batch with one with images")


def test_zero3_two_processes_with_a_text_only_micro_batch_finish_and_match_one_process(micro, tmp_path):
    """ZeRO-3 gathers the adapter's weights and reduces its gradients on every rank in every step: a rank whose
    micro-batch holds no image must still take part, or the other rank waits for ever. Also the closing exact match
    runs in lock-step on both ranks. (On gloo the old code failed at once with a collective mismatch; on NCCL it
    hangs.) fp32, and both start from the same heads (zero.Init draws fresh ones differently), so that the engine's
    steps match the plain loop's."""
    pytest.importorskip("deepspeed")
    one, two = fresh_out(micro, tmp_path, "one"), fresh_out(micro, tmp_path, "two")
    torch.manual_seed(0)
    heads = MetaMorph.from_llm(os.path.join(micro["base"], "llm"), TokenCache(os.path.join(one, "tokens")).dim)
    for out in (one, two):
        heads.save_heads(os.path.join(out, "adapter"))
    data = with_text_only_task(micro, tmp_path)
    mixture = {"image_qa": 8, "text": 8}
    seed = seed_pairing_text_only_with_images(micro, data, mixture)
    common = [*STAGE2, "--vpit_init=adapter", "--device=cpu", f"--data_dir={data}", f"--vpit_data={mixture}",
              f"--seed={seed}", "--dtype=float32"]
    run("train_vpit.py", *stage_args(micro, one), *common)
    run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_vpit.py",
        *stage_args(micro, two), *common, "--deepspeed_config=configs/zero3.json", env={"OMP_NUM_THREADS": "1"},
        timeout=600)
    a, b = curve(one), curve(two)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["text_loss"] == pytest.approx(y["text_loss"], rel=1e-4)
    report = json.load(open(os.path.join(two, "logs", "vpit_report.json")))
    assert 0 <= report["image_qa_exact_match"] <= 1


def test_deepspeed_zero3_two_processes_trains_and_saves_hf_format(micro, tmp_path):
    pytest.importorskip("deepspeed")
    out = fresh_out(micro, tmp_path, "zero3")
    args = [*stage_args(micro, out), *STAGE2, "--vpit_init=", "--device=cpu", "--deepspeed_config=configs/zero3.json",
            "--ckpt_interval=1", "--dtype=bfloat16"]  # as configs/8b.py: the LLM built in bf16 shards, the heads cast
    torchrun("train_vpit.py", *args, "--stop_after=3")  # killed after step 3: its checkpoints, the newest kept
    ckpt = os.path.join(out, "ckpt", "vpit", "deepspeed")
    assert sorted(f for f in os.listdir(ckpt) if not f.endswith(".py")) == ["global_step3", "latest"]
    torchrun("train_vpit.py", *args)  # resumes from the engine's checkpoint at step 3
    assert not os.path.exists(ckpt)
    model = MetaMorph.from_pretrained(os.path.join(out, "vpit"))
    base = MetaMorph.from_llm(os.path.join(micro["base"], "llm"), model.vision_dim)
    trained = dict(model.llm.named_parameters())
    assert all(torch.isfinite(p).all() for p in trained.values())
    changed = [n for n, p in base.llm.named_parameters() if not torch.allclose(p, trained[n])]
    assert len(changed) > len(trained) // 2  # the whole LLM trained, gathered back from its ZeRO-3 shards
    losses = [r["text_loss"] for r in curve(out)]
    assert [r["step"] for r in curve(out)] == [1, 2, 3, 4] and losses[-1] < losses[0]


@pytest.mark.parametrize("sample, error", [
    ({"conversations": [{"from": "human", "value": None}]}, "text `value`"),
    ({"conversations": [{"from": "user", "value": "hi"}]}, "`from`"),
    ({"images": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}, "list of paths"),
    ({"images": [], "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]},
     "1 <image> placeholders but 0"),
    ([1, 2], "not a conversation"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "turns out of order"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}, "empty text")])
def test_a_malformed_sample_is_an_error_naming_file_and_line(tmp_path, sample, error):
    good = {"images": [], "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(sample) + "\n")
    with pytest.raises(ValueError, match=f"task.jsonl, line 2.*{error}"):
        read_jsonl(str(path))


def test_an_image_missing_from_the_token_cache_is_one_line_and_exit_2(micro, tmp_path):
    """A user's mistake that a DataLoader worker meets mid-epoch (a conversation added after encode.py ran) ends as
    one on the command line does: one line on stderr naming file and line, exit status 2, no traceback."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(os.path.join(micro["data_dir"], split), data / split)
    captions = data / "train" / "caption.jsonl"
    rows = captions.read_text().splitlines()
    added = {**json.loads(rows[0]), "images": ["images/nowhere.png"]}
    captions.write_text("\n".join(rows + [json.dumps(added)]) + "\n")
    out = fresh_out(micro, tmp_path, "missing")
    failed = run("train_adapter.py", *stage_args(micro, out), f"--data_dir={data}", "--adapter_val=2",
                 "--micro_batch_size=4", "--adapter_batch_size=8", "--adapter_epochs=1", "--data_workers=1", check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert failed.stderr.splitlines()[-1] == (f"error: {captions}, line {len(rows) + 1}: image images/nowhere.png is "
                                              f"not in the token cache {out}/tokens: run `python encode.py`")


ZERO3_BUILD = """
import os, sys, torch, torch.distributed as dist
import common
from common import whole
from model import MetaMorph
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
dist.init_process_group("gloo")  # one rank, as torchrun would start it
hp = dict(deepspeed_config="configs/zero3.json", micro_batch_size=2, batch_size=2, grad_clip=1.0, dtype="float32")
with common.built_in_shards(hp, 1, torch.device("cpu")):
    model = MetaMorph.from_llm(sys.argv[1], 16)
layer = model.llm.model.layers[0].self_attn.q_proj.weight
table = model.llm.get_input_embeddings().weight
with whole([table]):
    delimiters_at_mean = torch.allclose(table[-2:], table[:-2].mean(0).expand(2, -1).contiguous())
print("sharded", hasattr(layer, "ds_id"), layer.numel(), "delimiters at the mean", delimiters_at_mean)
dist.destroy_process_group()
"""


def test_a_zero3_model_is_built_in_shards(micro):
    """Under a ZeRO-3 config the LLM comes out of from_pretrained already split (an empty local tensor per weight),
    and the delimiter rows, written through whole(), still start at the mean row: the way a 70B model fits."""
    pytest.importorskip("deepspeed")
    out = run(sys.executable, "-c", ZERO3_BUILD, os.path.join(micro["base"], "llm"))
    assert "sharded True 0 delimiters at the mean True" in out.stdout


def test_stage1_on_zero3_two_processes_trains_the_delimiter_rows(micro, tmp_path):
    """configs/70b.py runs stage 1 on ZeRO-3: the adapter and the input table are split across the ranks, the gradient
    mask still reaches the delimiter rows, and the heads are gathered for the save."""
    pytest.importorskip("deepspeed")
    out = fresh_out(micro, tmp_path, "stage1_zero3")
    torchrun("train_adapter.py", *stage_args(micro, out), "--adapter_data={'caption': 16}", "--adapter_val=2",
             "--micro_batch_size=4", "--adapter_batch_size=8", "--adapter_epochs=4", "--device=cpu",
             "--adapter_deepspeed_config=configs/zero3.json")
    saved = load_file(os.path.join(out, "adapter", "metamorph.safetensors"))
    start = MetaMorph.from_llm(os.path.join(micro["base"], "llm"), saved["adapter.0.weight"].shape[1])
    rows = start.llm.get_input_embeddings().weight[[start.image_start_id, start.image_end_id]]
    assert (saved["delimiters.input_embeddings"] - rows).abs().max() > 1e-4  # trained, and saved whole
    assert saved["adapter.0.weight"].shape == start.adapter[0].weight.shape


def test_exact_match_takes_text_only_conversations(micro):
    """Cambrian's image_qa files hold text-only conversations: stage 2's closing report must answer them too."""
    from common import TokenCache
    from train_vpit import exact_match
    cache = TokenCache(os.path.join(micro["out_dir"], "tokens"))
    model = MetaMorph.from_llm(os.path.join(micro["base"], "llm"), cache.dim).eval()
    text_only = {"images": [], "conversations": [{"from": "human", "value": "What is 1 plus 1?"},
                                                 {"from": "gpt", "value": "2"}]}
    with_image = read_jsonl(os.path.join(micro["data_dir"], "val", "image_qa.jsonl"))[0]
    assert 0 <= exact_match(model, [text_only, with_image], cache, torch.device("cpu")) <= 1
