# Your own data, end to end (README, "Your own data"): a dataset the toy world knows nothing of, already in the
# conversation format: 64x64 grey pictures of ten objects, made by `python tests/own_data.py --out data/objects`,
# with caption, image_qa and generation conversations only. Copy this file for your data and change what it names.
#     python encode.py configs/objects.py        ... then train_adapter.py, train_vpit.py, train_decoder.py,
#     eval.py and sample.py with the same config, or all of it: python pipeline.py configs/objects.py

# ---- the base models: the toy stand-ins (python -m toy.toyworld && python -m toy.pretrain_tiny), or local HF folders -
siglip_path = "toy/base/siglip"
llm_path = "toy/base/llm"
vae_path = "toy/base/vae"
num_visual_tokens = 64

# ---- the data: data_dir/{train,val}/<task>.jsonl; image paths relative to image_root ("": data_dir) -----------------
data_dir = "data/objects"
image_root = ""
out_dir = "out/objects"
shipped_run = ""  # never the toy run the repo ships: sample.py and eval.py use this run or stop

# ---- what each stage trains on: task (file name) -> samples, -1 = all ----------------------------------------------
adapter_data = {"caption": -1}  # stage 1 (App. A.1): captions
adapter_val = 64  # val samples per task; each val/<task>.jsonl must hold that many
vpit_data = {"image_qa": -1, "generation": -1}  # stage 2 (Sec. 2.2): understanding and generation together
vpit_val = 64
vpit_epochs = 4  # one pass left image_qa at chance (32%, 1 epoch; 56% with 4: docs/devlog.md)
# the toy stand-in LLM learns to draw only from concentrated examples first (docs/devlog.md, "Generation");
# a real pretrained LLM needs no lead-in: vpit_lead_in = {}
vpit_lead_in = {"generation": -1}
vpit_lead_in_epochs = 4
decoder_data = {"caption": -1, "generation": -1, "image_qa": -1}  # the decoder learns from every training image
decoder_val = {"generation": 64}
decoder_decay_steps = 950  # train_decoder.py's 350 was measured on toy pictures alone (docs/devlog.md)

# ---- eval.py: which val files it scores (tasks missing from data_dir are left out with a note) ----------------------
eval_understanding = {"image_qa": 100}
eval_generation = {"generation": 48}

# ---- pipeline.py: no toy world to make; sample prompts at the end (prompt, picture under data_dir or "") ------------
toy_world = False
samples = [("Could you sketch a dark star for me?", ""),
           ("Which object is in this photo?", "images/val/image_qa-00000.png")]
