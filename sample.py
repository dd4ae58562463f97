"""
Interleaved text-and-image generation from the command line (PAPER.md "Inference"). The VPiT model writes text until it
emits <image_start>, then 64 visual tokens with its vision head (each fed back through the adapter), then <image_end>
and text again; the diffusion decoder turns every generated image's tokens into pixels.

    python sample.py --prompt "Generate an image of a red circle above a blue square"
    python sample.py --image scene.png --prompt "How many shapes are there?"             # a question about an image
    python sample.py --image scene.png --prompt "<image> Make the circle blue"           # an edit
    python sample.py --image scene.png --prompt "Think visually before you answer. What colour is the circle?"
    python sample.py --chat                                      # multi-turn: the conversation and its KV cache persist
    python sample.py configs/8b.py --prompt "..."                # any trained run

An image given with --image goes where the prompt says <image>, or before the prompt when it says none.
"""
import os

import torch

from common import trained_run
from configurator import BadInput
from encode import image_tokens, load_image, load_vision_tower
from model import IMAGE, MetaMorph, build_sample, encode_text
from visualizer import decode_tokens, load_visualizer

# ---------------------------------------------------------------------------------------------------------------------
out_dir = "out/tiny"  # the run: reads out_dir/vpit and out_dir/decoder, writes out_dir/samples
shipped_run = "toy/run"  # used when out_dir holds no trained model: the finished toy run the repo ships ("": none)
siglip_path = "toy/base/siglip"  # encodes --image inputs
vae_path = "toy/base/vae"
num_visual_tokens = 64
max_seq_len = 1024  # prompt + reply, the whole chat in --chat mode
prompt = ""
image = []  # input images, repeatable: --image a.png --image b.png
chat = False
max_new_tokens = 256
max_new_images = 4  # pictures a reply may draw; each takes num_visual_tokens + 1 places of max_seq_len
temperature = 0.0  # 0: greedy
top_p = 1.0
seed = 0
decoder_sample_steps = 25
decoder_guidance = 1.5
samples_dir = ""  # "": out_dir/samples
device = "auto"
# ---------------------------------------------------------------------------------------------------------------------


def load_model(run, dev):
    return MetaMorph.from_pretrained(os.path.join(run, "vpit")).to(dev).eval()


def with_placeholders(text, n_images):
    """The user's text with one <image> per input image: as written, or all images before the text."""
    if IMAGE not in text:
        text = f"{IMAGE}\n" * n_images + text
    if text.count(IMAGE) != n_images:
        raise BadInput(f"the prompt has {text.count(IMAGE)} {IMAGE} placeholders but {n_images} images were given")
    return text


def next_turn_markup(tokenizer, text):
    """The chat markup after an assistant reply already in the KV cache: the end of that turn, the next user turn, and
    the header of the reply to it. Cut from the template's rendering around a stand-in reply, so any template works."""
    user, reply = {"role": "user", "content": "?"}, "\u2063R\u2063"  # a stand-in no template rewrites
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": reply},
                                          {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt) or reply not in full[len(prompt):]:
        raise BadInput("the chat template does not render a conversation prefix by prefix")
    return full[full.index(reply, len(prompt)) + len(reply):]


class Session:
    """One conversation: the model, the encoder for input images, the decoder for output images, and the KV cache
    that holds every turn so far, images included (paper Fig. 13, left)."""

    def __init__(self, dev):
        self.dev = dev
        run = trained_run(out_dir, shipped_run)
        self.model = load_model(run, dev)
        self.tower, self.processor = load_vision_tower(siglip_path)
        self.tower.to(dev)
        self.visualizer = load_visualizer(os.path.join(run, "decoder"), vae_path, dev)
        self.cache, self.saved = None, 0
        self.generator = torch.Generator(dev).manual_seed(seed)
        self.out = samples_dir or os.path.join(out_dir, "samples")

    def prompt_ids(self, text, n_images):
        """Input ids and slots of the next user turn (a first turn from the chat template, later ones as markup)."""
        tokenizer, n = self.model.tokenizer, self.model.num_visual_tokens
        if self.cache is None:
            turn = build_sample(tokenizer, [{"from": "human", "value": text}], n_images, n, add_generation_prompt=True)
            return turn["input_ids"], turn["slots"]
        ids, slots = encode_text(tokenizer, next_turn_markup(tokenizer, text), 0, n)
        return torch.tensor(ids), torch.tensor(slots)

    def reply(self, text, image_paths=()):
        """Generate the assistant's reply; returns its text with the saved PNG paths where the images stand."""
        text = with_placeholders(text, len(image_paths))
        images = [load_image(p) for p in image_paths]
        visual = (image_tokens(self.tower, self.processor, images, self.model.num_visual_tokens).flatten(0, 1)
                  if images else torch.zeros(0, self.model.vision_dim)).to(self.dev)
        ids, slots = self.prompt_ids(text, len(images))
        used = self.cache.get_seq_length() if self.cache is not None else 0
        pictures = max_new_images * (self.model.num_visual_tokens + 1)  # slots + <image_end>: not in max_new_tokens
        if used + len(ids) + max_new_tokens + pictures > max_seq_len:
            raise BadInput(f"prompt too long: {used} tokens of conversation so far + {len(ids)} new + "
                           f"max_new_tokens={max_new_tokens} + {pictures} for max_new_images={max_new_images} "
                           f"> max_seq_len={max_seq_len}")
        pieces, self.cache = self.model.generate(ids.to(self.dev), slots.to(self.dev), visual, max_new_tokens,
                                                 temperature, top_p, self.generator, self.cache, max_new_images)
        decode = lambda ids: self.model.tokenizer.decode(ids, skip_special_tokens=True)
        texts, paths = pieces[0::2], self.save_images(pieces[1::2])
        words = [decode(texts[0])]
        for path, text in zip(paths, texts[1:]):
            words += [f" [image: {path}] ", decode(text)]
        return "".join(words).strip()

    def save_images(self, generated):
        """Decode generated visual tokens to pixels (the diffusion visualizer) and save them as PNGs."""
        if not generated:
            return []
        os.makedirs(self.out, exist_ok=True)
        pictures = decode_tokens(self.visualizer, torch.stack(generated), decoder_sample_steps, decoder_guidance, seed)
        paths = []
        for picture in pictures:
            while os.path.exists(path := os.path.join(self.out, f"sample-{self.saved:04d}.png")):
                self.saved += 1
            picture.save(path)
            paths.append(path)
        return paths


def interactive(session):
    print("Chat with the model. Attach images with `/image path.png` lines before your message; `/quit` ends.")
    pending = list(image)  # --image files go with the first message
    while True:
        try:
            line = input("> " if not pending else f"({len(pending)} image(s))> ").strip()
        except EOFError:
            return
        if line == "/quit":
            return
        if line.startswith("/image "):
            pending.append(line[len("/image "):].strip())
            continue
        try:
            print(session.reply(line, pending))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}")
        pending = []


def main():
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    torch.manual_seed(seed)
    if not chat and not prompt:
        raise SystemExit('give a prompt: python sample.py --prompt "Generate an image of a red circle"  (or --chat)')
    session = Session(dev)
    if chat:
        return interactive(session)
    print(session.reply(prompt, image))


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
