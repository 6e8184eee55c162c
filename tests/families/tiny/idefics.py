"""Tiny Idefics3, SmolVLM and IDEFICS (v1) checkpoints: randomly initialised, 170 to 260 thousand parameters each.

What makes these families different from LLaVA, and what the tiny checkpoints keep:
- Idefics3 and SmolVLM split every image into tiles plus a downscaled global view: the image's longest edge is
  resized to 64 pixels and cut into 32x32 tiles, so a square image gives a 2x2 grid and a wide one a 1x2 row,
  each tile <fake_token_around_image><row_i_col_j> and 4 <image> tokens (pixel shuffle of the 4x4 or 8x8 patch
  grid), the global view <fake_token_around_image><global-img> and 4 more; pixel_values is
  [rows, tiles, 3, 32, 32] with all-zero tiles as padding. SmolVLM shuffles 4x4 patches into one token where
  Idefics3 shuffles 2x2.
- IDEFICS (the open Flamingo) does not put image tokens in the sequence: the text attends to the images through
  gated cross-attention layers, with a mask ([rows, tokens, images]) saying which images each token sees. Its
  real initialisation zeroes the gates (tanh(0) = 0: the images would change nothing), so this checkpoint opens
  them.
- IDEFICS resamples each image's patches to 4 latents with a Perceiver; each token sees only the latest image
  before it. Its processor writes the prompt itself from an interleaved list per row,
  processor(text=[["User:", image, "What colour?<end_of_utterance>\nAssistant:"]]), adding <s> and the
  <fake_token_around_image> markers: given text and images= separately, it appends the images after the text.

The chat templates are the families' own; each assistant turn ends with a token that the generation config lists
as EOS. The image processors are the torchvision ones, which AutoProcessor loads wherever torchvision is
installed (a dependency of this project), so a checkpoint preprocesses the same when built and when loaded.
SmolVLM's processor also needs num2words.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessor,
    IdeficsProcessor,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)

from modalign.policy.model import build_tokenizer

from tests.families.tiny.common import init_model, save_checkpoint

FAKE_IMAGE = "<fake_token_around_image>"
IMAGE = "<image>"
GLOBAL_IMAGE = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
# The tile markers Idefics3's and SmolVLM's processors write, for grids of up to 6x6 tiles.
ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))

LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"



def _idefics_style_template(prefix: str) -> str:
    """The chat template of Idefics3-8B-Llama3, SmolVLM and idefics-9b-instruct, after `prefix` (their BOS, if the
    template writes it): "User:<image>question<end_of_utterance>\\nAssistant:", one line per turn, each turn
    closed by <end_of_utterance>; ": " after the role unless the message starts with an image."""
    return (
        prefix + "{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
        "{% else %}"
        "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for line in message['content'] %}"
        "{% if line['type'] == 'text' %}{{ line['text'] }}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}"
        "{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<end_of_utterance>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


IDEFICS3_CHAT_TEMPLATE = _idefics_style_template(LLAMA3_BOS)
SMOLVLM_CHAT_TEMPLATE = _idefics_style_template("<|im_start|>")
# IdeficsProcessor writes <s> itself, at the start of every prompt.
IDEFICS_CHAT_TEMPLATE = _idefics_style_template("")

TILE = 32  # Idefics3 / SmolVLM tile edge, and the vision towers' image size
TEXT_HIDDEN_SIZE = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
VISION_HIDDEN_SIZE = 32
VISION_HEADS = 2
# The value the checkpoints give the gates that the real initialisations zero: tanh(pi/4) ~ 0.66, the value
# Mllama's gated vision layers start from.
OPEN_GATE = math.pi / 4


def llama_text_config(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The language model (a 2-layer Llama) of Idefics3 and SmolVLM."""
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 2 * TEXT_HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vision_config(patch_size: int) -> dict:
    """The SigLIP-style vision tower of Idefics3 and SmolVLM: one 32x32 tile at a time."""
    return {
        "hidden_size": VISION_HIDDEN_SIZE,
        "intermediate_size": 2 * VISION_HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": VISION_HEADS,
        "image_size": TILE,
        "patch_size": patch_size,
    }


def _split_image_processor_kwargs() -> dict:
    """Idefics3 and SmolVLM: the longest edge resized to 64 pixels, then cut into 32x32 tiles (the real ones use
    4 * 364 and 364, or 4 * 512 and 512)."""
    return {
        "size": {"longest_edge": 2 * TILE},
        "max_image_size": {"longest_edge": TILE},
        "do_image_splitting": True,
    }


