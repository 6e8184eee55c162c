"""An audio-capable default policy: a ~1M-parameter Qwen2.5-Omni thinker on the project's built-in tokenizer.

The default LLaVA (model.py) sees images and reads text; this one also hears. It is Qwen2.5-Omni's thinker
(Qwen2_5OmniThinkerForConditionalGeneration, the text-generating half; no talker), randomly initialised at
about the default LLaVA's size, with Qwen's special tokens and ChatML template on the offline BPE, so it
saves and loads as a plain Hugging Face checkpoint that families.OmniRope serves.

Sizes are chosen for the demo's scenes (scenes.py):
- images: 32x32 pixels in 8x8 patches, 2x2 patches merged into one language-model token, so each image
  quadrant (one object slot) is exactly one merged image token, as the demo's LLaVA has with 16x16 patches;
- audio: the demo's spoken questions last 1.4-2.6 s (espeak-ng). The encoder attends within chunks of
  2 * AUDIO_WINDOW mel frames; at 4 s a whole question is one chunk, so every audio token can carry the whole
  question rather than the second of it around it. About 25 audio tokens per second of speech.
"""

from __future__ import annotations

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from modalign.policy.model import IMAGE_SIZE, build_tokenizer

ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"
AUDIO = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
VISION_BOS = "<|vision_bos|>"
VISION_EOS = "<|vision_eos|>"
IMAGE = "<|IMAGE|>"
VIDEO = "<|VIDEO|>"
SPECIAL_TOKENS = (
    ENDOFTEXT, "<|im_start|>", IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS, "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    VISION_BOS, VISION_EOS, "<|vision_pad|>", IMAGE, VIDEO,
)
"""Qwen2.5-Omni's special tokens, in the real vocabulary's order."""
NAMED_TOKENS = {
    "image_token": IMAGE, "audio_token": AUDIO, "video_token": VIDEO,
    "vision_bos_token": VISION_BOS, "vision_eos_token": VISION_EOS,
    "audio_bos_token": AUDIO_BOS, "audio_eos_token": AUDIO_EOS,
}
"""Read by the processor as tokenizer attributes."""

# Qwen2.5-Omni's template without its default system turn: ChatML turns; an image part becomes
# <|vision_bos|><|IMAGE|><|vision_eos|> and an audio part <|audio_bos|><|AUDIO|><|audio_eos|>, which the
# processor expands to the image's and the clip's tokens. The default system turn is dropped (a request may
# still send one) because the built-in BPE never saw its words: it cost ~40 byte-level tokens on every row,
# more than the rest of a typed prompt, and made every training step about twice as long.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH_SIZE = 8
MERGE_SIZE = 2
"""2x2 patches of 8x8 pixels merge into one token: 16x16 pixels, one quadrant of a 32x32 scene."""
SAMPLING_RATE = 16_000
CLIP_SECONDS = 4
"""The feature extractor pads every clip to 4 s (its real frames are marked); the encoder's chunk is as long."""
AUDIO_WINDOW = 200
"""Half the encoder's attention chunk in mel frames (100 per second): 400 frames, 4 s, one chunk per question."""
MEL_BINS = 80
"""Whisper's own number. The tiny test checkpoint's 16 blur the formants that tell "red" from "green"."""


def config_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The thinker config's fields naming its special tokens: where images and clips go, and where they start."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "audio_token_index": ids(AUDIO), "image_token_index": ids(IMAGE), "video_token_index": ids(VIDEO),
        "audio_start_token_id": ids(AUDIO_BOS), "audio_end_token_id": ids(AUDIO_EOS),
        "vision_start_token_id": ids(VISION_BOS), "vision_end_token_id": ids(VISION_EOS),
    }


def build_omni_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's special tokens on the project's offline BPE: no BOS or UNK, <|im_end|> ends turns, <|endoftext|> pads."""
    return build_tokenizer(
        special_tokens=SPECIAL_TOKENS, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        named_tokens=NAMED_TOKENS, chat_template=CHAT_TEMPLATE,
    )


def build_omni_processor(mel_bins: int = MEL_BINS) -> Qwen2_5OmniProcessor:
    """Images resized to exactly 32x32 (4 merged tokens); clips as mel_bins log-mel frames, 100 per second."""
    vision = {
        "size": {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE},
        "patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": 2,
    }
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        video_processor=Qwen2VLVideoProcessor(**vision),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=mel_bins, sampling_rate=SAMPLING_RATE, chunk_length=CLIP_SECONDS,
        ),
        tokenizer=build_omni_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def build_omni_policy(seed: int = 0, mel_bins: int = MEL_BINS) -> tuple[PreTrainedModel, Qwen2_5OmniProcessor]:
    """A randomly initialised ~1M-parameter Qwen2.5-Omni thinker on the CPU, in eval mode, with its processor.

    The language model is the default LLaVA's (4 layers of 128, head dim 32, tied embeddings); the ViT and the
    audio encoder have 2 layers of 64 each.
    """
    processor = build_omni_processor(mel_bins)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    text_hidden = 128
    config = Qwen2_5OmniThinkerConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": 3 * text_hidden,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            # head dim 32: 16 rotary frequencies, split between temporal, height and width positions.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": True,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": text_hidden,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "window_size": IMAGE_SIZE,  # one window: the whole image
            "fullatt_block_indexes": [1],
        },
        audio_config={
            "num_mel_bins": mel_bins,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "d_model": 64,
            "n_window": AUDIO_WINDOW,
            "max_source_positions": 2 * AUDIO_WINDOW,
            "output_dim": text_hidden,
        },
        **config_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    # A forked RNG: the same seed gives the same weights without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    model.generation_config.bos_token_id = ids(ENDOFTEXT)
    model.generation_config.eos_token_id = [ids(IM_END), ids(ENDOFTEXT)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, processor
