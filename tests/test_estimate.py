import json
import math
import os
import re
import subprocess
import sys

import pytest

import data
from tools import estimate
from configurator import declared_by_any_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# keys of configs/8b.py and 70b.py that train_decoder.py (issue 4, not written yet) will declare


def config_values(name):
    values = {}
    exec(open(os.path.join(ROOT, "configs", name)).read(), {}, values)
    return values


def dry_run(folder, name, size):
    """The dry run from the built-in config (the folder does not exist), with the knobs of configs/<name>."""
    path = str(folder / f"Meta-Llama-3.1-{size}-Instruct")
    cfg = {k: v for k, v in config_values(name).items() if k in estimate.DEFAULTS}
    return estimate.report(path, 1152, 64, cfg), cfg, estimate.llm_config(path)[0]


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("ckpt"), "8b.py", "8B")


def test_8b_fallback_parameter_counts(llama8b, tmp_path):
    r, _, _ = llama8b
    assert "built-in Llama-3.1-8B" in estimate.llm_config(str(tmp_path / "Meta-Llama-3.1-8B-Instruct"))[1]
    assert abs(r["llm_params"] - 8.0e9) < 0.05e9  # Llama-3.1-8B: 8.03B
    assert r["embedding_params"] == 128256 * 4096
    assert r["adapter_params"] == 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert r["vision_head_params"] == 4096 * 4096 + 4096 + 4096 * 1152 + 1152
    assert r["trainable_params"] == (r["llm_params"] + r["adapter_params"] + r["vision_head_params"]
                                     + r["new_token_params"])