def build_idefics3(folder: Path, seed: int = 0) -> None:
    """A tiny Idefics3: SigLIP-style tower on 32x32 tiles of 8x8 patches, 2x2 pixel shuffle (4 tokens a tile),
    a 2-layer Llama; Llama 3's tokens, turns closed by <end_of_utterance>."""
    tokenizer = build_tokenizer(
        special_tokens=(
            LLAMA3_BOS,
            LLAMA3_EOS,
            "<|reserved_special_token_0|>",  # Llama 3's id 128002: Idefics3's padding
            FAKE_IMAGE,
            IMAGE,
            END_OF_UTTERANCE,
            GLOBAL_IMAGE,
            *ROW_COL_TOKENS,
        ),
        bos_token=LLAMA3_BOS,
        eos_token=END_OF_UTTERANCE,
        pad_token="<|reserved_special_token_0|>",
        unk_token=None,
        named_tokens={"image_token": IMAGE},
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(**_split_image_processor_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=(TILE // 8) ** 2 // 2**2,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        text_config=llama_text_config(tokenizer),
        vision_config=_vision_config(patch_size=8),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=False,
    )
    model = init_model(Idefics3ForConditionalGeneration, config, seed)
    save_checkpoint(model, processor, folder, eos_tokens=(END_OF_UTTERANCE, LLAMA3_EOS))


def build_smolvlm(folder: Path, seed: int = 0) -> None:
    """A tiny SmolVLM (2): SigLIP-style tower on 32x32 tiles of 4x4 patches, 4x4 pixel shuffle (4 tokens a tile),
    a 2-layer Llama (SmolLM2); SmolLM2's ChatML tokens, turns closed by <end_of_utterance>."""
    tokenizer = build_tokenizer(
        special_tokens=(
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            FAKE_IMAGE,
            IMAGE,
            GLOBAL_IMAGE,
            END_OF_UTTERANCE,
            "<video>",
            *ROW_COL_TOKENS,
        ),
        bos_token="<|im_start|>",
        eos_token=END_OF_UTTERANCE,
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        # SmolVLMProcessor reads these as tokenizer attributes.
        named_tokens={
            "image_token": IMAGE,
            "fake_image_token": FAKE_IMAGE,
            "global_image_token": GLOBAL_IMAGE,
            "end_of_utterance_token": END_OF_UTTERANCE,
            "video_token": "<video>",
        },
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**_split_image_processor_kwargs()),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size={"longest_edge": TILE}, max_image_size={"longest_edge": TILE}),
        image_seq_len=(TILE // 4) ** 2 // 4**2,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    config = SmolVLMConfig(
        text_config=llama_text_config(tokenizer),
        vision_config=_vision_config(patch_size=4),
        scale_factor=4,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        # SmolVLM ties them, but a tiny random model with tied embeddings mostly repeats its last input token
        # whatever the image, which would make every output comparison pass trivially.
        tie_word_embeddings=False,
    )
    model = init_model(SmolVLMForConditionalGeneration, config, seed)
    save_checkpoint(model, processor, folder, eos_tokens=(END_OF_UTTERANCE,))


def build_idefics(folder: Path, seed: int = 0) -> None:
    """A tiny IDEFICS (v1): CLIP-style tower on 32x32 images of 8x8 patches, a Perceiver resampling each image to
    4 latents, a 2-layer Llama with a gated cross-attention block before each layer; LLaMA's tokens.

    The gates (alpha) start at 1 instead of IDEFICS's 0, and the Perceiver's latents at the scale of the other
    weights instead of 50 times it, so the images change the output. Every parameter is trainable (IDEFICS's
    config freezes the text and vision layers by default). <end_of_utterance> closes the turns but </s> stays the
    tokenizer's EOS: the processor stops a text's attention to earlier images after the tokenizer's EOS, which
    would cut the answer off from the image after the user's turn.
    """
    tokenizer = build_tokenizer(
        special_tokens=("<unk>", "<s>", "</s>", FAKE_IMAGE, IMAGE, END_OF_UTTERANCE),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",  # idefics-9b-instruct pads with <unk>, id 0
        unk_token="<unk>",
        named_tokens={"image_token": IMAGE},
        chat_template=IDEFICS_CHAT_TEMPLATE,
    )
    image_processor = IdeficsImageProcessor(image_size=TILE)
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=TILE)
    # IdeficsProcessor.__init__ drops a chat_template argument, so it is set here to be saved; loading drops it
    # again (processor.chat_template is None), but the tokenizer loaded with it has the template.
    processor.chat_template = IDEFICS_CHAT_TEMPLATE
    config = IdeficsConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=2048,
        cross_layer_interval=1,
        alpha_initializer="ones",
        alpha_type="float",
        freeze_text_layers=False,
        freeze_vision_layers=False,
        use_resampler=True,
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
        },
        vision_config={
            "embed_dim": VISION_HIDDEN_SIZE,
            "intermediate_size": 2 * VISION_HIDDEN_SIZE,
            "num_hidden_layers": 2,
            "num_attention_heads": VISION_HEADS,
            "image_size": TILE,
            "patch_size": 8,
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = init_model(IdeficsForVisionText2Text, config, seed)
    with torch.no_grad():
        # IDEFICS draws the Perceiver's latent queries with std 1, fifty times the other weights: at this size
        # they drown the image in the resampler's residual stream (red and blue images then give logits within
        # 0.01 of each other). At the other weights' scale, the image decides the greedy tokens.
        model.model.perceiver_resampler.latents.mul_(config.initializer_range)
    save_checkpoint(model, processor, folder, eos_tokens=(END_OF_UTTERANCE, "</s>"))
