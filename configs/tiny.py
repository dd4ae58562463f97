# The built-in toy world on a laptop CPU: every stage, from the stand-in base models the repo ships in toy/base
# (toy/pretrain_tiny.py made them; `rm -r toy/base && python -m toy.pretrain_tiny` makes them again).
data_dir = "data/toy"
siglip_path = "toy/base/siglip"
llm_path = "toy/base/llm"
vae_path = "toy/base/vae"
out_dir = "out/tiny"
# Stage 2's two departures from the paper, for a 4 x 128 stand-in that learns to draw only from many concentrated
# examples (docs/devlog.md, 2026-12-06 (fifth) to (seventh)): generation alone first, at a constant lr above the mix's
# and with stage 1's adapter left as it is, then the paper's one-epoch mix; and each drawn token read back as a blank
# half the time in training, so the picture has to come from the words (each of the toy SigLIP's tokens carries the
# whole picture, so teacher forcing lets a model copy the tokens before it)
vpit_lead_in = {"generation": -1}
vpit_lead_in_epochs = 4
vpit_lead_in_lr = 1e-3
vpit_lead_in_frozen = ["adapter"]
drawn_token_dropout = 0.5
