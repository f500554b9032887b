"""Tiny random image-text-to-text captioners (GIT, BLIP-2, Qwen2-VL, Idefics3 / SmolVLM, PaliGemma) for fast CPU
tests: each save_tiny_<name>(directory) builds one from configs (seeded), with local tokenizers over the shapes words,
and saves model + processor so AutoModelForImageTextToText and AutoProcessor load the directory."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_models import IMAGE_SIZE, gpt2_tokenizer, shapes_words

# The language models' size (Llama / Qwen2 / Gemma / OPT style decoders)
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

# Qwen2-VL's chat template (as in Qwen/Qwen2-VL-*-Instruct)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolVLM's / Idefics3's (SmolVLM-Instruct) chat template
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def bpe_tokenizer(extra: tuple[str, ...] = (), **special: str | None):
    """tiny_models.gpt2_tokenizer's BPE over the shapes words with special tokens added: named ones (bos_token,
    pad_token, image_token, ...; <|endoftext|> stays BOS, EOS and UNK unless overridden) and the extra ones."""
    from transformers import GPT2Tokenizer

    base = gpt2_tokenizer()
    special = {"bos_token": base.bos_token, "eos_token": base.eos_token, "unk_token": base.unk_token, **special}
    tokens = [token for token in dict.fromkeys([*special.values(), *extra]) if token is not None]
    base.add_tokens([token for token in tokens if token != base.eos_token], special_tokens=True)
    return GPT2Tokenizer(tokenizer_object=base.backend_tokenizer, extra_special_tokens=list(extra), **special)


# ------------------------------------------------------------------------------------------------------------- GIT
def save_tiny_git(directory: Path) -> Path:
    """A GIT (GitForCausalLM) with a 2-layer 32-wide vision tower and decoder, 32 px images and a BERT tokenizer."""
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *shapes_words()]) + "\n")
    # no token_type_ids in the processor's output: GitForCausalLM.generate() refuses them
    tokenizer = BertTokenizer(str(vocab), model_input_names=["input_ids", "attention_mask"])
    config = GitConfig(
        vision_config={**VISION, "image_size": IMAGE_SIZE, "patch_size": 8},
        **TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    GitForCausalLM(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    GitProcessor(image_processor, tokenizer).save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------------------- BLIP-2
def save_tiny_blip2(directory: Path) -> Path:
    """A BLIP-2 (2-layer ViT, Q-Former with 4 queries, OPT decoder) at 32 px with a BPE tokenizer that has <image>."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    # <image> not as tokenizer.image_token: Blip2Processor then takes it for an AddedToken (and fails on .content)
    tokenizer = bpe_tokenizer(("<image>",), pad_token="<pad>")  # OPT's BOS = EOS = <|endoftext|>
    tokenizer.add_bos_token = True  # OPT's tokenizer starts every text with BOS
    num_query_tokens = 4
    config = Blip2Config(
        vision_config={**VISION, "image_size": IMAGE_SIZE, "patch_size": 8},
        qformer_config={**VISION, "cross_attention_frequency": 1, "max_position_embeddings": 64},
        text_config={
            "model_type": "opt",
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------------------- Qwen2-VL
def save_tiny_qwen2_vl(directory: Path, width: int = TEXT["hidden_size"]) -> Path:
    """A Qwen2-VL (8 px patches merged 2x2: a 32 px image is 16 patches, 4 <|image_pad|>s) with its chat template;
    `width`: its vision tower's and language model's (a multiple of 32; bitsandbytes' CPU kernels need 64)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = bpe_tokenizer(
        ("<|im_start|>", "<|vision_start|>", "<|vision_end|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
    )
    ids = tokenizer.convert_tokens_to_ids
    patches = {"patch_size": 8, "temporal_patch_size": 2, "merge_size": 2}
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": width,
            "hidden_size": width,  # the merger's output width
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": patches["patch_size"],
            "temporal_patch_size": patches["temporal_patch_size"],
            "spatial_merge_size": patches["merge_size"],
        },
        text_config={
            **TEXT,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_key_value_heads": 1,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
            # temporal, height, width sections of the rotary frequencies: a quarter of the width (2 heads)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [width // 16, 3 * width // 32, 3 * width // 32],
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
            "pad_token_id": ids("<|endoftext|>"),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory)
    pixels = IMAGE_SIZE * IMAGE_SIZE  # min = max: every image is resized to about 32 x 32 (4 tokens)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, **patches),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels, **patches),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------- Idefics3 and SmolVLM
def save_idefics3_like(directory: Path, family: str) -> Path:
    """An Idefics3 or SmolVLM (family "idefics3" or "smolvlm"): 8 px patches and pixel shuffle 2 make one 32 px image
    4 <image> tokens; image splitting off, so every image is one 32 x 32 tile."""
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    image_token, image_seq_len, scale_factor, patch_size = "<image>", 4, 2, 8
    tokenizer = bpe_tokenizer(
        ("<|im_end|>",),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        image_token=image_token,
        fake_image_token="<fake_token_around_image>",
        global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
    )
    ids = tokenizer.convert_tokens_to_ids
    config = getattr(transformers, f"{prefix}Config")(
        vision_config={**VISION, "image_size": IMAGE_SIZE, "patch_size": patch_size},
        text_config={
            "model_type": "llama",
            **TEXT,
            "num_key_value_heads": 1,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
            "bos_token_id": ids("<|im_start|>"),
            "eos_token_id": ids("<end_of_utterance>"),
            "pad_token_id": ids("<|im_end|>"),
        },
        scale_factor=scale_factor,
        image_token_id=ids(image_token),
        pad_token_id=ids("<|im_end|>"),
    )
    assert image_seq_len == (IMAGE_SIZE // patch_size) ** 2 // scale_factor**2
    torch.manual_seed(0)
    getattr(transformers, f"{prefix}ForConditionalGeneration")(config).save_pretrained(directory)
    tile = {"longest_edge": IMAGE_SIZE}
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(
        do_image_splitting=False, size=tile, max_image_size=tile
    )
    videos = {}
    if family == "smolvlm":  # SmolVLMProcessor also takes a video processor (and needs the num2words package)
        videos["video_processor"] = transformers.SmolVLMVideoProcessor(size=tile, max_image_size=tile)
    processor = getattr(transformers, f"{prefix}Processor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        **videos,
    )
    processor.save_pretrained(directory)
    return directory


# conf/model/family/idefics3.yaml as a user would add it (no Idefics3 family ships: tests add this one)
IDEFICS3_FAMILY = """\
architecture: decoder
prompt: "Describe the image."
chat: true
bos_first: false
drop_prompt_end: false
generate_drops_prompt_end: false
caption_end: "<end_of_utterance>"
caption_token_type: 0
image_size: 32
vision_tower: model.vision_model
unused: []
lora_targets: 'model\\.text_model\\..*\\.(q_proj|k_proj|v_proj|o_proj)'
lora_vision_targets: 'model\\.vision_model\\..*\\.(q_proj|k_proj|v_proj|out_proj)'
fsdp_layers: [transformers.models.llama.modeling_llama.LlamaDecoderLayer]
"""


def save_tiny_idefics3(directory: Path) -> Path:
    """A tiny Idefics3 (SmolVLM v1's architecture, model_type "idefics3") with its processor and chat template."""
    return save_idefics3_like(directory, "idefics3")


def save_tiny_smolvlm(directory: Path) -> Path:
    """A tiny SmolVLM (SmolVLM2's architecture, model_type "smolvlm"); its processor needs the num2words package."""
    from transformers.utils import is_num2words_available

    if not is_num2words_available():  # before anything is saved
        raise ImportError("SmolVLMProcessor needs the num2words package (pip install num2words)")
    return save_idefics3_like(directory, "smolvlm")


# -------------------------------------------------------------------------------------------------------- PaliGemma
def save_tiny_paligemma(directory: Path) -> Path:
    """A PaliGemma (2-layer SigLIP at 32 px, 8 px patches: 16 <image> tokens, 2-layer Gemma) with its processor."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    tokenizer = bpe_tokenizer(
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", image_token="<image>"
    )
    tokenizer.add_tokens(EXTRA_TOKENS)  # the <locNNNN> and <segNNN> tokens PaliGemmaProcessor adds (to count them)
    patch_size = 8
    num_image_tokens = (IMAGE_SIZE // patch_size) ** 2
    config = PaliGemmaConfig(
        vision_config={**VISION, "image_size": IMAGE_SIZE, "patch_size": patch_size, "vision_use_head": False},
        text_config={
            "model_type": "gemma",
            **TEXT,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        projection_dim=TEXT["hidden_size"],
        hidden_size=TEXT["hidden_size"],
        vocab_size=len(tokenizer),
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(config).save_pretrained(directory)
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=num_image_tokens
    )
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------------------- Florence-2
def save_tiny_florence2(directory: Path) -> Path:
    """A Florence-2 (a 2-stage DaViT at 32 px: 16 patch tokens and their mean, 2-layer BART) with its processor."""
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    tokenizer = bpe_tokenizer(
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", image_token="<image>"
    )
    vision = {  # strides 4 then 2: a 4 x 4 grid; window 2
        "depths": [1, 1],
        "patch_size": [7, 3],
        "patch_stride": [4, 2],
        "patch_padding": [3, 1],
        "patch_prenorm": [False, True],
        "embed_dim": [32, 64],
        "num_heads": [2, 2],
        "num_groups": [2, 2],
        "window_size": 2,
        "projection_dim": 32,
        "drop_path_rate": 0.0,
    }
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "decoder_start_token_id": tokenizer.eos_token_id,  # BART's: </s>
        "forced_eos_token_id": tokenizer.eos_token_id,
    }
    text = {
        "model_type": "bart",
        "vocab_size": len(tokenizer),
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 128,
        **special,
    }
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id, **special)
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(config).save_pretrained(directory)
    side = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = CLIPImageProcessor(size=side, crop_size=side, do_center_crop=False)
    image_processor.image_seq_length = (IMAGE_SIZE // 8) ** 2 + 1  # the grid's tokens and their mean
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
