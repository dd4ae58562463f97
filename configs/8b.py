# MetaMorph at paper scale: LLaMA-3.1-8B-Instruct + SigLIP so400m-14@384 + SD-1.5, on H100s (PAPER.md).
#   torchrun --nproc_per_node=8 ... train_vpit.py configs/8b.py        python -m tools.estimate configs/8b.py  (dry run)
# Every model is a LOCAL folder (nothing downloads from a hub): put the HF snapshots under checkpoints/.

# ---- models (PAPER.md Sec. 2, Sec. 2.3) -----------------------------------------------------------------------------
llm_path = "checkpoints/Meta-Llama-3.1-8B-Instruct"  # meta-llama/Llama-3.1-8B-Instruct
siglip_path = "checkpoints/siglip-so400m-patch14-384"  # google/siglip-so400m-patch14-384, frozen, width 1152
vae_path = "checkpoints/stable-diffusion-v1-5/vae"  # the VAE of Stable Diffusion 1.5
num_visual_tokens = 64  # Sec. 2: 27x27 SigLIP patches interpolated to 8x8

# ---- data and outputs (Sec. 2.2, App. C; conversation JSONL as in DESIGN.md) ----------------------------------------
data_dir = "data/metamorph"
out_dir = "out/8b"
shipped_run = ""  # never the toy run the repo ships: sample.py and eval.py use this run or stop
# Stage-2 mixture: task -> number of samples. The paper gives Cambrian-7M for ImageQA and <= 5M MetaCLIP pairs for
# generation; the other counts are our assumptions about the public sets it names - set them from your own data.
# Caption data is stage 1's (adapter_data, App. A.1), not in this mixture. -1 = all of a task's file (then the dry run
# cannot count it: give counts or dry_run_tokens).
vpit_data = {
    "image_qa": 7_000_000,  # Cambrian-7M ImageQA (Sec. 2.2)
    "video_qa": 500_000,  # VideoQA, frames at 1 fps, each frame an image (Sec. 2.2)
    "generation": 5_000_000,  # MetaCLIP image-text pairs as "Generate an image of ..." turns, <= 5M (Sec. 2.2)
    "image_edit": 600_000,  # image-to-image: InstructPix2Pix + Aurora (App. C)
    "video_prediction": 500_000,  # forward/partial/reverse frame prediction, temporal reordering (App. C)
    "visual_thinking": 200_000,  # "Think visually before you answer" -> zoomed crop tokens, then the answer (App. C)
}

# ---- precision and memory (released training scripts, App. A.1) ----------------------------------------------------
dtype = "bfloat16"
grad_checkpointing = True
micro_batch_size = 4  # per GPU; gradient accumulation = batch size / (micro_batch_size x GPUs)
max_seq_len = 4096

# ---- stage 1: adapter pretraining on caption data (App. A.1, Tab. 2) -----------------------------------------------
adapter_lr = 4.90e-5
adapter_weight_decay = 0.0
adapter_batch_size = 768
adapter_epochs = 1  # one pass over the captions, as LLaVA-style pretraining (the toy's 8 suit its small set)
adapter_deepspeed_config = "configs/zero2.json"

# ---- stage 2: VPiT, everything but the vision tower (App. A.1, Tab. 2: LLaMA-3.1 8B) ------------------------------
vpit_lr = 6.93e-5
vpit_weight_decay = 0.0
vpit_batch_size = 1536
vpit_epochs = 1
vpit_warmup_ratio = 0.03  # cosine schedule after a 3% warm-up (released scripts)
vision_loss_weight = 1.0  # Sec. 2: total = CE + 1.0 x (1 - cos)
deepspeed_config = "configs/zero3.json"  # ZeRO-3 on H100 (App. A.1)

# ---- cadence: from the dry run's 8,984 steps in 4.2 h = 2,151 steps/h (python -m tools.estimate configs/8b.py) -------
# Shared by stage 1, stage 2 and the decoder (train_adapter.py, train_vpit.py, train_decoder.py).
log_interval = 10  # steps between progress lines (~17 s); the log file records every step
eval_interval = 720  # a val pass every ~20 min of training, not at toy cadence
ckpt_interval = 1600  # a ZeRO-3 checkpoint (~97 GB: fp32 weights + Adam m, v) every ~45 min: what a crash can lose

# ---- diffusion visualizer: SD-1.5 finetuned on the SigLIP tokens (Sec. 2.3, App. A.2; train_decoder.py) -----------
sd_path = "checkpoints/stable-diffusion-v1-5"  # its unet/ and scheduler/ are finetuned from; its vae/ is vae_path
decoder_spatial_channels = 0  # SD-1.5 conditions through cross-attention alone, as in the paper
decoder_resolution = 512
decoder_projector_hidden = 2048  # Linear(1152, 2048) -> LayerNorm -> ReLU -> Linear(2048, 768) -> LayerNorm
decoder_data = {"generation": -1}  # images only: those of the MetaCLIP generation pairs
decoder_val = {"generation": 64}
decoder_score_scenes = False  # real pictures: no toy-world scene reader
decoder_lr = 1.1e-5
decoder_weight_decay = 0.01
decoder_warmup_steps = 2000  # logarithmic warm-up
decoder_decay_steps = 12000  # then linear decay to 0
decoder_batch_size = 2112
decoder_micro_batch_size = 33  # x 64 GPUs = 2112 (fewer GPUs: gradient accumulation)
decoder_cond_drop = 0.7  # "CFG level 0.7"
decoder_sample_steps = 50  # released sampling: 50 steps, guidance 6-12.5
decoder_guidance = 7.5
decoder_grid_interval = 500

# ---- dry-run assumptions (tools/estimate.py; train_vpit.py --dry_run=True) -------------------------------------------
gpu_count = 64  # 8 nodes x 8 H100
gpu_memory_gb = 80
gpu_peak_tflops = 989.0  # H100 SXM dense bf16
assumed_mfu = 0.4
avg_sample_tokens = 600  # mean conversation length, images included (66 positions each)
dry_run_tokens = 0  # 0: sum(vpit_data) x avg_sample_tokens x vpit_epochs

# ---- pipeline.py ----------------------------------------------------------------------------------------------------
toy_world = False  # real data and models: no toy world, no stand-ins
samples = [("Generate an image of a red apple on a wooden table.", "")]  # (prompt, picture under data_dir or "")

# ---- eval.py on real data ------------------------------------------------------------------------------------------
eval_understanding = {"image_qa": 500}  # val/<task>.jsonl as tools/prepare.py writes them (+ video_qa where converted)
eval_generation = {"generation": 200}  # no held-out or riddle sets, no scene reader: FD, SigLIP score, token cosine
