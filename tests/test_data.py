"""data.py, the streaming data path: a few bytes a conversation up front, lengths estimated for batching, rows read and
tokenized on demand (in DataLoader workers), over-long conversations skipped and counted, bad rows named by file and
line, and an index cached beside the run."""
import json
import os

import numpy as np
import pytest

import data
from data import Conversations, batch_loader, length_grouped_batches, stage_data
from common import open_token_cache
from model import IGNORE, MetaMorph


@pytest.fixture(scope="module")
def tokenizer(micro):
    return MetaMorph.from_llm(f"{micro['base']}/llm", 8).tokenizer


@pytest.fixture(scope="module")
def cache(micro):
    return open_token_cache(os.path.join(micro["out_dir"], "tokens"))


def train_files(micro, tasks=("image_qa", "generation", "image_edit", "video_qa")):
    return [(os.path.join(micro["data_dir"], "train", f"{t}.jsonl"), -1) for t in tasks]


def test_index_holds_offsets_and_estimates_close_to_the_exact_lengths(micro, tokenizer, cache):
    conversations = Conversations(train_files(micro), tokenizer, cache, max_seq_len=4096)
    exact = np.array([len(conversations[i][0]["input_ids"]) for i in range(len(conversations))])
    estimates = conversations.lengths()
    assert len(estimates) == len(exact) > 40
    assert np.median(np.abs(estimates - exact) / exact) < 0.1  # good enough to group by
    assert np.corrcoef(estimates, exact)[0, 1] > 0.95
    per_conversation = sum(a.nbytes for a in (conversations.offsets, conversations.estimates)) / len(conversations)
    assert per_conversation <= data.INDEX_BYTES_PER_CONVERSATION


def test_mixture_takes_the_first_n_lines_and_names_their_lines(micro, tokenizer, cache, tmp_path):
    path = os.path.join(micro["data_dir"], "train", "image_qa.jsonl")
    rows = open(path).read().splitlines()
    conversations = Conversations([(path, 5)], tokenizer, cache, 4096)
    assert len(conversations) == 5 and conversations.sample(4) == json.loads(rows[4])
    with pytest.raises(ValueError, match="asks for 1000 samples"):
        Conversations([(path, 1000)], tokenizer, cache, 4096)


def test_a_bad_row_is_an_error_naming_file_and_line(micro, tokenizer, cache, tmp_path):
    """Checked in the startup scan (before step 1, not hours in); an image missing from the cache when reached."""
    good = open(os.path.join(micro["data_dir"], "train", "image_qa.jsonl")).readline()
    path = tmp_path / "task.jsonl"
    path.write_text(good * 3 + '{"conversations": [{"from": "gpt", "value": "a"}]}\n' + good)
    with pytest.raises(ValueError, match="task.jsonl, line 4.*turns out of order"):
        Conversations([(str(path), -1)], tokenizer, cache, 4096)
    path.write_text(good * 3 + "\n")
    with pytest.raises(ValueError, match="task.jsonl, line 4: empty line"):
        Conversations([(str(path), -1)], tokenizer, cache, 4096)
    missing = json.loads(good)
    missing["images"] = ["nowhere.png"]
    path.write_text(json.dumps(missing) + "\n")
    with pytest.raises(FileNotFoundError, match="task.jsonl, line 1: image nowhere.png is not in the token cache"):
        Conversations([(str(path), -1)], tokenizer, cache, 4096)[0]


def test_over_long_conversations_are_skipped_and_counted(micro, tokenizer, cache):
    conversations = Conversations(train_files(micro, ("image_qa", "video_qa")), tokenizer, cache, 4096)
    lengths = [len(conversations[i][0]["input_ids"]) for i in range(len(conversations))]
    cut = sorted(lengths)[len(lengths) // 2]
    short = Conversations(train_files(micro, ("image_qa", "video_qa")), tokenizer, cache, cut)
    longer = [i for i, n in enumerate(lengths) if n > cut]
    fits = [i for i, n in enumerate(lengths) if n <= cut]
    batch = short.batch([fits[0], longer[0], fits[1]])
    assert (batch["kept"], batch["skipped"]) == (2, 1) and len(batch["input_ids"]) == 2
    none_fit = short.batch(longer[:3])  # still a batch, so every rank steps, but one that trains nothing
    assert (none_fit["kept"], none_fit["skipped"]) == (0, 3)
    assert (none_fit["labels"] == IGNORE).all() and not none_fit["vision_mask"].any()


def test_workers_build_the_same_batches_in_order(micro, tokenizer, cache):
    conversations = Conversations(train_files(micro), tokenizer, cache, 4096)
    batches = length_grouped_batches(conversations.lengths(), 4, seed=3)
    in_process = [conversations.batch(b) for b in batches]
    for got, want in zip(batch_loader(conversations, batches, num_workers=2), in_process, strict=True):
        assert got.keys() == want.keys()
        assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)


def test_length_grouped_batches_cover_every_sample_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(10, 1000, 5000)
    batches = length_grouped_batches(lengths, 16, seed=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    assert all(np.array_equal(a, b) for a, b in zip(batches, length_grouped_batches(lengths, 16, seed=1)))
    padded = lambda bs: sum(lengths[b].max() * len(b) for b in bs) / lengths.sum()
    assert padded(batches) < 1.05 < 1.5 < padded(data.random_batches(5000, 16, seed=1))
    assert length_grouped_batches([], 16, seed=1) == []


def test_the_line_index_is_cached_beside_the_run(micro, tokenizer, tmp_path, monkeypatch):
    index_dir = str(tmp_path / "index")
    tokens = os.path.join(micro["out_dir"], "tokens")
    first, _ = stage_data(micro["data_dir"], {"image_qa": -1}, 2, tokenizer, tokens, 4096, index_dir=index_dir)
    assert len(os.listdir(index_dir)) == 2  # train and val image_qa
    monkeypatch.setattr(data, "scan_lines", lambda path: pytest.fail(f"{path} scanned again"))
    again, val = stage_data(micro["data_dir"], {"image_qa": -1}, 2, tokenizer, tokens, 4096, index_dir=index_dir)
    assert np.array_equal(first.offsets, again.offsets) and len(val["image_qa"]) == 2
    assert first.cache is val["image_qa"].cache  # one token cache per process
