"""A tiny Mllama (Llama 3.2 Vision), the other cross-attention design beside Idefics: its image layers are
separate text layers that cross-attend to the vision encoder's output, gated by tanh."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

from modalign.policy.model import build_tokenizer

from tests.families.tiny.common import init_model, save_checkpoint
from tests.families.tiny.idefics import (
    LLAMA3_BOS,
    LLAMA3_EOS,
    OPEN_GATE,
    VISION_HEADS,
    VISION_HIDDEN_SIZE,
    llama_text_config,
)

MLLAMA_IMAGE = "<|image|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
MLLAMA_PAD = "<|finetune_right_pad_id|>"
MLLAMA_TILE = 28
MLLAMA_PATCH = 14

# Llama 3.2 Vision Instruct's template without tools: no system turn when the conversation has images (a system
# message then is an error), else a system turn with the knowledge cut-off and a date, here fixed (the real one
# asks strftime_now) so the same messages always give the same prompt.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] | trim %}{%- endif %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}"
    "{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: 26 Jul 2024\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def build_mllama(folder: Path, seed: int = 0) -> None:
    """A tiny Mllama (Llama 3.2 Vision): a 2-layer tile encoder and 1-layer gated global encoder on up to 4 28x28
    tiles of 14x14 patches, a 3-layer Llama whose middle layer cross-attends to the image; Llama 3's tokens.

    The gates that Mllama's initialisation zeroes (cross-attention and its MLP, the tile position embeddings) are
    opened to tanh(pi/4), so the image changes the output. EOS, as in the real generation config: <|end_of_text|>,
    <|eom_id|> and <|eot_id|>, which closes every turn.
    """
    tokenizer = build_tokenizer(
        special_tokens=(
            LLAMA3_BOS,
            LLAMA3_EOS,
            MLLAMA_PAD,
            "<|start_header_id|>",
            "<|end_header_id|>",
            EOM,
            EOT,
            "<|python_tag|>",
            MLLAMA_IMAGE,
        ),
        bos_token=LLAMA3_BOS,
        eos_token=EOT,
        pad_token=MLLAMA_PAD,
        unk_token=None,
        named_tokens={"image_token": MLLAMA_IMAGE},
        chat_template=MLLAMA_CHAT_TEMPLATE,
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": MLLAMA_TILE, "width": MLLAMA_TILE}, max_image_tiles=4),
        tokenizer=tokenizer,
        chat_template=MLLAMA_CHAT_TEMPLATE,
    )
    # The tile encoder's first layer's output joins the global encoder's (the real one takes 5 of its 32 layers').
    intermediate_layers = [0]
    config = MllamaConfig(
        # The Llama of Idefics3 with a third layer, the middle one cross-attending to the image.
        text_config={**llama_text_config(tokenizer), "model_type": "mllama_text_model", "num_hidden_layers": 3,
                     "cross_attention_layers": [1]},
        vision_config={
            "hidden_size": VISION_HIDDEN_SIZE,
            "intermediate_size": 2 * VISION_HIDDEN_SIZE,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": VISION_HEADS,
            "image_size": MLLAMA_TILE,
            "patch_size": MLLAMA_PATCH,
            "max_num_tiles": 4,
            "intermediate_layers_indices": intermediate_layers,
            "vision_output_dim": VISION_HIDDEN_SIZE * (1 + len(intermediate_layers)),
        },
        image_token_index=tokenizer.convert_tokens_to_ids(MLLAMA_IMAGE),
    )
    model = init_model(MllamaForConditionalGeneration, config, seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(OPEN_GATE)
                layer.cross_attn_mlp_gate.fill_(OPEN_GATE)
        vision = model.model.vision_model
        for embedding in (
            vision.gated_positional_embedding,
            vision.pre_tile_positional_embedding,
            vision.post_tile_positional_embedding,
        ):
            embedding.gate.fill_(OPEN_GATE)
    save_checkpoint(model, processor, folder, eos_tokens=(EOT, LLAMA3_EOS, EOM))
