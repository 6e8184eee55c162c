"""The policy model: a Hugging Face image-text-to-text model and its processor.

Any checkpoint of a supported family (families.py) that AutoModelForImageTextToText + AutoProcessor
load is a valid policy. The default built here is a ~1M-parameter LLaVA (CLIP vision tower, Llama
text model) with a byte-level BPE tokenizer trained in code, because no model hub is reachable from
this project's machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from modalign.core.modelstore import base_folder
from modalign.policy.adapters import is_adapter_version, merged
from modalign.policy.conversation import Conversation, chat_messages, single_question
from modalign.policy.families import UnsupportedModel, family_of

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS)

IMAGE_SIZE = 32
PATCH_SIZE = 8
# 32x32 pixels in 8x8 patches: 16 image tokens per image (the CLS token is dropped).
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
TOKENIZER_VOCAB_SIZE = 1024

# One turn per message, each closed by EOS: the assistant learns to end its answer with EOS, which is
# the engine's stop condition. Images come before the text of their message, in order.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "dot", "line", "shape")
_POSITIONS = ("left", "right", "top", "bottom", "center", "top left", "top right", "bottom left", "bottom right")
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# A small built-in English corpus: BPE merges are learned from it, so the words the synthetic tasks
# and an assistant use become single tokens, while byte fallback still encodes any other text.
_ASSISTANT_PHRASES = (
    "Hello! How can I help you today?",
    "Sure, here is what I see in the image.",
    "I am not sure, but I think the answer is yes.",
    "The answer is no. There is nothing there.",
    "Thank you for your question. Let me look at the picture.",
    "What colour is the shape? How many shapes are there? Where is it?",
    "Describe the image. Count the objects. Which one is bigger or smaller?",
    "There is a small red circle on the left and a large blue square on the right.",
    "I can see it clearly. It is near the middle of the image, above and below the others.",
    "Please tell me more about what you would like to know.",
    "This picture shows a simple scene with a few objects on a plain background.",
    "Yes, that is correct. No, that is not correct. Maybe. I don't know.",
    "The first image and the second image are different: they have the same number of shapes.",
    "Here are the numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 100.",
    "Question: what is in this image? Answer: a few coloured shapes.",
)


def _training_corpus() -> list[str]:
    lines = list(_ASSISTANT_PHRASES)
    for colour in _COLOURS:
        for shape in _SHAPES:
            lines.append(f"There is a {colour} {shape}. The {shape} is {colour}. I see {colour} {shape}s.")
    for number, word in enumerate(_COUNT_WORDS):
        lines.append(f"There are {word} shapes. I count {number} objects, {word} in total. {word.capitalize()}.")
    for position in _POSITIONS:
        lines.append(f"The shape is at the {position}. It is on the {position} of the image.")
    # Capitalised forms so answers that start a sentence also tokenise compactly.
    lines.extend(" ".join(w.capitalize() for w in group) for group in (_COLOURS, _SHAPES, _POSITIONS))
    return lines


def build_tokenizer(
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    bos_token: str | None = BOS_TOKEN,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
    unk_token: str | None = UNK_TOKEN,
    named_tokens: dict[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE,
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, offline).

    The defaults are the default policy's. A tiny checkpoint of another family passes that family's
    special tokens, chat template and named tokens (e.g. {"image_token": "<|image_pad|>"}), which its
    processor reads as tokenizer attributes. Every name passed must be among special_tokens.
    """
    named_tokens = {"image_token": IMAGE_TOKEN} if named_tokens is None else named_tokens
    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every UTF-8 string encodes, so no user text maps to <unk>.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    # normalized=False: the special tokens match only their exact text.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        extra_special_tokens=named_tokens,
        chat_template=chat_template,
        padding_side="left",  # decoder-only generation continues from the right edge
        model_max_length=2048,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast | None = None, patch_size: int = PATCH_SIZE
) -> LlavaProcessor:
    """The LLaVA processor for the default policy: resize to 32x32, expand each <image> to one token per
    patch (16 with the default 8x8 patches)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = LlavaImageProcessor(
        # Squash to 32x32 rather than crop: a crop could cut off shapes that the answer must count.
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        resample=3,  # bicubic
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, removed by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_default_policy(seed: int = 0, patch_size: int = PATCH_SIZE) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A randomly initialised ~1M-parameter LLaVA policy on the CPU, in eval mode, with its processor.

    patch_size 16 gives 4 image tokens, one per image quadrant: a tiny model trained from scratch
    grounds "what is in each quadrant" far faster when each quadrant is one token (the demo uses it).
    """
    processor = build_processor(patch_size=patch_size)
    tokenizer = processor.tokenizer
    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
        projection_dim=64,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // patch_size) ** 2,
        vision_feature_select_strategy="default",
        # Layer 0 (patch embeddings) beside the last layer: the projector sees each patch's pixels
        # directly, so colour and position reach the language model before the ViT has learned anything.
        vision_feature_layer=[0, -1],
        tie_word_embeddings=True,
    )
    # A forked RNG: the same seed gives the same weights without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, processor


