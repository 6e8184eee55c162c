"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints: randomly initialised, under 200 thousand parameters.

What makes these families different from LLaVA, and what the tiny checkpoints keep:
- dynamic resolution: each image is resized to a multiple of patch_size * merge_size within a pixel budget, so
  images of different sizes give different numbers of <|image_pad|> tokens (here 4 to 16 per image);
- pixel_values is one row per patch of all images together, with image_grid_thw (one row per image) saying
  how the rows split, rather than one tensor per image;
- 3-D multimodal RoPE: image tokens take (temporal, height, width) positions, and the text after an image
  continues from the image's largest position, so text positions run behind the token count (rope deltas);
- ChatML turns that end with <|im_end|>, the generation config's EOS.

Building or loading them needs torchvision: see _processor.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from modalign.policy.model import build_tokenizer

from tests.families.tiny.common import init_model, save_checkpoint

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# The Qwen2 tokenizer's special tokens, in the real vocabulary's order (ids 151643 onwards there).
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)
# Read by the processors as tokenizer attributes (Qwen3-VL's also reads the vision start and end tokens).
NAMED_TOKENS = {
    "image_token": IMAGE_PAD,
    "video_token": VIDEO_PAD,
    "vision_start_token": VISION_START,
    "vision_end_token": VISION_END,
}

# Qwen2-VL-Instruct's and Qwen2.5-VL-Instruct's template: a default system turn, then ChatML turns; every image
# part becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to the image's tokens.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's template without its tool-calling branches: no default system turn (a leading system
# message is written first), otherwise the same ChatML turns and image placeholders as Qwen2-VL.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}"
    "{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' + image_count.value|string + ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' + video_count.value|string + ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

PATCH_SIZE = 8
MERGE_SIZE = 2  # 2x2 patches merge into one language-model token: one token per 16x16 pixels
# Between 4 and 16 image tokens: a 32x32 image gives 4, a 48x40 one 6 (resized to 48x32), a 64x64 one 16;
# larger images are scaled down to fit 64*64 pixels, smaller ones up to 32*32.
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64

TEXT_HIDDEN_SIZE = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4  # head_dim 16: 8 rotary frequencies, split between the temporal, height and width positions
TEXT_KV_HEADS = 2
VISION_HIDDEN_SIZE = 32
VISION_LAYERS = 2
VISION_HEADS = 2
# Weights drawn with std 0.2 rather than the families' 0.02: at 0.02 a tiny random model answers every prompt with
# one token over and over, so a test comparing outputs could not tell a wrong image or position from the right one.
INIT_STD = 0.2


def _tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """Qwen's special tokens on the project's offline BPE. Like Qwen's instruct tokenizers: no BOS or UNK,
    <|im_end|> as EOS (it closes every turn), <|endoftext|> as padding."""
    return build_tokenizer(
        special_tokens=SPECIAL_TOKENS,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        named_tokens=NAMED_TOKENS,
        chat_template=chat_template,
    )


def _processor(
    processor_class: type[ProcessorMixin],
    video_processor_class: type,
    chat_template: str,
    mean_std: tuple[float, float] | None = None,
) -> ProcessorMixin:
    """The family's processor with the tiny resolution budget; mean_std overrides the image normalisation.

    The Qwen processors require a video processor (as an argument, and AutoProcessor loads one), and
    transformers' video processors exist only for torchvision: building or loading these checkpoints needs
    torchvision. The image processor is the torchvision one too, since AutoProcessor picks that backend whenever
    torchvision is installed: the checkpoint then preprocesses the same when built and when loaded.
    """
    norm = {} if mean_std is None else {"image_mean": [mean_std[0]] * 3, "image_std": [mean_std[1]] * 3}
    vision = {
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        **norm,
    }
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**vision),
        tokenizer=_tokenizer(chat_template),
        video_processor=video_processor_class(**vision),
        chat_template=chat_template,
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The config fields naming Qwen's vision tokens."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids(IMAGE_PAD),
        "video_token_id": ids(VIDEO_PAD),
        "vision_start_token_id": ids(VISION_START),
        "vision_end_token_id": ids(VISION_END),
    }


