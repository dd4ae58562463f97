# The built-in toy world on a laptop CPU: every stage, from the stand-in base models the repo ships in toy/base
# (toy/pretrain_tiny.py made them; `rm -r toy/base && python -m toy.pretrain_tiny` makes them again).
data_dir = "data/toy"
siglip_path = "toy/base/siglip"
llm_path = "toy/base/llm"
vae_path = "toy/base/vae"
out_dir = "out/tiny"
# Stage 2's mix (Sec. 2.2) and a third departure: text-only conversations from the stand-in's corpus (train/text.jsonl,
# toy/toyworld.py), without which stage 2 forgets the facts that riddles are drawn from (docs/devlog.md, (eighth));
# of generation, whose 4,000 pairs the lead-in below has drawn 8 times, the first 2,000 (as good over three seeds, 125
# steps fewer; none at all forgets the drawing: docs/devlog.md, (eleventh))
vpit_data = {"image_qa": -1, "video_qa": -1, "generation": 2000, "image_edit": -1, "video_prediction": -1,
             "visual_thinking": -1, "text": -1}
# Its other two departures from the paper, for a 4 x 128 stand-in that learns to draw only from many concentrated
# examples (docs/devlog.md, 2026-12-06 (fifth) to (eighth)): generation alone first, at a constant lr above the mix's
# and with stage 1's adapter left as it is, then the paper's one-epoch mix; and each drawn token read back as a blank
# half the time in training, so the picture has to come from the words (each of the toy SigLIP's tokens carries the
# whole picture, so teacher forcing lets a model copy the tokens before it)
vpit_lead_in = {"generation": -1}
vpit_lead_in_epochs = 8
vpit_lead_in_lr = 1e-3
vpit_lead_in_frozen = ["adapter"]
drawn_token_dropout = 0.5
# A fourth: after the mix, a short lead-out (469 steps, warmed up and decayed again) peaking at a third of the mix's
# lr, here leaning on generation (all 4,000 pairs with 3,500 of the mix's other conversations): over three seeds,
# held-out compositions drawn +2.9 points, video_qa +5.5, image_qa and visual_thinking kept or better; the same steps
# in the mix's own proportions do about as well (docs/devlog.md, (fifteenth) and (sixteenth))
vpit_lead_out = {"generation": -1, "image_qa": 2000, "visual_thinking": 500, "video_qa": 500, "text": 500}
vpit_lead_out_lr = 1e-4