def save_policy(model: PreTrainedModel, processor: ProcessorMixin, folder: str | Path) -> None:
    """Write weights (safetensors), config, generation config, tokenizer and processor files."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def load_policy(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, four_bit: bool = False,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load an image-text-to-text policy of a supported family from a local folder, in eval mode
    (dropout off). A model-store version that is a LoRA adapter (adapters.py) is loaded onto its base,
    which the store fetched beside it, and merged. four_bit: its linear layers (but the LM head) in
    4-bit NF4 with bitsandbytes, computing in dtype (QLoRA's frozen base); a full checkpoint only.

    Raises UnsupportedModel with a one-line reason, before any weight is read, when the folder has no
    config, its family is not supported, or its processor lacks a tokenizer, an image processor or a
    chat template.
    """
    folder = Path(folder)
    if (base := base_folder(folder)) is not None:
        if four_bit:
            raise UnsupportedModel(f"{folder}: a LoRA adapter version; 4-bit loading takes a full checkpoint "
                                   "(modalign export-version VERSION --merged writes one)")
        model, processor = load_policy(base, device, dtype)
        return merged(model, folder), processor
    if is_adapter_version(folder):
        raise UnsupportedModel(f"{folder}: a LoRA adapter without its base; load it from the model store, "
                               "or export it merged (modalign export-version VERSION --merged)")
    _, processor = load_processor(folder)
    if four_bit:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, dtype=dtype, device_map={"": str(device)},
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=dtype),
        )
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, dtype=dtype if dtype is not None else "auto"
        )
        model.to(device)
    model.eval()
    return model, processor


def load_processor(folder: str | Path) -> tuple[PreTrainedConfig, ProcessorMixin]:
    """A policy folder's config and processor, checked as load_policy checks them, without reading its weights
    (for whoever formats prompts for the policy without running it); an adapter version's are its base's.
    Raises UnsupportedModel as load_policy does."""
    folder = base_folder(folder) or Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UnsupportedModel(f"{folder}: no readable model config ({_first_line(error)})") from error
    family_of(config.model_type)
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise UnsupportedModel(f"{folder}: no readable processor ({_first_line(error)})") from error
    if not isinstance(processor, ProcessorMixin):
        raise UnsupportedModel(f"{folder}: no multimodal processor (AutoProcessor found only a {type(processor).__name__})")
    # Some processors (Idefics) drop the chat template they were saved with; their tokenizer keeps it.
    processor.chat_template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    missing = [part for part in ("tokenizer", "image_processor", "chat_template") if getattr(processor, part, None) is None]
    if missing:
        raise UnsupportedModel(f"{folder}: the processor has no {' and no '.join(missing)}")
    return config, processor


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def format_prompt(processor: ProcessorMixin, text: str, num_images: int) -> str:
    """The model input text for one user turn (the single-question shorthand): its images, then its text,
    with the assistant's generation prompt appended. See format_conversation."""
    return format_conversation(processor, single_question(text, [""] * num_images))


def format_conversation(processor: ProcessorMixin, conversation: Conversation) -> str:
    """The model input text for a conversation, by the processor's own chat template: one image
    placeholder per image part, in order, and the assistant's generation prompt appended.

    Raises ValueError if a text part contains one of the tokenizer's special tokens (e.g. "<image>"): it
    would be read as a control token and break the image-to-placeholder correspondence or end a turn.
    """
    tokenizer = processor.tokenizer
    reserved = (*tokenizer.all_special_tokens, *tokenizer.added_tokens_encoder)
    for turn in conversation:
        forged = sorted({token for token in reserved if token in turn.text})
        if forged:
            raise ValueError(f"{turn.role} text contains reserved token(s) {forged}")
    return processor.apply_chat_template(chat_messages(conversation), add_generation_prompt=True, tokenize=False)
