"""Tiny Hugging Face models saved with save_pretrained, loaded by model.pretrained=DIR (and the fidelity settings):
BLIP, ViT-GPT2 (whole or as its two parts), CLIP and a ViT (DINO's class). The tiny SDXL pipeline is the project's
own: lightning_modules.generation.tiny.save_tiny_sdxl."""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.shapes import COLOURS, PAIR_TEMPLATES, RELATIONS, SHAPES, SINGLE_TEMPLATES, SIZES

IMAGE_SIZE = 32  # of the tiny captioners
TOWER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
GPT2_SIZE = {
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def shapes_words() -> list[str]:
    """Every word a shapes caption can have (templates, shapes, colours, sizes, relations)."""
    text = " ".join(
        [
            *SINGLE_TEMPLATES,
            *PAIR_TEMPLATES,
            *SHAPES,
            *COLOURS,
            *SIZES,
            *(phrase for phrases in RELATIONS.values() for phrase in phrases[:2]),
        ]
    )
    return sorted(
        {word for word in text.replace("{", " ").replace("}", " ").split() if word not in ("a", "b", "rel", "rel_is")}
        | {"a"}
    )


# ------------------------------------------------------------------------------------------------------------ BLIP
def save_tiny_blip(directory: Path) -> Path:
    """A BLIP with 2-layer 32-wide towers, 32 px images and a BERT tokenizer over the shapes words."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *shapes_words()]) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")  # BLIP's decoder BOS, as in its checkpoints
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    processor = BlipProcessor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer)
    processor.save_pretrained(directory)
    return directory


def tiny_blip_dir(data_dir: Path) -> Path:
    """The session's tiny BLIP, next to its data folder: saved once, reused by every test (and task) that names it."""
    directory = data_dir.parent / "tiny_blip"
    return directory if (directory / "config.json").is_file() else save_tiny_blip(directory)


# -------------------------------------------------------------------------------------------------------- ViT-GPT2
def gpt2_tokenizer():
    """GPT-2's kind of tokenizer (byte-level BPE, <|endoftext|> as BOS, EOS and UNK), trained on the shapes words."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(shapes_words())],
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def tiny_configs(tokenizer):
    """A 2-layer ViT at 32 px and a 2-layer GPT-2 over the tokenizer's vocabulary: (ViTConfig, GPT2Config)."""
    from transformers import GPT2Config, ViTConfig

    return (
        ViTConfig(**TOWER, image_size=IMAGE_SIZE, patch_size=8),
        GPT2Config(
            vocab_size=len(tokenizer),
            **GPT2_SIZE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
    )


def save_tiny_parts(directory: Path) -> tuple[Path, Path]:
    """A tiny ViT (with its image processor) and a tiny GPT-2 (with its tokenizer), saved apart."""
    from transformers import GPT2LMHeadModel, ViTImageProcessor, ViTModel

    tokenizer = gpt2_tokenizer()
    vit, gpt2 = tiny_configs(tokenizer)
    torch.manual_seed(0)
    encoder, decoder = directory / "vit", directory / "gpt2"
    ViTModel(vit, add_pooling_layer=False).save_pretrained(encoder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(encoder)
    GPT2LMHeadModel(gpt2).save_pretrained(decoder)
    tokenizer.save_pretrained(decoder)
    return encoder, decoder


def save_tiny_vit_gpt2(directory: Path) -> Path:
    """One VisionEncoderDecoderModel directory (the tiny ViT and GPT-2 with cross-attention), processor, tokenizer."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTImageProcessor

    tokenizer = gpt2_tokenizer()
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(*tiny_configs(tokenizer))
    torch.manual_seed(0)
    VisionEncoderDecoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------ fidelity: CLIP and DINO (ViT)
def save_tiny_clip(folder: Path, image_size: int = 32) -> Path:
    """A tiny CLIPModel + CLIPProcessor (local tokenizer) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lightning_modules.generation.tiny import clip_text_config, clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}_tokenizer")
    text = clip_text_config(tokenizer).to_dict()
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
    }
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_vit(folder: Path, image_size: int = 32) -> Path:
    """A tiny ViTModel (the DINO embedder's class) and its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=image_size,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
