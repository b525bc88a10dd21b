"""tiny.py: the embedded Qwen2.5-VL reloads offline as a normal model folder, its processor puts one
image token per merged patch, and the warm-started base follows the format at chance accuracy."""
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

import data
import procs
import reward
import rollout
import tiny
import toy

ROOT = Path(__file__).resolve().parent.parent

RELOAD = """
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
sys.path.insert(0, ".")
import data
src = sys.argv[1]
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(src)
rec = data.Record(id="x", images=[Image.new("RGB", (112, 112), (220, 40, 40))], question="What colour is the shape?", answer="red")
batch = data.encode_prompts(processor, [rec])
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({"processor": type(processor).__name__, "shape": list(logits.shape),
                  "finite": bool(torch.isfinite(logits).all())}))
"""


def test_reloads_offline_as_a_plain_model_folder_and_runs_with_an_image(tiny_model):
    src = tiny.resolve()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = procs.run([sys.executable, "-c", RELOAD, src], 300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # AutoProcessor must give the whole processor (images too), not just the tokenizer
    assert res["processor"] == "Qwen2_5_VLProcessor" and res["finite"]
    assert res["shape"][0] == 1 and res["shape"][2] == tiny_model[0].config.text_config.vocab_size
    info = json.loads((Path(src) / "vlr_tiny.json").read_text())
    assert info["fingerprint"] == tiny.fingerprint()


def test_image_tokens_match_the_image_grid(tiny_model):
    _, processor = tiny_model
    sizes = [(112, 112), (56, 84), (300, 200)]  # the last one is shrunk to the pixel budget
    recs = [data.Record(id=str(i), images=[Image.new("RGB", s, (40, 80, 220))], question="Which?", answer="a")
            for i, s in enumerate(sizes)]
    batch = data.encode_prompts(processor, recs)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size ** 2
    per_row = (batch["input_ids"] == pad).sum(1).tolist()
    assert per_row == (batch["image_grid_thw"].prod(-1) // merge).tolist()
    assert (batch["mm_token_type_ids"] == 1).sum(1).tolist() == per_row
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    assert batch["image_grid_thw"][0].tolist() == [1, 8, 8]  # 112 px / 14 px patches: 16 tokens after 2x2 merge
    h, w = batch["image_grid_thw"][2, 1:].tolist()
    assert h * w * 14 * 14 <= tiny.MAX_PIXELS


def test_the_tokenizer_build_is_deterministic():
    a, b = tiny.build_processor().tokenizer, tiny.build_processor().tokenizer
    assert a.get_vocab() == b.get_vocab() and len(a) == tiny.VOCAB_SIZE
    assert all(a.convert_tokens_to_ids(t) == i for i, t in enumerate(tiny.SPECIAL_TOKENS))  # Qwen's special tokens, in order


def test_warm_base_follows_the_format_at_chance_accuracy(tiny_model):
    """Sampled answers of the base on the whole test split: nearly always a \\boxed{} answer from
    the question's answer space, right about as often as a uniform guess (the warm start never
    saw a true answer)."""
    model, processor = tiny_model
    test = toy.ToyTask("test")
    recs = [test[i] for i in range(len(test))]
    ro = rollout.sample(model, processor, recs, 2, rollout.Decoding(48), torch.Generator().manual_seed(0))
    n = len(ro.texts)
    boxed = sum(reward.has_boxed(t) for t in ro.texts) / n
    acc = sum(reward.accuracy(t, recs[i // 2].answer, recs[i // 2].choices) for i, t in enumerate(ro.texts)) / n
    chance = sum(1 / (len(r.choices) if r.choices else len(toy.TIERS[r.category][1])) for r in recs) / len(recs)
    assert boxed >= 0.9
    assert abs(acc - chance) < 0.08, (acc, chance)  # 600 samples: a binomial std of about 0.017
    assert ro.truncated.float().mean() < 0.05  # the base stops after its answer


def test_warm_base_never_names_an_unseen_colour(tiny_model):
    """The 'unseen' tier's pass rate is 0 for the base: sampled answers to its questions name one
    of the six colours, never the shape's own (orange, pink or brown)."""
    model, processor = tiny_model
    task = toy.ToyTask("train", ("unseen",), n=64)
    recs = [task[i] for i in range(len(task))]
    ro = rollout.sample(model, processor, recs, 8, rollout.Decoding(48), torch.Generator().manual_seed(0))
    assert sum(reward.has_boxed(t) for t in ro.texts) >= 0.9 * len(ro.texts)  # answers were given
    assert not [t for t in ro.texts if any(c in t.lower() for c in toy.UNSEEN_COLOURS)]
