"""What the rollout and rethinking tests share: prompts of different shapes, and the check of every
recorded log-prob against two computations: the trainer's `logprobs` on the padded batch, and a
plain reference that encodes each prompt alone (no padding, no repeated images) and runs one full
forward without a cache, the model computing its own positions."""
import torch
from PIL import Image, ImageDraw

import data
import reward
import rollout

TOL = 1e-5  # fp32


def picture(size, colour):
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    return img


# Different image sizes (16 and 6 image tokens), one or two images, plain and multiple-choice
# questions: prompts of different lengths, so the batch is left-padded by different amounts.
RECORDS = [
    data.Record("plain-112", [picture((112, 112), (220, 40, 40))], "What colour is the shape?", "red"),
    data.Record("mc-56x84", [picture((56, 84), (40, 80, 220))], "Which shape is in the image?", "A",
                choices=["circle", "square", "triangle"]),
    data.Record("two-images", [picture((112, 112), (40, 170, 60)), picture((56, 84), (235, 210, 40))],
                "How many shapes are in the images?", "2"),
]


def always_right(*_):
    """A grader that calls every response right."""
    return reward.Grade(correct=True, reward=1.0, boxed=True, valid=True)


def reference_logprobs(model, processor, rec, response_ids, temperature):
    """Log-probs of one response the plain way (see the module docstring)."""
    enc = data.encode_prompts(processor, [rec])
    n = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"][0], response_ids])[None]
    mm = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(response_ids)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=mm, pixel_values=enc["pixel_values"],
                       image_grid_thw=enc["image_grid_thw"], use_cache=False).logits[0, n - 1:-1] / temperature
    logits[:, rollout.special_ids(processor.tokenizer, rollout.VISION_TOKENS)] = float("-inf")
    return logits.log_softmax(-1).gather(1, response_ids[:, None])[:, 0]


def check_logprobs(model, processor, ro, records, g, temperature, banned):
    """Recorded log-probs == trainer's forward == reference, on every real token of every row."""
    with torch.no_grad():
        trained = rollout.logprobs(model, ro.prompts, ro.response_ids, ro.response_mask, temperature, banned)
    assert (trained - ro.logp).abs().max() <= TOL
    for i in range(len(ro.texts)):
        n = int(ro.response_mask[i].sum())
        ref = reference_logprobs(model, processor, records[i // g], ro.response_ids[i, :n], temperature)
        assert (ref - ro.logp[i, :n]).abs().max() <= TOL, i


def is_stop(tok, t):
    return int(t) in rollout.special_ids(tok, rollout.STOP_TOKENS)