def _text_config(tokenizer: PreTrainedTokenizerFast, rope_parameters: dict, **extra: object) -> dict:
    """The language model's config, the same in the three families but for the M-RoPE layout."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 2 * TEXT_HIDDEN_SIZE,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": 2048,
        "initializer_range": INIT_STD,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **rope_parameters},
        "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def _save(
    model_class: type[PreTrainedModel], config: object, processor: ProcessorMixin, folder: Path, seed: int
) -> None:
    """Qwen's instruct generation configs stop on either <|im_end|> or <|endoftext|>, which is also their BOS."""
    model = init_model(model_class, config, seed)
    save_checkpoint(model, processor, folder, eos_tokens=(processor.tokenizer.eos_token, ENDOFTEXT), bos_token=ENDOFTEXT)


def build_qwen2_vl(folder: Path, seed: int = 0) -> None:
    """A tiny Qwen2-VL: ViT with 2-D rotary positions and a 2x2 patch merger, Qwen2 decoder with M-RoPE."""
    processor = _processor(Qwen2VLProcessor, Qwen2VLVideoProcessor, QWEN2_VL_CHAT_TEMPLATE)
    config = Qwen2VLConfig(
        # Qwen2-VL's sections of the rotary frequencies, [16, 24, 24] of 64, scaled to 8.
        text_config=_text_config(processor.tokenizer, {"mrope_section": [2, 3, 3]}),
        vision_config={
            "depth": VISION_LAYERS,
            "embed_dim": VISION_HIDDEN_SIZE,
            "hidden_size": TEXT_HIDDEN_SIZE,  # the merger's output: the language model's width
            "mlp_ratio": 2,
            "num_heads": VISION_HEADS,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "initializer_range": INIT_STD,
        },
        tie_word_embeddings=True,
        **_token_ids(processor.tokenizer),
    )
    _save(Qwen2VLForConditionalGeneration, config, processor, folder, seed)


def _vision_config(**extra: object) -> dict:
    """The ViT of Qwen2.5-VL and Qwen3-VL (their configs share these names), with each one's own additions."""
    return {
        "depth": VISION_LAYERS,
        "hidden_size": VISION_HIDDEN_SIZE,
        "intermediate_size": 2 * VISION_HIDDEN_SIZE,
        "num_heads": VISION_HEADS,
        "out_hidden_size": TEXT_HIDDEN_SIZE,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "initializer_range": INIT_STD,
        **extra,
    }


def build_qwen2_5_vl(folder: Path, seed: int = 0) -> None:
    """A tiny Qwen2.5-VL: as Qwen2-VL, but the ViT (RMSNorm, SwiGLU) attends within windows of 2x2 merged tokens
    in its first layer and over the whole image in its last."""
    processor = _processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, QWEN2_VL_CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=_text_config(processor.tokenizer, {"mrope_section": [2, 3, 3]}),
        vision_config=_vision_config(
            window_size=2 * MERGE_SIZE * PATCH_SIZE,  # in pixels: 32x32, 2x2 merged tokens
            fullatt_block_indexes=[VISION_LAYERS - 1],
        ),
        tie_word_embeddings=True,
        **_token_ids(processor.tokenizer),
    )
    _save(Qwen2_5_VLForConditionalGeneration, config, processor, folder, seed)


def build_qwen3_vl(folder: Path, seed: int = 0) -> None:
    """A tiny Qwen3-VL: ViT with learned position embeddings (interpolated to each image's grid) whose first
    layer's features are also added to the first decoder layer's image positions (DeepStack); Qwen3 decoder
    (QK-norm) with interleaved M-RoPE; pixels normalised to [-1, 1]."""
    processor = _processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, QWEN3_VL_CHAT_TEMPLATE, mean_std=(0.5, 0.5))
    config = Qwen3VLConfig(
        text_config=_text_config(
            processor.tokenizer,
            # Qwen3-VL's interleaved sections, [24, 20, 20] of 64 frequencies, scaled to 8.
            {"mrope_section": [4, 2, 2], "mrope_interleaved": True},
            head_dim=TEXT_HIDDEN_SIZE // TEXT_HEADS,
        ),
        vision_config=_vision_config(
            num_position_embeddings=8 * 8,  # a learned 8x8 grid
            deepstack_visual_indexes=[0],
        ),
        tie_word_embeddings=True,
        **_token_ids(processor.tokenizer),
    )
    _save(Qwen3VLForConditionalGeneration, config, processor, folder, seed)