def test_fallback_needs_a_size_in_the_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        estimate.llm_config(str(tmp_path / "nowhere"))
    config, source = estimate.llm_config(str(tmp_path / "Meta-Llama-3.1-70B-Instruct"))
    assert "70B" in source and (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == \
        (8192, 80, 28672)


def test_flops_per_token_formula(llama8b):
    r, cfg, config = llama8b
    T = cfg["avg_sample_tokens"]
    plain = 6 * r["matmul_params"] + 12 * 32 * 4096 * T
    assert estimate.flops_per_token(r["matmul_params"], config, T, False) == plain
    assert estimate.flops_per_token(r["matmul_params"], config, T, True) == pytest.approx(plain * 4 / 3)
    assert r["flops_per_token"] == pytest.approx(plain * 4 / 3)  # configs/8b.py checkpoints gradients


def test_memory_shards_states_over_gpus(llama8b):
    r, _, config = llama8b
    n = r["trainable_params"]
    m64 = estimate.memory_gb(config, n, 64, 4, 4096, True)
    m128 = estimate.memory_gb(config, n, 128, 4, 4096, True)
    assert m64["sharded"] == pytest.approx(16 * n / 64 / 1e9)
    assert m128["sharded"] == pytest.approx(m64["sharded"] / 2)
    assert m128["activations"] == m64["activations"] and m128["total"] < m64["total"]
    no_ckpt = estimate.memory_gb(config, n, 64, 4, 4096, False)
    assert no_ckpt["activations"] > 5 * m64["activations"]  # checkpointing keeps only the layer inputs
    assert r["fits"] and r["memory_gb"] == m64


def test_hours_linear_in_tokens_and_tokens_from_the_mixture(llama8b):
    r, cfg, _ = llama8b
    h = estimate.hours(1e9, r["flops_per_token"], 64, 989.0, 0.4)
    assert estimate.hours(3e9, r["flops_per_token"], 64, 989.0, 0.4) == pytest.approx(3 * h)
    assert estimate.hours(1e9, r["flops_per_token"], 128, 989.0, 0.4) == pytest.approx(h / 2)
    tokens = sum(cfg["vpit_data"].values()) * cfg["avg_sample_tokens"] * cfg["vpit_epochs"]
    assert r["tokens"] == tokens > 0
    gpu_seconds = cfg["gpu_count"] * cfg["gpu_peak_tflops"] * 1e12 * cfg["assumed_mfu"]
    # MFU counts the model's FLOPs, not gradient checkpointing's recomputed forward
    assert r["hours"] == pytest.approx(tokens * r["model_flops_per_token"] / gpu_seconds / 3600)
    assert r["model_flops_per_token"] == pytest.approx(r["flops_per_token"] * 3 / 4)


def test_token_cache_size_and_index_memory(llama8b):
    r, cfg, _ = llama8b
    per = estimate.images_per_conversation  # configs/8b.py keeps the default assumptions
    images = sum(n * per[task] for task, n in cfg["vpit_data"].items())
    assert r["cache_images"] == images == 7e6 + 8 * 0.5e6 + 5e6 + 2 * 0.6e6 + 8 * 0.5e6 + 2 * 0.2e6
    assert r["cache_bytes"] == images * (64 * 1152 * 2 + estimate.CACHE_INDEX_BYTES_PER_IMAGE)  # float16 + index
    assert r["index_bytes"] == 13_800_000 * data.INDEX_BYTES_PER_CONVERSATION  # every rank holds it
    one_each = estimate.token_cache({"image_qa": 10, "text": 5}, {"image_qa": 1, "text": 0}, 64, 1152)
    assert one_each == (10, 10 * (147456 + estimate.CACHE_INDEX_BYTES_PER_IMAGE))
    with pytest.raises(ValueError, match="images_per_conversation has no count for \\['ocr'\\]"):
        estimate.token_cache({"ocr": 1}, per, 64, 1152)


@pytest.mark.parametrize("name,size", [("8b.py", "8B"), ("70b.py", "70B")])
def test_cadence_follows_the_dry_run(name, size, tmp_path):
    """Checkpoint every ~45 min and val every ~20 min of stage 2's training, and the configs hold about that."""
    r, cfg, _ = dry_run(tmp_path, name, size)
    assert r["steps_per_hour"] == pytest.approx(r["steps"] / r["hours"])
    minutes = lambda steps: steps / r["steps_per_hour"] * 60
    assert minutes(r["ckpt_interval"]) == pytest.approx(estimate.CKPT_MINUTES, rel=0.05)
    assert minutes(r["eval_interval"]) == pytest.approx(estimate.EVAL_MINUTES, rel=0.05)
    assert 30 <= minutes(cfg["ckpt_interval"]) <= 60 and 15 <= minutes(cfg["eval_interval"]) <= 30
    assert r["ckpt_bytes"] == estimate.CKPT_BYTES_PER_PARAM * r["trainable_params"]
    assert estimate.round2(1604.2) == 1600 and estimate.round2(713.0) == 710 and estimate.round2(0.3) == 1


def test_knobs_a_stage_does_not_declare_come_from_its_config_file():
    c = estimate.settings({"config_file": os.path.join(ROOT, "configs", "8b.py"), "micro_batch_size": 2})
    assert c["gpu_count"] == 64 and c["micro_batch_size"] == 2 and c["vision_dim"] == estimate.vision_dim


def test_config_keys_are_declared_and_paper_values():
    for name in ("8b.py", "70b.py"):
        values = config_values(name)
        assert set(values) - declared_by_any_stage() == set(), name
    v8, v70 = config_values("8b.py"), config_values("70b.py")
    assert (v8["vpit_lr"], v8["vpit_batch_size"], v8["adapter_lr"], v8["adapter_batch_size"]) == \
        (6.93e-5, 1536, 4.90e-5, 768)
    assert v70["vpit_batch_size"] == 768
    assert v70["vpit_lr"] == pytest.approx(v8["vpit_lr"] * math.sqrt(768 / 1536), rel=1e-3)  # sqrt batch scaling
    for v in (v8, v70):  # the global batch is whole micro-batches on every GPU
        assert v["vpit_batch_size"] % (v["micro_batch_size"] * v["gpu_count"]) == 0


def test_estimate_cli_on_8b_config():
    """`python -m tools.estimate configs/8b.py` and `python train_vpit.py configs/8b.py --dry_run=True`."""
    out = subprocess.run([sys.executable, "-m", "tools.estimate", "configs/8b.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"LLM 8\.0\dB", out.stdout), out.stdout
    assert "fits in 80 GB" in out.stdout and " h on 64 GPUs" in out.stdout
    assert re.search(r"token cache: [\d.]+M images \(image_qa 7M x 1, .*\) x 64 x 1152 x 2 bytes .* TB on disk",
                     out.stdout), out.stdout
    assert "data index: 13.80M conversations x " in out.stdout and "ckpt_interval 1600 = 45 min" in out.stdout
    dry = subprocess.run([sys.executable, "train_vpit.py", "configs/8b.py", "--dry_run=True"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and re.search(r"LLM 8\.0\dB", dry.stdout), dry.stderr[-2000:]


@pytest.mark.parametrize("name,stage", [("zero3.json", 3), ("zero2.json", 2)])
def test_deepspeed_configs(name, stage):
    from deepspeed.runtime.config import DeepSpeedConfig  # no distributed init: world size 1

    d = json.load(open(os.path.join(ROOT, "configs", name)))
    zero = d["zero_optimization"]
    assert zero["stage"] == stage and zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert d["bf16"]["enabled"] is True and d["gradient_clipping"] == 1.0
    assert "optimizer" not in d and "scheduler" not in d  # the training scripts pass their own
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    d.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=6, train_batch_size=24)  # as the script does
    parsed = DeepSpeedConfig(d)
    assert parsed.zero_optimization_stage == stage and parsed.bfloat16_config.enabled
    assert parsed.gradient_clipping == 1.0 and parsed.zero_config.overlap_comm and parsed.train_batch_size == 24
    assert parsed.zero_config.gather_16bit_weights_on_model_save == (stage == 3)
