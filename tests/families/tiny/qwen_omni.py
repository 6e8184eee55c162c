"""A tiny Qwen2.5-Omni thinker: the audio-capable family (images and speech in, text out), randomly initialised.

What makes it different from Qwen2.5-VL, and what the tiny checkpoint keeps:
- an audio encoder (Whisper's convolutional front end, transformer layers attending within chunks of n_window * 2
  mel frames, 2x average pooling): a clip of S seconds gives about 25 * S <|AUDIO|> tokens between <|audio_bos|>
  and <|audio_eos|>; the processor's Whisper feature extractor pads every clip to chunk_length seconds and says
  which mel frames are real (feature_attention_mask), one row per clip;
- every image and clip sits between its own start and end tokens, and 3-D multimodal RoPE counts positions
  across both (audio tokens advance like text), so text positions run behind the token count after an image;
- ChatML turns that end with <|im_end|>, a default system turn.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from modalign.policy import omni
from modalign.policy.model import build_tokenizer
from modalign.policy.omni import ENDOFTEXT, IM_END, NAMED_TOKENS, SPECIAL_TOKENS, config_token_ids

from tests.families.tiny.common import init_model, save_checkpoint
from tests.families.tiny.qwen import (
    INIT_STD,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    TEXT_HEADS,
    TEXT_HIDDEN_SIZE,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
    VISION_HEADS,
    VISION_HIDDEN_SIZE,
    VISION_LAYERS,
)

# Qwen2.5-Omni's special tokens and template are modalign.policy.omni's, with the real template's default
# system turn (shortened) put back, which omni.py drops for the demo's short rows. An image part becomes
# <|vision_bos|><|IMAGE|><|vision_eos|> and an audio part <|audio_bos|><|AUDIO|><|audio_eos|>, which the processor
# expands to the image's and the clip's tokens.
CHAT_TEMPLATE = omni.CHAT_TEMPLATE.replace(
    "{% for message in messages %}",
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    1,
)

SAMPLING_RATE = 16_000
MEL_BINS = 16
CLIP_SECONDS = 4  # the feature extractor pads every clip to 4 s: 400 mel frames, at most 100 audio tokens
AUDIO_WINDOW = 50  # the encoder attends within chunks of 100 mel frames (1 s)
AUDIO_HIDDEN_SIZE = 32
AUDIO_LAYERS = 2
AUDIO_HEADS = 2


def _tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's special tokens on the project's offline BPE: no BOS or UNK, <|im_end|> as EOS, <|endoftext|> pads."""
    return build_tokenizer(
        special_tokens=SPECIAL_TOKENS, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        named_tokens=NAMED_TOKENS, chat_template=CHAT_TEMPLATE,
    )


def _processor() -> Qwen2_5OmniProcessor:
    vision = {
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": 2,
    }
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        video_processor=Qwen2VLVideoProcessor(**vision),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, chunk_length=CLIP_SECONDS,
        ),
        tokenizer=_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def build_qwen2_5_omni(folder: Path, seed: int = 0) -> None:
    """A tiny Qwen2.5-Omni thinker: Whisper-style audio encoder, Qwen2.5-VL's windowed ViT, Qwen2 decoder with M-RoPE."""
    processor = _processor()
    tokenizer = processor.tokenizer
    config = Qwen2_5OmniThinkerConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 2 * TEXT_HIDDEN_SIZE,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "max_position_embeddings": 2048,
            "initializer_range": INIT_STD,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "depth": VISION_LAYERS,
            "hidden_size": VISION_HIDDEN_SIZE,
            "intermediate_size": 2 * VISION_HIDDEN_SIZE,
            "num_heads": VISION_HEADS,
            "out_hidden_size": TEXT_HIDDEN_SIZE,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "window_size": 2 * MERGE_SIZE * PATCH_SIZE,
            "fullatt_block_indexes": [VISION_LAYERS - 1],
            "initializer_range": INIT_STD,
        },
        audio_config={
            "num_mel_bins": MEL_BINS,
            "encoder_layers": AUDIO_LAYERS,
            "encoder_attention_heads": AUDIO_HEADS,
            "encoder_ffn_dim": 2 * AUDIO_HIDDEN_SIZE,
            "d_model": AUDIO_HIDDEN_SIZE,
            "n_window": AUDIO_WINDOW,
            "max_source_positions": 2 * AUDIO_WINDOW,
            "output_dim": TEXT_HIDDEN_SIZE,
            "initializer_range": INIT_STD,
        },
        **config_token_ids(tokenizer),
        initializer_range=INIT_STD,
    )
    model = init_model(Qwen2_5OmniThinkerForConditionalGeneration, config, seed)
    save_checkpoint(model, processor, folder, eos_tokens=(IM_END, ENDOFTEXT), bos_token=ENDOFTEXT)
