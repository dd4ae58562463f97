"""
MetaMorph (PAPER.md Sec. 2): any HF causal LM + an adapter that reads visual tokens + a vision head that predicts them.

    conversation + its visual tokens --build_sample--> input ids, image slots, text labels, vision targets
    --embed--> LLM --> text head: cross-entropy on assistant text
                   +-> vision head: 1 - cos on the 64 slots of every image inside an assistant turn

Every image is `<image_start>` + 64 slots + `<image_end>`; the hidden state at position t-1 predicts the token at t, for
text (LM head) and for visual tokens (vision head) alike. generate() switches heads at `<image_start>` and keeps a KV
cache in both modes; generate_batch() runs many sequences side by side, each row in its own mode (eval.py draws 32 at
a time).

The diffusion visualizer (Sec. 2.3) that turns 64 tokens back into pixels is in visualizer.py.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import broadcast_from_rank0, save_atomically, whole
from configurator import BadInput, MissingFile

IMAGE, IMAGE_START, IMAGE_END = "<image>", "<image_start>", "<image_end>"
IGNORE = -100
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def mlp(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class MetaMorph(nn.Module):
    def __init__(self, llm, tokenizer, vision_dim, num_visual_tokens=64):
        super().__init__()
        d = llm.config.hidden_size
        self.llm, self.tokenizer = llm, tokenizer
        self.vision_dim, self.num_visual_tokens = vision_dim, num_visual_tokens
        self.adapter = mlp(vision_dim, d, d)  # Sec. 2: Linear(1152, d) -> GELU -> Linear(d, d)
        self.vision_head = mlp(d, d, vision_dim)  # released code: Linear(d, d) -> GELU -> Linear(d, 1152)
        self.image_start_id, self.image_end_id = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])

    # ---- building, saving, loading -----------------------------------------------------------------------------------
    @classmethod
    def from_llm(cls, llm_path, vision_dim, num_visual_tokens=64, dtype=torch.float32):
        """A pretrained LLM (a local folder) + new image delimiters + a fresh adapter and vision head."""
        if not os.path.isdir(llm_path):
            raise MissingFile(f"LLM not found at {llm_path} (the toy stand-in: `python -m toy.pretrain_tiny`)")
        tokenizer = AutoTokenizer.from_pretrained(llm_path)
        llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
        vocab = len(tokenizer)
        tokenizer.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
        # (some LLMs pad their embedding table beyond the tokenizer: never shrink it; built in ZeRO-3 shards, a weight's
        # own shape is empty and ds_shape is the whole one)
        rows = getattr(llm.get_input_embeddings().weight, "ds_shape", llm.get_input_embeddings().weight.shape)[0]
        llm.resize_token_embeddings(max(len(tokenizer), rows), mean_resizing=False)
        tables = {llm.get_input_embeddings().weight, llm.get_output_embeddings().weight}
        with torch.no_grad(), whole(tables):  # released code: new rows = mean of the existing rows
            for w in tables:
                w[ids] = w[:vocab].mean(0)
        return cls(llm, tokenizer, vision_dim, num_visual_tokens)

    def save_pretrained(self, path, state_dict=None):
        """path/llm (save_pretrained: weights, config, tokenizer) + path/metamorph.safetensors + path/metamorph.json.
        Written to a temporary folder first, so a crash leaves the previous checkpoint intact. state_dict: the whole
        model's weights when its modules hold only shards (ZeRO-3: the engine gathers them, train_vpit.py)."""
        def save(tmp):
            llm_state = {k[4:]: v for k, v in state_dict.items() if k.startswith("llm.")} if state_dict else None
            self.llm.save_pretrained(os.path.join(tmp, "llm"), state_dict=llm_state)
            self.tokenizer.save_pretrained(os.path.join(tmp, "llm"))
            self.save_heads(tmp, state_dict)

        save_atomically(save, path)

    def delimiter_rows(self, state_dict=None):
        """The trainable rows of stage 1 besides the adapter: <image_start>, <image_end> in the embedding table(s),
        read from the parameters or from a state dict of the whole model."""
        ids = [self.image_start_id, self.image_end_id]
        state, name = state_dict or self.state_dict(), {}
        for n, w in self.named_parameters(remove_duplicate=False):
            name.setdefault(id(w), n)  # a tied table's first name, the one every state dict keeps
        inputs, outputs = self.llm.get_input_embeddings().weight, self.llm.get_output_embeddings().weight
        rows = {"input_embeddings": state[name[id(inputs)]][ids]}
        if outputs is not inputs:  # untied
            rows["output_embeddings"] = state[name[id(outputs)]][ids]
        return rows

    def save_heads(self, path, state_dict=None):
        """Everything that is not the LLM: adapter, vision head and the delimiter rows (metamorph.safetensors), and
        the sizes (metamorph.json). Stage 1's whole checkpoint; stage 2 adds the LLM beside it."""
        os.makedirs(path, exist_ok=True)
        state = state_dict or self.state_dict()
        tensors = {k: v for k, v in state.items() if k.startswith(("adapter.", "vision_head."))}
        tensors.update({f"delimiters.{k}": v for k, v in self.delimiter_rows(state).items()})
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                  os.path.join(path, "metamorph.safetensors"))
        with open(os.path.join(path, "metamorph.json"), "w") as f:
            json.dump({"vision_dim": self.vision_dim, "num_visual_tokens": self.num_visual_tokens}, f)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        if not os.path.exists(os.path.join(path, "metamorph.json")):
            raise MissingFile(f"no MetaMorph checkpoint at {path} (metamorph.json missing)")
        meta = json.load(open(os.path.join(path, "metamorph.json")))
        llm_dir = os.path.join(path, "llm")
        model = cls(AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype), AutoTokenizer.from_pretrained(llm_dir),
                    meta["vision_dim"], meta["num_visual_tokens"])
        model.load_heads(path, parts=("adapter", "vision_head"))  # the delimiter rows are in the LLM already
        return model.to(dtype)

    def load_heads(self, path, parts=("adapter", "vision_head", "delimiters")):
        state = load_file(os.path.join(path, "metamorph.safetensors"))
        part = lambda name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if "adapter" in parts:
            self.adapter.load_state_dict(part("adapter"))
        if "vision_head" in parts:
            self.vision_head.load_state_dict(part("vision_head"))
        if "delimiters" in parts:
            rows, ids = part("delimiters"), [self.image_start_id, self.image_end_id]
            inputs, outputs = self.llm.get_input_embeddings().weight, self.llm.get_output_embeddings().weight
            with torch.no_grad(), whole([inputs, outputs]):
                inputs[ids] = rows["input_embeddings"].to(inputs.dtype)
                if "output_embeddings" in rows:
                    outputs[ids] = rows["output_embeddings"].to(outputs.dtype)

    # ---- the forward pass and the dual-head loss ---------------------------------------------------------------------
    def embed(self, input_ids, slots, visual_tokens):
        """Token embeddings, with adapter(visual token) at every image slot (slots >= 0 index visual_tokens). The
        adapter runs even when there is no image (on none): under ZeRO-3 every rank must gather and reduce its
        weights in every step, whatever its micro-batch holds (DESIGN.md, "Scale contracts")."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        adapted = self.adapter(visual_tokens.to(embeds.dtype)).to(embeds.dtype)  # (.to: autocast makes it bf16)
        is_slot = slots >= 0
        if not is_slot.any():
            return embeds + adapted.sum() * 0  # (a sum over nothing: the adapter joins the graph, changes nothing)
        embeds = embeds.clone()
        embeds[is_slot] = adapted[slots[is_slot]]
        return embeds

    def hidden_states(self, input_ids, slots, visual_tokens, attention_mask=None):
        """The LLM's last hidden states (after its final norm): the input of the LM head and of the vision head."""
        embeds = self.embed(input_ids, slots, visual_tokens)
        return self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, slots, visual_tokens, labels, vision_mask, attention_mask=None,
                vision_loss_weight=1.0, vision_loss="cosine", drawn_dropout=0.0, generator=None):
        """(total, text loss, vision loss). Sec. 2: total = CE + weight x (1 - cos); targets shifted by one.
        vision_loss="l1": mean absolute error instead of 1 - cos (the regression Tab. 3 compares against).
        drawn_dropout: in training, each token the model draws is read back as a blank (zeros) at its own slot with this
        probability (drawn with generator); its target is unchanged (not in the paper: the toy's departure)."""
        text_labels, vision_at = labels[:, 1:], vision_mask[:, 1:]
        drawn = slots[:, 1:][vision_at]  # the visual tokens that are targets
        read = visual_tokens
        if drawn_dropout and self.training:
            read = visual_tokens.clone()
            read[drawn[torch.rand(len(drawn), generator=generator, device=drawn.device) < drawn_dropout]] = 0
        hidden = self.hidden_states(input_ids, slots, read, attention_mask)[:, :-1]
        is_text = text_labels != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[is_text]).float()
        text_loss = F.cross_entropy(logits, text_labels[is_text]) if is_text.any() else logits.sum() * 0
        predicted = self.vision_head(hidden[vision_at]).float()
        targets = visual_tokens[drawn].float()
        # a batch without visual targets: 0 (sum over nothing), never the NaN of an empty mean
        per_token = (predicted - targets).abs().mean(-1) if vision_loss == "l1" else \
            1 - F.cosine_similarity(predicted, targets, dim=-1)
        vision = per_token.sum() / max(len(targets), 1)
        return text_loss + vision_loss_weight * vision, text_loss, vision

    # ---- generation with a KV cache ----------------------------------------------------------------------------------
    def stop_ids(self):
        """Token ids that end the assistant's turn: the tokenizer's eos, the LLM's generation_config eos (one id or a
        list: Gemma's <end_of_turn>, Llama-3's <|eot_id|>) and <|eot_id|> when the tokenizer has it."""
        tok, configured = self.tokenizer, getattr(self.llm.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        return {tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>"), *configured} - {None, tok.unk_token_id}

    @torch.no_grad()
    def generate(self, input_ids, slots, visual_tokens, max_new_tokens=64, temperature=0.0, top_p=1.0,
                 generator=None, past_key_values=None, max_new_images=None):
        """Continue one sequence (generate_batch with a batch of one). Returns (pieces, cache)."""
        pieces, past_key_values = self.generate_batch([(input_ids, slots)], [visual_tokens], max_new_tokens,
                                                      temperature, top_p, generator, past_key_values,
                                                      max_new_images=max_new_images)
        return pieces[0], past_key_values

    @torch.no_grad()
    def generate_batch(self, prompts, visual_tokens, max_new_tokens=64, temperature=0.0, top_p=1.0, generator=None,
                       past_key_values=None, lockstep=False, max_new_images=None):
        """Continue sequences side by side in one KV cache, left-padded. prompts: (input_ids, slots) pairs of 1-D
        tensors; visual_tokens: per prompt, the (n_images * num_visual_tokens, d) tokens its slots index. Each row runs
        its own course: text mode until `<image_start>`; then num_visual_tokens steps of vision mode
        (v = normalize(vision_head(h)), next input = adapter(v)); then `<image_end>` and text again (Sec. 2), until it
        ends its turn, has sampled max_new_tokens text tokens, or would open a picture past max_new_images (None: no
        limit; a picture costs num_visual_tokens steps but one text token, so a row that never stops drawing runs
        ~65x longer than max_new_tokens suggests). Returns (pieces per row, cache): pieces alternate lists of token ids
        and (num_visual_tokens, vision_dim) images. past_key_values: the cache an earlier call returned for one row,
        to go on with that conversation (sample.py --chat). lockstep: every rank of a process group runs this call on
        the same prompts (ZeRO-3: each forward gathers weights from all of them): rank 0's tokens are every rank's, so
        all take the same steps in the same modes and none waits alone."""
        decoder, head, token_embedding = self.llm.get_decoder(), self.llm.get_output_embeddings(), \
            self.llm.get_input_embeddings()
        stop, n = self.stop_ids(), len(prompts)
        assert past_key_values is None or n == 1, "a conversation goes on one row at a time"
        ids, slots, mask, visual = left_padded(prompts, visual_tokens, self.tokenizer.pad_token_id or 0)
        if past_key_values is not None:  # a conversation goes on: the new turn follows the cached ones
            mask = torch.cat([mask.new_ones(n, past_key_values.get_seq_length()), mask], 1)
        padded = bool((mask == 0).any())  # if not, the plain causal path: no mask and positions at every step

        def step(embeds):
            nonlocal past_key_values, mask
            masking = dict(attention_mask=mask, position_ids=mask.cumsum(-1)[:, -embeds.shape[1]:].clamp(min=1) - 1) \
                if padded else {}
            out = decoder(inputs_embeds=embeds, past_key_values=past_key_values, use_cache=True, **masking)
            past_key_values = out.past_key_values
            if padded:
                mask = torch.cat([mask, mask.new_ones(n, 1)], 1)  # the next input's column
            return out.last_hidden_state[:, -1]

        h = step(self.embed(ids, slots, visual))
        pieces, text, image = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        sampled, state = [0] * n, ["text"] * n  # "text", "image" (drawing), "close" (<image_end> next) or "done"
        while True:
            tokens = sample_tokens(head(h).float(), temperature, top_p, generator) if "text" in state else None
            if lockstep and tokens is not None:
                tokens = broadcast_from_rank0(tokens, h.device)
            v = F.normalize(self.vision_head(h).float(), dim=-1) if "image" in state else None
            feed, drawing = [0] * n, []  # the token id each row reads next; rows drawing read adapter(v) instead
            for i in range(n):
                if state[i] == "image":  # v[i] is this step's visual token and the row's next input
                    image[i].append(v[i])
                    drawing.append(i)
                    if len(image[i]) == self.num_visual_tokens:
                        pieces[i] += [text[i], torch.stack(image[i])]
                        text[i], image[i], state[i] = [], [], "close"
                elif state[i] == "close":  # <image_end> after the last visual token, then text again
                    text[i], feed[i], state[i] = [self.image_end_id], self.image_end_id, "text"
                elif state[i] == "text":
                    token = tokens[i] if sampled[i] < max_new_tokens else None
                    if token == self.image_start_id and len(pieces[i]) // 2 == max_new_images:
                        token = None  # its pictures are all drawn: the turn ends where another would begin
                    if token is None or token in stop:
                        pieces[i].append(text[i])
                        state[i] = "done"
                        continue
                    sampled[i] += 1
                    text[i].append(token)
                    feed[i] = token
                    if token == self.image_start_id:
                        state[i] = "image"
            if all(s == "done" for s in state):
                return pieces, past_key_values
            if len(drawing) == n:
                embeds = self.adapter(v.to(h.dtype))[:, None]
            else:
                embeds = token_embedding(torch.tensor(feed, device=h.device))[:, None]
                if drawing:
                    embeds[drawing] = self.adapter(v[drawing].to(embeds.dtype)).to(embeds.dtype)[:, None]
            h = step(embeds)


def sample_tokens(logits, temperature=0.0, top_p=1.0, generator=None):
    """(n, vocab) logits -> n token ids: greedy when temperature is 0, else nucleus sampling. One host sync for the
    whole batch (a GPU waits once a step, not once a row)."""
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    probs = F.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_probs * (sorted_probs.cumsum(-1) - sorted_probs < top_p)
    picked = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, picked)[:, 0].tolist()


# ---- conversation -> tensors -----------------------------------------------------------------------------------------
def chat_segments(tokenizer, conversations, add_generation_prompt=False):
    """The chat template's text cut into (text, is_assistant) pieces: assistant pieces are the replies with their
    end-of-turn markup, the only text that gets a loss. Works with any tokenizer.apply_chat_template.
    add_generation_prompt: end with the header of the assistant turn to be generated."""
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            segments.append((prompt[len(done):], False))
            done = prompt
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not full.startswith(done):
            raise BadInput("the chat template does not render conversations prefix by prefix")
        segments.append((full[len(done):], m["role"] == "assistant"))
        done = full
    if add_generation_prompt:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        segments.append((prompt[len(done):], False))
    return [(text, assistant) for text, assistant in segments if text]


def encode_text(tokenizer, text, first_image=0, num_visual_tokens=64):
    """Text with <image> placeholders -> (ids, slots). Each placeholder becomes <image_start> + num_visual_tokens slots
    + <image_end>; the slots of the i-th image (counting from first_image) index visual tokens i*n ... i*n + n-1, and
    hold the pad id in ids. Everything else has slot -1."""
    start_id, end_id = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n, ids, slots = num_visual_tokens, [], []
    for k, piece in enumerate(text.split(IMAGE)):
        if k > 0:  # an <image> stood before this piece
            image = first_image + k - 1
            ids += [start_id] + [pad] * n + [end_id]
            slots += [-1] + list(range(image * n, (image + 1) * n)) + [-1]
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids += piece_ids
        slots += [-1] * len(piece_ids)
    return ids, slots


def build_sample(tokenizer, conversations, num_images, num_visual_tokens=64, add_generation_prompt=False):
    """One conversation -> dict of 1-D tensors of one length:
    input_ids (slots hold the pad id), slots (index of the visual token at each image slot, else -1),
    labels (text targets: assistant text and image delimiters, else IGNORE),
    vision_mask (True on the slots of images inside assistant turns: the vision-loss targets).
    add_generation_prompt: a prompt for generate(), ending where the assistant's reply begins."""
    ids, slots, labels, vision, images = [], [], [], [], 0
    for text, assistant in chat_segments(tokenizer, conversations, add_generation_prompt):
        seg_ids, seg_slots = encode_text(tokenizer, text, images, num_visual_tokens)
        images += text.count(IMAGE)
        ids += seg_ids
        slots += seg_slots
        labels += [i if assistant and s < 0 else IGNORE for i, s in zip(seg_ids, seg_slots)]  # delimiters included
        vision += [assistant and s >= 0 for s in seg_slots]
    if images != num_images:
        raise BadInput(f"{images} <image> placeholders but {num_images} images")
    return {"input_ids": torch.tensor(ids), "slots": torch.tensor(slots), "labels": torch.tensor(labels),
            "vision_mask": torch.tensor(vision)}


def left_padded(prompts, visual_tokens, pad_id):
    """(input_ids, slots) prompts and their visual tokens -> (ids, slots, attention_mask), (B, T) left-padded for
    generation, and the visual tokens concatenated, which the slots are shifted to index (as in collate)."""
    length = max(len(p_ids) for p_ids, _ in prompts)
    ids = torch.full((len(prompts), length), pad_id, device=prompts[0][0].device)
    slots, mask = torch.full_like(ids, -1), torch.zeros_like(ids)
    offset = 0
    for i, ((p_ids, p_slots), v) in enumerate(zip(prompts, visual_tokens)):
        ids[i, length - len(p_ids):], mask[i, length - len(p_ids):] = p_ids, 1
        slots[i, length - len(p_ids):] = torch.where(p_slots >= 0, p_slots + offset, -1)
        offset += len(v)
    return ids, slots, mask, torch.cat(visual_tokens)


