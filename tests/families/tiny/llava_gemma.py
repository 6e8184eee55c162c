"""Tiny LLaVA-OneVision and Gemma 3 checkpoints: randomly initialised, about 125,000 parameters each.

What makes these families different from LLaVA, and what the tiny checkpoints keep:
- LLaVA-OneVision (SigLIP + Qwen2): any-resolution tiling. A prompt's only image is fitted onto the best of the
  grid pinpoints and cut into 32x32 tiles, after a downscaled view of the whole image, so a larger image gives
  more tiles and more <image> tokens (32x32 pixels: 2 tiles, 36 tokens; 64x48: 5 tiles, 70 tokens). A prompt
  with several images gets only the whole-image view of each (17 tokens each). pixel_values is
  [images, tiles, C, H, W], zero-padded to the call's most tiles, beside image_sizes [images, 2] and
  batch_num_images [prompts with images], which the model needs to tell the two cases apart. ChatML turns end
  with <|im_end|>, the generation config's EOS.
- Gemma 3 (SigLIP + Gemma 3): a fixed number of soft tokens per image (the patch grid average-pooled), between
  <start_of_image> and <end_of_image>. The processor returns token_type_ids (1 on soft tokens), which prefill
  needs: tokens of one image attend to each other bidirectionally. Sliding-window and global layers alternate.
  Turns end with <end_of_turn>, which the generation config lists beside <eos>.

PaliGemma is not among them: a single-turn prefix-LM with no chat format that refuses a prompt without
images, where Gemma 3 covers the same SigLIP + Gemma pairing as a chat model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from modalign.policy.model import build_tokenizer

from tests.families.tiny.common import init_model, save_checkpoint

IMAGE_SIZE = 32
PATCH_SIZE = 8
PATCHES_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16: a 4x4 grid of patches per 32x32 tile

TEXT_HIDDEN_SIZE = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = TEXT_HIDDEN_SIZE // TEXT_HEADS
VISION_HIDDEN_SIZE = 32
VISION_LAYERS = 1
# With tied embeddings and the usual 0.02 initialisation, two tiny layers barely move the residual stream: an
# untrained LLaVA-OneVision then echoes the prompt's last token ("\n") whatever the image. Drawing
# their text weights wider makes greedy answers differ from prompt to prompt and image to image, so tests that
# compare the tokens of a row in a batch with the same prompt alone can tell a wrong answer from a right one.
WIDE_INIT_RANGE = 0.3

# --- LLaVA-OneVision ---------------------------------------------------------------------------------------------

OV_ENDOFTEXT = "<|endoftext|>"
OV_IM_START = "<|im_start|>"
OV_IM_END = "<|im_end|>"
OV_IMAGE = "<image>"
OV_VIDEO = "<video>"
# The Qwen2 tokenizer's specials, then the two placeholders llava-hf added (ids 151643-151647 there).
OV_SPECIAL_TOKENS = (OV_ENDOFTEXT, OV_IM_START, OV_IM_END, OV_IMAGE, OV_VIDEO)

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat_template.json: each turn's images, then videos, then its text.
OV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tiles are 32x32; an image is fitted onto the best of these (height, width) canvases. Real checkpoints use
# multiples of 384 up to 6x6 tiles; two by two tiles at most keeps prompts short.
OV_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _siglip_config() -> SiglipVisionConfig:
    """SigLIP, the vision tower of all three families: no CLS token, so every patch becomes an image feature."""
    return SiglipVisionConfig(
        hidden_size=VISION_HIDDEN_SIZE,
        intermediate_size=2 * VISION_HIDDEN_SIZE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )


def build_llava_onevision(folder: Path, seed: int = 0) -> None:
    """Save a tiny LLaVA-OneVision checkpoint (SigLIP + Qwen2, any-resolution tiles) and its processor."""
    tokenizer = build_tokenizer(
        special_tokens=OV_SPECIAL_TOKENS,
        bos_token=None,  # Qwen2 has no BOS
        eos_token=OV_IM_END,
        pad_token=OV_ENDOFTEXT,
        unk_token=None,
        named_tokens={"image_token": OV_IMAGE, "video_token": OV_VIDEO},
        chat_template=OV_CHAT_TEMPLATE,
    )
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=OV_GRID_PINPOINTS,
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        num_image_tokens=PATCHES_PER_IMAGE,
        vision_feature_select_strategy="full",
        chat_template=OV_CHAT_TEMPLATE,
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=2048,
        initializer_range=WIDE_INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaOnevisionConfig(
        vision_config=_siglip_config(),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(OV_IMAGE),
        video_token_index=tokenizer.convert_tokens_to_ids(OV_VIDEO),
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        image_grid_pinpoints=OV_GRID_PINPOINTS,
        tie_word_embeddings=True,
    )
    model = init_model(LlavaOnevisionForConditionalGeneration, config, seed)
    save_checkpoint(model, processor, folder, eos_tokens=(OV_IM_END,))


# --- Gemma 3 -----------------------------------------------------------------------------------------------------

GEMMA_PAD = "<pad>"
GEMMA_EOS = "<eos>"
GEMMA_BOS = "<bos>"
GEMMA_UNK = "<unk>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"
# Gemma's specials in the real vocabulary's order (pad 0, eos 1, bos 2, unk 3; the rest further on there).
GEMMA3_SPECIAL_TOKENS = (
    GEMMA_PAD,
    GEMMA_EOS,
    GEMMA_BOS,
    GEMMA_UNK,
    START_OF_TURN,
    END_OF_TURN,
    START_OF_IMAGE,
    END_OF_IMAGE,
    IMAGE_SOFT_TOKEN,
)

# google/gemma-3-4b-it's template: a system message becomes a prefix of the first user turn, the assistant is
# "model", and each image part is <start_of_image>, which the processor expands to the image's soft tokens.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# The 4x4 patch grid is average-pooled 2x2 into 4 soft tokens per image (real checkpoints: 64x64 into 16x16).
GEMMA3_TOKENS_PER_IMAGE = 4
# Shorter than any chat prompt (a text-only one is 19 tokens), so the sliding-window layers and their cache crop
# are exercised; longer than an image's 4 soft tokens, so each image still attends to itself in full. Layer 0
# slides and layer 1 is global, as in the real 5:1 pattern (window 1024 there).
GEMMA3_SLIDING_WINDOW = 8


def build_gemma3(folder: Path, seed: int = 0) -> None:
    """Save a tiny Gemma 3 checkpoint (SigLIP + Gemma 3 text model, pooled soft tokens) and its processor."""
    tokenizer = build_tokenizer(
        special_tokens=GEMMA3_SPECIAL_TOKENS,
        bos_token=GEMMA_BOS,
        eos_token=GEMMA_EOS,
        pad_token=GEMMA_PAD,
        unk_token=GEMMA_UNK,
        named_tokens={"image_token": IMAGE_SOFT_TOKEN, "boi_token": START_OF_IMAGE, "eoi_token": END_OF_IMAGE},
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=GEMMA3_TOKENS_PER_IMAGE,
    )
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        max_position_embeddings=2048,
        sliding_window=GEMMA3_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Gemma3Config(
        vision_config=_siglip_config(),
        text_config=text_config,
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids(START_OF_IMAGE),
        eoi_token_index=tokenizer.convert_tokens_to_ids(END_OF_IMAGE),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
    )
    model = init_model(Gemma3ForConditionalGeneration, config, seed)
    # Gemma 3 initialises its image projection to zeros, so an untrained checkpoint would ignore its images.
    torch.nn.init.normal_(
        model.model.multi_modal_projector.mm_input_projection_weight, std=config.initializer_range,
        generator=torch.Generator().manual_seed(seed),
    )
    # As google/gemma-3-*-it's generation config: an answer stops at <end_of_turn> (or <eos>).
    save_checkpoint(model, processor, folder, eos_tokens=(GEMMA_EOS, END_OF_TURN))
